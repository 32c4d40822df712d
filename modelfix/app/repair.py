"""`repair(model, data, method, **options) -> RepairResult` for Python callers, and `repair_files(job)` for every
command that writes a repaired checkpoint: outputs checked first, inputs resolved, the method run, the evaluation
and the verdict, history and provenance recorded once, checkpoint and report committed together once."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modelfix import distributed
from modelfix.app import outputs, resolve
from modelfix.errors import ModelfixError
from modelfix.repair.registry import check_options, get_method
from modelfix.repair.result import RepairInputs, RepairResult

COLLAPSE_BELOW = 0.5  # a worst class under half its before value (or under 10 %) is called collapsed
COLLAPSE_FLOOR = 0.10
HALVED = 0.5  # a repair must at least halve the clean − poisoned gap …
MAX_CLEAN_DROP = 0.05  # … and cost at most 5 points of clean accuracy, or the verdict warns
SHORTCUT_MIN_GAP = 0.02  # a gap under 2 points before the repair: no shortcut to halve, nothing to warn about
TOLERANCE = 1e-9  # accuracies are ratios of counts: exactly 5 points or exactly half must pass despite rounding
OTHER_METHODS = {"finetune": "`finetune --method rrr --masks DIR`", "prune-egem": "`prune-egem --clean-dir DIR`",
                 "refit": "`refit --method ridge --clean-dir DIR`"}  # command → what to try instead
CHECK_IT = ("pass --eval-data (held-out images the repair did not see) and --artifact SPEC to see clean and poisoned "
            "accuracy before and after")


def try_next(method: str) -> str:
    """What to try when the shortcut remains: the other commands' methods, an artifact, a wider search."""
    own = get_method(method).command or "finetune"
    others = ", ".join(text for command, text in OTHER_METHODS.items() if command != own)
    return (f"try another method ({others}), give --artifact or --masks so the selection can see the artifact, or "
            "search further (a wider --lambda list for finetune, a larger --slack for prune-egem and refit)")


def repair(model: nn.Module, data=None, method: str = "pca-egem", *, clean=None, val=None, feedback=None,
           artifact=None, seed: int = 0, progress: bool = True, **options) -> RepairResult:
    """Repair a copy of `model` with `method` (see `list_methods()`); `model` itself is never modified.

    `data` is the training data (masks travel in it) and, for post-hoc methods, the approved clean pool unless
    `clean` is given; `val` chooses between swept values; `feedback` is a verdicts file. `options` are the method's
    hyper-parameters (fine-tunes also take TrainConfig fields and `lambdas`); `batch_size` is also the batch of the
    statistics passes. A missing input is one `MissingInput` error naming it."""
    entry = get_method(method)
    batch_size = options.get("batch_size", 256)
    if entry.kind != "finetune":
        options.pop("batch_size", None)
    if clean is None and "clean" in entry.needs:
        clean = data
    inputs = RepairInputs(model, data, clean, val, Path(feedback) if feedback is not None else None, seed, progress,
                          batch_size, artifact)
    inputs.check(entry)
    if entry.kind != "finetune":
        check_options(entry, options)
        options = {**entry.hyperparameters, **options}
    was_training = model.training
    try:
        result = entry.runner()(inputs, **options)
    finally:
        model.train(was_training)
    if not isinstance(result, RepairResult):
        raise TypeError(f"method '{method}' returned {type(result).__name__}, not a RepairResult")
    result.warnings.extend(no_op_warnings(model, result))
    return result


