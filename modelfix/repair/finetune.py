"""Guided fine-tuning with a λ sweep: one training run per penalty weight, the winner picked on validation data.

Every run starts from the same weights (the checkpoint, or one seeded random init for `train --method`), uses
the same `TrainConfig` (so the same seed and batch order) and keeps its final epoch (or its best epoch with
`select="best"`). The winner is the run with the best validation accuracy (ties: lower validation loss) or the
lowest validation loss (`select_by="loss"`). The validation loss is the plain task loss: validation data need
no masks, and a penalty term would make runs with different λ incomparable.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import Dataset, ImageSource, batches, to_dataset
from ..data import batches as stream_batches  # calibrate_lambda's `batches` is a count
from ..errors import ModelfixError, TrainingFailed
from ..precision import check_precision
from ..training import TaskObjective, TrainConfig, accuracy, task_loss, train
from ..progress import log_event
from .counterfactual import (NO_ARTIFACT, NO_ARTIFACT_WARNING, CounterfactualScore, counterfactual_set,
                             find_artifact, holdout, pasted_accuracy, rule_name, score_model, select_counterfactual)
from .registry import Method, check_options, get_method, make_objective, register, register_runner

SELECT_BY = ("counterfactual", "accuracy", "loss", "paper")  # paper = accuracy, the papers' rule
AUTO_GRID = (0.1, 1.0, 10.0)  # λ auto: these multiples of the calibrated λ₀
CALIBRATION_BATCHES = 4
HOLDOUT = 0.1  # the share of the training data held out for validation when a sweep has no --val


@dataclass
class SweepResult:
    """The chosen model and, per λ, what its run did (`runs[i]` belongs to `lambdas[i]`)."""

    model: nn.Module
    method: str
    lambdas: list[float | None]
    chosen: int
    select_by: str | None
    runs: list[dict] = field(default_factory=list)
    slack: float | None = None  # the counterfactual rule's clean-accuracy slack and its reference accuracy
    reference: float | None = None
    calibration: dict | None = None  # λ auto: λ₀, the task and penalty it came from
    carried: bool = False  # the validation items carry the artifact: chosen by accuracy with it pasted at random

    def to_dict(self) -> dict:
        return {"method": self.method, "lambdas": self.lambdas, "chosen": self.chosen,
                "chosen_lambda": self.lambdas[self.chosen], "select_by": self.select_by, "runs": self.runs,
                "slack": self.slack, "reference": self.reference, "calibration": self.calibration,
                "carried": self.carried}


@torch.no_grad()
def validation_loss(model: nn.Module, data: Dataset | ImageSource, loss: str = "ce", batch_size: int = 1000) -> float:
    """Mean task loss over `data` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_fn, total = task_loss(loss), 0.0
    for batch in batches(data, batch_size):
        y = batch["y"].to(device)
        total += float(loss_fn(model(batch["x"].to(device)), y)) * len(y)
    model.train(was_training)
    return total / max(len(data), 1)


def check_lambdas(method: Method, lambdas) -> list[float | None]:
    """The sweep as a list; [None] (the method's default) when none is given. ("auto" is resolved before this.)"""
    if not lambdas:
        return [None]
    if method.weight is None:
        raise ModelfixError(f"method '{method.name}' has no penalty weight, so --lambda does not apply")
    values = []
    for lam in lambdas:
        if not (math.isfinite(lam) and lam >= 0):
            raise ModelfixError(f"--lambda values must be finite and >= 0, not {lam}")
        values.append(float(lam))
    if len(set(values)) != len(values):
        raise ModelfixError("--lambda lists the same value twice")
    return values


def is_auto(lambdas) -> bool:
    return isinstance(lambdas, str) and lambdas.strip().lower() == "auto"