def no_op_warnings(before: nn.Module, result: RepairResult) -> list[str]:
    """A repair that left every weight as it was, or whose selection stopped at the end of its grid."""
    warnings = []
    after = result.model
    same = len(before.state_dict()) == len(after.state_dict()) and all(
        torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    if same and not getattr(after, "patches", None):
        warnings.append(f"{result.method} changed nothing: the repaired weights equal the original's")
    if result.selection is not None and result.selection.at_edge():
        warnings.append(f"{result.method}: the selected {result.selection.parameter} "
                        f"{result.selection.value!r} is at the edge of its grid; widen the grid")
    return [w for w in warnings if w not in result.warnings]


@dataclass
class RepairJob:
    """One repair command as files: what to read, what to run, where to write."""

    command: str
    method: str
    output: Path
    model_path: Path | None = None  # None: `model_and_card` is given (train from random initialisation)
    model_and_card: tuple | None = None
    options: dict = field(default_factory=dict)
    data: str | None = None
    masks: Path | None = None
    clean: str | None = None
    approve_mask: Path | None = None
    val: str | None = None
    feedback: Path | None = None
    report: Path | None = None
    eval_data: str | None = None
    artifact: str | None = None
    data_root: Path | None = None
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 256
    trust: bool = False
    overrides: dict = field(default_factory=dict)  # arch, num_classes, in_channels, input_size, mean, std
    overwrite: bool = False
    progress: bool = True
    reading: dict = field(default_factory=dict)  # how images are read (resize, workers, …): resolve.load_dataset
    config: dict = field(default_factory=dict)  # the method's resolved settings, for the card
    invocation: dict | None = None  # the command and every option as resolved, for the card and `modelfix rerun`
    train_accuracy: bool = False  # also report the repaired model's accuracy on the training data (`train`)
    loaded: object = None  # the training data already read (`train` reads it once, for the card and the run)

    def input_paths(self) -> list:
        return [self.model_path, self.data, self.masks, self.clean, self.approve_mask, self.val, self.feedback,
                self.eval_data]


def _evaluation_data(job: RepairJob, card):
    """The data of the before/after evaluation: --eval-data, else the test split of the card's scenario, else None
    (and the report says why)."""
    spec = job.eval_data or (resolve.default_test_split(card) if (card.dataset or {}).get("scenario") else None)
    if spec is None:
        return None, None
    return spec, resolve.load_dataset(spec, job.data_root, job.seed, card=card, reading=job.reading, stream=True)


def verdict(assessment: dict, result: RepairResult, repaired: bool = True) -> tuple[str | None, list[str]]:
    """(one plain line, warnings) from the before/after evaluation: clean and poisoned accuracy before → after, the
    gap, the worst class. Warnings: a worst class that collapsed; a shortcut that remains (the clean − poisoned gap
    not halved, `HALVED`); clean accuracy that fell more than `MAX_CLEAN_DROP`; a shortcut that could not be checked
    (no evaluation data, or no artifact to paste). `repaired` False (a model trained from scratch): no before, so
    nothing to compare and nothing to warn about when there is no evaluation."""
    evaluation = assessment.get("evaluation") or {}
    if "after" not in evaluation:
        if not repaired:
            return None, []
        return (f"{result.method}: shortcut not checked (no evaluation data)",
                [f"the shortcut was not checked: there is no evaluation data, so nothing shows whether the repair "
                 f"removed it; {CHECK_IT}"])

    def levels(phase):
        rows = evaluation[phase]["levels"]
        return rows[0], (rows[1] if len(rows) > 1 else None)

    def worst(row):
        values = {k: v for k, v in (row.get("per_class") or {}).items() if v is not None}
        return min(values.items(), key=lambda kv: kv[1]) if values else (None, None)

    clean_after, poisoned_after = levels("after")
    parts, warnings = [], []
    if "before" in evaluation:
        clean_before, poisoned_before = levels("before")
        parts.append(f"clean {100 * clean_before['accuracy']:.1f} → {100 * clean_after['accuracy']:.1f} %")
        if poisoned_after is not None:
            gap_before = clean_before["accuracy"] - poisoned_before["accuracy"]
            gap_after = clean_after["accuracy"] - poisoned_after["accuracy"]
            parts.append(f"poisoned {100 * poisoned_before['accuracy']:.1f} → {100 * poisoned_after['accuracy']:.1f} %")
            parts.append(f"gap {100 * gap_before:.1f} → {100 * gap_after:.1f} points")
            parts[-1] += shortcut_outcome(gap_before, gap_after, warnings, result.method)
        else:
            parts.append("shortcut not checked (no artifact known)")
            warnings.append("the shortcut was not checked: no artifact is known (no --artifact, none on the model "
                            "card or the evaluation data), so only clean accuracy was measured; pass --artifact SPEC "
                            "(docs/data.md) to see the accuracy with the artifact pasted before and after")
        drop = clean_before["accuracy"] - clean_after["accuracy"]
        if drop > MAX_CLEAN_DROP + TOLERANCE:
            warnings.append(f"clean accuracy fell {100 * drop:.1f} points ({100 * clean_before['accuracy']:.1f} → "
                            f"{100 * clean_after['accuracy']:.1f} %), more than {100 * MAX_CLEAN_DROP:g}: the repair "
                            "costs too much; try a weaker setting (a smaller --lambda, a larger --alpha), another "
                            "method, or more clean data")
        name_before, worst_before = worst(clean_before)
        name_after, worst_after = worst(clean_after)
        if worst_after is not None:
            parts.append(f"worst class '{name_after}' {100 * worst_after:.1f} %")
            if worst_after < COLLAPSE_FLOOR or (worst_before and worst_after < COLLAPSE_BELOW * worst_before):
                warnings.append(f"class '{name_after}' collapsed: clean accuracy {100 * worst_after:.1f} % after the "
                                f"repair (worst class before: '{name_before}' {100 * (worst_before or 0):.1f} %)")
    else:
        parts.append(f"clean {100 * clean_after['accuracy']:.1f} %")
        if poisoned_after is not None:
            parts.append(f"poisoned {100 * poisoned_after['accuracy']:.1f} %")
    return f"{result.method}: " + ", ".join(parts) + f" (on {evaluation.get('data')})", warnings


def shortcut_outcome(gap_before: float, gap_after: float, warnings: list[str], method: str) -> str:
    """The verdict's word on the gap ("halved", "NOT halved", or none to see), and the warning when the shortcut
    remains. The gap's size counts, not its sign: a model that reads a label-coloured patch (decoy-digits) is *more*
    accurate with a random-colour patch than without any, and a repair closes that gap from below."""
    if abs(gap_before) < SHORTCUT_MIN_GAP:
        return " (no shortcut seen before the repair)"
    if abs(gap_after) <= HALVED * abs(gap_before) + TOLERANCE:
        return " (halved)"
    warnings.append(f"the shortcut remains: the clean − poisoned gap went from {100 * gap_before:.1f} to "
                    f"{100 * gap_after:.1f} points, not halved (a size of at most {100 * HALVED * abs(gap_before):.1f} "
                    f"was needed); {try_next(method)}")
    return " (NOT halved: the shortcut remains)"


def _inputs(job: RepairJob, entry, card):
    """The datasets the method needs (a missing one is left None: `repair()` names it, `MissingInput`). The
    fine-tunes stream lazy sources (training loop, λ calibration, validation and counterfactual passes), the post-hoc
    methods walk the clean pool batch by batch and decode only their refinement split; pruning gets whole tensors."""
    stream = entry.kind in ("finetune", "posthoc")
    data = clean = val = None
    if "data" in entry.needs:
        data = job.loaded if job.loaded is not None else resolve.load_dataset(
            job.data or "decoy-digits:train", job.data_root, job.seed, job.masks, card, reading=job.reading,
            stream=stream)
    if "clean" in entry.needs and job.clean is not None:
        clean = resolve.load_dataset(job.clean, job.data_root, job.seed, job.approve_mask, card, reading=job.reading,
                                     stream=stream)
    if job.val:
        val = resolve.load_dataset(job.val, job.data_root, job.seed, card=card, reading=job.reading, stream=stream)
    return data, clean, val


def repair_files(job: RepairJob) -> tuple[RepairResult, dict]:
    """Run `job` end to end (module docstring); returns the result and the document written to the report."""
    from modelfix.assessment import assess
    from modelfix.checkpoint import sha256_file, write_checkpoint
    from modelfix.data import parse_artifact
    from modelfix.report import json_safe, write_repair_report

    entry = get_method(job.method)
    plan = outputs.OutputPlan(model=Path(job.output), folder=job.report, inputs=job.input_paths(),
                              overwrite=job.overwrite).check()
    if job.artifact is not None:
        parse_artifact(job.artifact)  # a typo costs nothing
    if job.batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, not {job.batch_size}")
    if job.model_and_card is not None:
        model, card = job.model_and_card
    else:
        model, card = resolve.load_checkpoint(job.model_path, job.trust, job.device, **job.overrides)
    if job.artifact is not None:
        artifact = parse_artifact(job.artifact)
        if getattr(artifact, "target", None) is not None and not 0 <= artifact.target < card.num_classes:
            raise ModelfixError(f"--artifact target {artifact.target} is not a class of the model "
                                f"(0..{card.num_classes - 1})")
    eval_spec, eval_data = _evaluation_data(job, card) if (job.report is not None or job.eval_data) else (None, None)
    data, clean, val = _inputs(job, entry, card)
    named = next((d for d in (data, clean) if d is not None), None)
    if named is not None and resolve.has_default_names(card) and len(named.class_names) == card.num_classes:
        card = dataclasses.replace(card, class_names=list(named.class_names))  # the first write records the names
    start = time.perf_counter()
    before = None if job.model_path is None else model
    # a fine-tune's TrainConfig batch size wins; its seed is the job's (RepairInputs.seed)
    options = {"batch_size": job.batch_size, **{k: v for k, v in job.options.items() if k != "seed"}}
    # the counterfactual selection pastes --artifact, else the card's (None: masks, else the clean rule)
    result = repair(model, data, job.method, clean=clean, val=val, feedback=job.feedback,
                    artifact=job.artifact or card.artifact, seed=job.seed, progress=job.progress, **options)
    result.timings.setdefault("total_s", time.perf_counter() - start)

    document = result_document(job, entry, result, data if clean is None else clean, val)
    history = {k: document[k] for k in ("command", "method", "config", "data", "val", "hyperparameters", "sweep",
                                        "trace", "fold", "distributed") if k in document}
    history["invocation"] = job.invocation
    new_card = card.with_history(json_safe(history))
    if job.model_path is not None:
        new_card = dataclasses.replace(new_card, provenance={"parent": str(job.model_path),
                                                             "parent_sha256": sha256_file(job.model_path),
                                                             "parent_card": card.fingerprint()})
    assessment = {}
    if eval_data is not None:
        artifact = job.artifact or card.artifact or eval_data.info.get("artifact")
        assessment = assess(result.model, eval_data, artifact, before=before, seed=job.seed)
        assessment["evaluation"]["spec"] = eval_spec
    elif job.report is not None:
        assessment = {"evaluation_note": "no --eval-data and the model card names no scenario, so the report has no "
                                         "before/after metrics"}
    line, collapse = verdict(assessment, result, repaired=job.model_path is not None)
    result.warnings.extend(collapse)
    document.update(assessment, verdict=line, warnings=list(result.warnings))
    result.model.cpu()
    if job.train_accuracy and data is not None:  # on the data already loaded, not read again
        from modelfix.training import accuracy

        document["train_accuracy"] = accuracy(result.model, data)

    def write_model(tmp: Path, tmp_side: Path) -> None:
        write_checkpoint(result.model, new_card, tmp, tmp_side)

    def write_report(folder: Path) -> None:
        write_repair_report(folder, json_safe(document), _renderers()[result.kind])

    outputs.commit(plan, write_model, write_report if job.report is not None else None)
    return result, json_safe(document)


SYMBOLS = {"alpha": "α", "lambda": "λ", "beta": "β"}


def _selection_rows(result: RepairResult) -> dict | None:
    chosen = result.selection
    if chosen is None or any(score is None for score in chosen.scores):
        return None
    return {"parameter": SYMBOLS.get(chosen.parameter, chosen.parameter), "score_name": chosen.score_name,
            "rows": chosen.rows()}


def result_document(job: RepairJob, entry, result: RepairResult, data, val) -> dict:
    """The JSON document of a repair (stdout with --json, results.json, the card's history entry): the method's
    record under `trace` (+ `fold`) for post-hoc and pruning methods, `sweep` + `hyperparameters` for fine-tunes."""
    info = resolve.data_info(job.clean or job.data or "", data) if data is not None else None
    document = {"schema": "modelfix.repair/v1", "command": job.command, "method": result.method, "paper": entry.paper,
                "model": str(job.model_path) if job.model_path else "random initialisation",
                "output": str(job.output), "config": job.config or result.settings, "data": info,
                "selection": _selection_rows(result), "timings": result.timings,
                "distributed": distributed.describe()}  # world_size and backend: how the run was spread
    if result.kind == "finetune":
        settings = dict(result.settings)
        document.update(schema="modelfix.finetune/v1", config=settings.pop("config"), sweep=result.details["sweep"],
                        hyperparameters={k: v for k, v in settings.items()
                                         if k not in ("lambdas", "select_by", "slack")},
                        val=resolve.data_info(job.val, val) if val is not None else None)
        if info is not None:
            info.update(masks=str(job.masks) if job.masks else None, with_mask=int(data.has_mask.sum()),
                        feedback=str(job.feedback) if job.feedback else None)
    else:
        trace = {**result.details, "warnings": list(result.warnings), "timing": result.timings}
        document.update(trace=trace, fold=trace.pop("fold", None))
    return document


def _renderers() -> dict:
    from modelfix.report import render_crayon_markdown, render_finetune_markdown, render_repair_markdown

    return {"posthoc": render_repair_markdown, "pruning": render_crayon_markdown, "finetune": render_finetune_markdown}