def calibrate_lambda(method: str, model: nn.Module, data: Dataset, config: TrainConfig, hparams: dict | None = None,
                     batches: int = CALIBRATION_BATCHES) -> dict:
    """λ₀ = task / penalty on the first `batches` training batches (the run's own shuffle), so that at the start the
    penalty weighs as much as the task loss. The penalty is read as L(λ=1) − L(λ=0) of the objective, which is the
    unweighted penalty for every objective that is `task + λ·penalty (+ terms without λ)`; the task is the
    objective's own `task` part, but at least ln K (the loss of a uniform guess over the K classes): a model that
    has already fitted the data with a shortcut has a task loss near 0, and a weight calibrated on that would leave
    the penalty powerless (measured: decoy-digits mlp, task 0.002 against a penalty of 8·10⁶). No update is made
    and BatchNorm statistics are restored."""
    entry = get_method(method)
    if entry.weight is None:
        raise ModelfixError(f"method '{method}' has no penalty weight, so --lambda auto does not apply")
    hparams = {k: v for k, v in (hparams or {}).items() if k != entry.weight}
    device = next(model.parameters()).device
    state, was_training = copy.deepcopy(model.state_dict()), model.training
    generator = torch.Generator().manual_seed(config.seed)
    tasks, penalties = [], []
    try:
        model.train()
        for i, batch in enumerate(stream_batches(data, config.batch_size, shuffle=True, generator=generator)):
            if i == batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            losses = {}
            for weight in (0.0, 1.0):  # the same randomness for both (sampling and PGD objectives)
                objective = make_objective(method, model, loss=config.loss, **hparams, **{entry.weight: weight})
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(config.seed + i)
                    loss, parts = objective(model, batch)
                losses[weight] = (float(loss.detach()), parts)
                model.zero_grad(set_to_none=True)
            tasks.append(float(losses[0.0][1].get("task", losses[0.0][0])))
            penalties.append(losses[1.0][0] - losses[0.0][0])
    finally:
        model.load_state_dict(state)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    task, penalty = sum(tasks) / len(tasks), sum(penalties) / len(penalties)
    scale = max(task, math.log(max(data.num_classes, 2)))
    if not (math.isfinite(task) and math.isfinite(penalty) and penalty > 0):
        raise ModelfixError(f"--lambda auto cannot calibrate {method}: task {task:.4g}, penalty {penalty:.4g} on the "
                            "first batches", hint="give --lambda values")
    return {"lambda0": scale / penalty, "task": task, "task_scale": scale, "penalty": penalty,
            "batches": len(tasks), "grid": list(AUTO_GRID)}


def check_masks(method: Method, data: Dataset) -> None:
    """A mask method on data without a single mask would silently be ERM: refuse it."""
    if method.needs_masks and not bool(data.has_mask.any()):
        raise ModelfixError(f"method '{method.name}' needs masks of the spurious regions, but no training image has one",
                            hint="pass --masks DIR (a folder mirroring the images), a bundle with masks, or make "
                                 "teacher masks with `modelfix annotate`")


def preflight(objective, model: nn.Module, data: Dataset) -> None:
    """Run the objective once on two items (no update) so a bad layer name or shape fails before any training."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in next(batches(data.subset(slice(0, 2)), 2)).items()}
    state = copy.deepcopy(model.state_dict())  # BatchNorm running statistics must not move
    try:
        objective(model, batch)
    finally:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)


def finetune(model: nn.Module, data: Dataset, method: str, config: TrainConfig, lambdas=None, hparams=None,
             val: Dataset | None = None, select_by: str = "accuracy", progress: bool = True,
             counterfactual: Dataset | None = None, slack: float = 0.05) -> SweepResult:
    """Run `method` once per λ from copies of `model` (which is left untouched) and return the chosen run.

    `select_by`: "accuracy" / "paper" (best validation accuracy, ties: lower loss), "loss", or "counterfactual"
    (needs `counterfactual`, a `counterfactual_set` of `val`: the best worst-group accuracy there among the runs whose
    validation accuracy is within `slack` (relative) of the best run's). A run that diverges (TrainingFailed, a
    non-finite validation loss) is recorded as diverged and the others go on; only when all diverge is it an error."""
    entry = get_method(method)
    hparams = dict(hparams or {})
    values = check_lambdas(entry, lambdas)
    if lambdas and entry.weight in hparams:
        raise ModelfixError(f"--lambda sets '{entry.weight}' of method '{method}', which is also given on its own",
                            hint="give one of them")
    if select_by not in SELECT_BY:
        raise ModelfixError(f"--select-by must be one of {', '.join(SELECT_BY)}, not '{select_by}'")
    select_by = "accuracy" if select_by == "paper" else select_by
    if select_by == "counterfactual" and counterfactual is None:
        raise ModelfixError("--select-by counterfactual needs an artifact to paste on the validation data",
                            hint="pass --artifact, or --select-by accuracy")
    if len(values) > 1 and val is None:
        raise ModelfixError("--lambda with several values needs validation data to choose between them",
                            hint="pass --val, e.g. decoy-digits:val or a folder of held-out images")
    check_masks(entry, data)
    check_precision(config.precision, next(model.parameters()).device)  # before the first run, not inside it
    runs, models = [], []
    for i, lam in enumerate(values):
        candidate = copy.deepcopy(model)
        weight = {entry.weight: lam} if lam is not None else {}
        objective = make_objective(method, candidate, loss=config.loss, **hparams, **weight)
        if i == 0:
            preflight(objective, candidate, data)
        label = f"{method}" + (f" λ={lam:g}" if lam is not None else "")
        run = {"lambda": lam if lam is not None else (hparams.get(entry.weight, entry.hyperparameters.get(entry.weight))
                                                      if entry.weight else None)}
        try:
            result = train(candidate, data, config, objective, val=val, progress=progress, description=label)
            if val is not None:
                run["val_loss"] = validation_loss(candidate, val, config.loss)
                if not math.isfinite(run["val_loss"]):
                    raise TrainingFailed(f"the validation loss is {run['val_loss']}")
        except TrainingFailed as exc:
            if len(values) == 1:
                raise
            runs.append({**run, "final_loss": None, "final_task": None, "final_penalty": None, "best_epoch": None,
                         "seconds": None, "epochs": [], "diverged": True, "error": str(exc)})
            models.append(None)
            continue
        last = result.history[-1]
        run.update(final_loss=last["loss"], final_task=last.get("task"), final_penalty=last.get("penalty"),
                   best_epoch=result.best_epoch, seconds=result.seconds, epochs=result.history, diverged=False)
        if val is not None:
            run["val_accuracy"] = accuracy(candidate, val)
        if counterfactual is not None:
            run["cf_worst_group"], run["cf_group_mean"] = score_model(candidate, counterfactual)
            run["cf_pasted_accuracy"] = pasted_accuracy(candidate, counterfactual)
        runs.append(run)
        models.append(candidate)
    alive = [i for i, m in enumerate(models) if m is not None]
    if not alive:
        raise TrainingFailed(f"every λ of the sweep diverged ({', '.join(f'{v:g}' for v in values)})",
                             hint="lower --lr or the λ values")
    chosen, reference = alive[0], None
    carried = val is not None and float(val.has_mask.float().mean()) > 0.5
    if val is not None and len(alive) > 1:
        if select_by == "counterfactual" and carried:
            # every validation item carries the artifact already (a slice of shortcut training data): their accuracy
            # rewards the shortcut and there is no clean accuracy to hold a slack against, so the best accuracy with
            # the artifact pasted at random wins (ties: the better worst group, then the weaker λ)
            chosen = max(alive, key=lambda i: (runs[i]["cf_pasted_accuracy"], runs[i]["cf_worst_group"], -i))
        elif select_by == "counterfactual":
            # the slack's reference is the best run's clean accuracy: the starting model may read the shortcut on
            # the validation data (a slice of shortcut training data), so its accuracy there is no reference
            reference = max(runs[i]["val_accuracy"] for i in alive)
            picked = select_counterfactual([CounterfactualScore(runs[i]["cf_worst_group"], runs[i]["cf_group_mean"])
                                            for i in alive],
                                           [runs[i]["val_accuracy"] for i in alive], reference, slack)
            chosen = alive[picked]
        else:
            def key(i):
                run = runs[i]
                return (-run["val_loss"],) if select_by == "loss" else (run["val_accuracy"], -run["val_loss"])
            chosen = max(alive, key=key)  # the first of equals
    for i, run in enumerate(runs):
        run["chosen"] = i == chosen
    return SweepResult(model=models[chosen], method=method, lambdas=[r["lambda"] for r in runs], chosen=chosen,
                       select_by=select_by if val is not None else None, runs=runs,
                       slack=slack if select_by == "counterfactual" and reference is not None else None,
                       carried=carried,
                       reference=reference)


# ---- the registry's entries: plain ERM, and the runner every fine-tune shares ----------------------------------

CARRIED_RULE = "counterfactual: accuracy with the artifact pasted at random (every validation item carries it)"
SWEEP_OPTIONS = {"lambdas": None, "select_by": "counterfactual", "slack": 0.05}
register(Method("erm", "finetune", "plain fine-tune on the task loss", "empirical risk minimisation (baseline)", {},
                build=lambda model, loss="ce": TaskObjective(loss)))


def split_options(entry: Method, options: dict) -> tuple[TrainConfig, dict, dict]:
    """(TrainConfig, hyper-parameters, sweep options) from one flat option dict: TrainConfig's fields (its defaults
    < the method's `train_defaults` < the options), the sweep's `lambdas`/`select_by`, the rest the method's."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in options.items() if v is not None}
    config = TrainConfig(**{**entry.train_defaults, **{k: v for k, v in given.items() if k in fields}})
    sweep = {**SWEEP_OPTIONS, **{k: v for k, v in options.items() if k in SWEEP_OPTIONS}}
    hparams = {k: v for k, v in given.items() if k not in fields and k not in SWEEP_OPTIONS}
    check_options(entry, hparams)
    return config, hparams, sweep


def run_finetune(entry: Method, inputs, **options):
    """The λ sweep of `entry` on `inputs.data` from `inputs.model` (untouched), chosen on `inputs.val` (without it, on
    a held-out slice of the training data). Defaults: λ auto for every method with a weight (but the feedback
    methods, whose verdicts belong to the training items), the counterfactual rule where an artifact is known."""
    from modelfix.repair.result import RepairResult, Selection

    config, hparams, sweep = split_options(entry, {"seed": inputs.seed, **options})
    feedback = "verdicts" in entry.hyperparameters
    lambdas, select_by, warnings = sweep["lambdas"], sweep["select_by"], []
    if lambdas is None and entry.weight is not None and entry.weight not in hparams and not feedback:
        lambdas = "auto"
    several = is_auto(lambdas) or len(lambdas or ()) > 1
    data, val = inputs.data, inputs.val
    if several and val is None:
        data, val = holdout(data, HOLDOUT, inputs.seed)
        warnings.append(f"no validation data: {len(val)} of the {len(inputs.data)} training items "
                        f"({100 * HOLDOUT:g} %) were held out to choose λ and the runs train on the rest")
        log_event("holdout", warnings[-1], enabled=inputs.progress, held_out=len(val), train=len(data))
    rule = None
    counterfactual = None
    if select_by == "counterfactual":
        artifact = find_artifact(inputs.artifact, inputs.data)
        if artifact is not None and val is not None:
            counterfactual = counterfactual_set(val, artifact, inputs.seed)
            if several and float(val.has_mask.float().mean()) > 0.5:
                warnings.append(f"{int(val.has_mask.sum())} of the {len(val)} validation items carry a mask (the "
                                "artifact is already on them): there is no clean accuracy to hold a slack against, so "
                                "λ is chosen by the accuracy with the artifact pasted at random; a --val of clean "
                                "items is better")
        else:
            select_by = "accuracy"
            if artifact is None and several:
                rule = NO_ARTIFACT
                warnings.append(NO_ARTIFACT_WARNING)
    if feedback:  # feedback methods get the data and one verdict per item
        from modelfix.feedback import read_sample_feedback

        data = to_dataset(data) if isinstance(data, ImageSource) else data  # its frozen maps: whole tensors
        hparams = {**hparams, "data": data, "verdicts": read_sample_feedback(inputs.feedback).for_data(data)}
    calibration = None
    if is_auto(lambdas):
        calibration = calibrate_lambda(entry.name, inputs.model, data, config, hparams)
        lambdas = [calibration["lambda0"] * m for m in AUTO_GRID]
    result = finetune(inputs.model, data, entry.name, config, lambdas=lambdas, hparams=hparams, val=val,
                      select_by=select_by, progress=inputs.progress, counterfactual=counterfactual,
                      slack=sweep["slack"])
    result.calibration = calibration
    runs = result.runs
    selection = None
    if len(runs) > 1:
        cf = [r.get("cf_worst_group") for r in runs] if counterfactual is not None else None
        clean = [r.get("val_accuracy") for r in runs]
        if result.carried and cf is not None:  # no clean validation items: accuracy with the artifact pasted
            cf, rule = [r.get("cf_pasted_accuracy") for r in runs], CARRIED_RULE
        if rule is None:
            rule = (rule_name(sweep["slack"]) + " of the best run" if cf is not None
                    else f"best validation {result.select_by}")
        selection = Selection("lambda", [r["lambda"] for r in runs], cf or clean, result.chosen, rule=rule,
                              score_name=("accuracy with the artifact pasted" if result.carried else
                                          "counterfactual worst-group accuracy") if cf else "validation accuracy",
                              clean_scores=clean, cf_scores=cf)
    diverged = [r["lambda"] for r in runs if r.get("diverged")]
    if diverged:
        warnings.append(f"λ {', '.join(f'{v:g}' for v in diverged)} diverged; chosen among the other runs")
    settings = {**{k: v for k, v in hparams.items() if k not in ("data", "verdicts")}, **sweep,
                "config": config.to_dict()}
    return RepairResult(result.model, entry.name, "finetune", settings, {"sweep": result.to_dict()}, selection,
                        {"total_s": sum(r["seconds"] or 0.0 for r in runs)}, warnings)


register_runner("finetune", run_finetune)
