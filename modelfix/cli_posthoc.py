"""The post-hoc repair commands (`prune-egem`, `refit`): load, build the refinement set, fit, fold, save, report.

Registered on the main Typer app when `modelfix.cli` is imported; no algorithms live here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .cli import (ArchOpt, DataRootOpt, DeviceOpt, EvalDataOpt, InChannelsOpt, InputSizeOpt, JsonOpt, MeanOpt, NumClassesOpt, SeedOpt,
                  StdOpt, TrustOpt, _check_fits, _data, _data_info, _device, _load, app, err, handles_errors, out)
from .errors import ModelfixError

CleanDirOpt = Annotated[Optional[str], typer.Option("--clean-dir", help="Approved samples: an image folder DIR/<class>/..., a .npz/.safetensors bundle, or SCENARIO:SPLIT.", rich_help_panel="Data")]
ScenarioOpt = Annotated[Optional[str], typer.Option("--scenario", help="Use the built-in clean pool of a scenario (its `clean` split) instead of --clean-dir.", rich_help_panel="Data")]
SamplesOpt = Annotated[int, typer.Option("--samples-per-class", help="N refinement samples per class (oversampled if fewer; 20 % of them validate).", rich_help_panel="Data")]
KeepIncorrectOpt = Annotated[bool, typer.Option("--keep-incorrect", help="Also use samples the model gets wrong (the paper uses correctly predicted ones only).", rich_help_panel="Data")]
SlackOpt = Annotated[float, typer.Option("--slack", help="Strongest setting whose validation accuracy is ≥ (1 − s)·original.", rich_help_panel="Selection")]
SlackModeOpt = Annotated[str, typer.Option("--slack-mode", help="relative ((1 − s)·original) or absolute (original − s).", rich_help_panel="Selection")]
OutputOpt = Annotated[Path, typer.Option("-o", "--output", help="Where to write the repaired .safetensors.", rich_help_panel="Output")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Also write results.json, report.md and report.html (before/after metrics, selection trace, heatmaps) into this folder.", rich_help_panel="Output")]
BatchOpt = Annotated[int, typer.Option("--batch-size", rich_help_panel="Runtime")]


def _refinement(model, card, clean_dir, scenario, data_root, seed, samples, keep_incorrect, approve_mask=None,
                min_relevance=0.75, batch_size=256):
    """The clean pool (folder, bundle or a scenario's clean split), checked against the model, split for refinement."""
    from .repair.refinement import refinement_split

    if (clean_dir is None) == (scenario is None):
        raise ModelfixError("give exactly one of --clean-dir DIR and --scenario NAME",
                            hint="e.g. --clean-dir data/clean or --scenario egem-mnist")
    spec = clean_dir if clean_dir is not None else f"{scenario}:clean"
    pool = _data(spec, data_root, seed, approve_mask, class_names=card.class_names)
    _check_fits(pool, card, spec)
    approved = None
    if approve_mask is not None:
        from .explain.lrp import relevance_share

        if not 0.0 <= min_relevance <= 1.0:
            raise ModelfixError(f"--min-relevance must be in [0, 1], got {min_relevance}")
        share = relevance_share(model, pool, pool.mask)
        approved = pool.has_mask & (share >= min_relevance)
    split = refinement_split(model, pool, samples_per_class=samples, seed=seed, keep_incorrect=keep_incorrect,
                             approved=approved, batch_size=batch_size)
    if approve_mask is not None:
        split.summary["approval"] = {"mask_dir": str(approve_mask), "min_relevance": min_relevance,
                                     "missing_masks": int((~pool.has_mask).sum())}
    return spec, pool, split


def _selection(trace: dict) -> dict | None:
    """The α/λ trace as the report's selection rows (validation accuracy per setting, the chosen one marked)."""
    from .assessment import selection_rows

    rows = trace.get("selection")
    if not rows:
        return None
    key = "alpha" if "alpha" in trace else "lambda"
    values = [row[key] for row in rows]
    return {"parameter": "α" if key == "alpha" else "λ", "score_name": "validation accuracy",
            "rows": selection_rows(values, [row["val_acc"] for row in rows], values.index(trace[key])
                                   if trace[key] in values else -1, [row["passed"] for row in rows])}


def _finish(model, card, model_path, output, report_dir, command, config, trace, spec, pool, fold_info, json_output,
            clean_inputs, before=None, eval_data=None, data_root=None, seed=0):
    from .checkpoint import save_model, sha256_file
    from .cli import _assessment
    from .report import json_safe, write_repair_report

    entry = {"command": command, "method": trace["method"], "config": config, "data": _data_info(spec, pool),
             "trace": trace, "fold": fold_info}
    new_card = dataclasses.replace(card.with_history(entry),
                                   provenance={"parent": str(model_path), "parent_sha256": sha256_file(model_path),
                                               "parent_card": card.fingerprint()})
    save_model(model.cpu(), new_card, output, inputs=[model_path, *clean_inputs])
    document = {"schema": "modelfix.repair/v1", "command": command, "model": str(model_path), "output": str(output),
                **entry}
    if report_dir is not None:
        document.update(selection=_selection(trace), **_assessment(model, card, eval_data, data_root, seed, before))
        write_repair_report(report_dir, json_safe(document))
    document = json_safe({k: v for k, v in document.items() if k != "heatmaps"})
    if json_output:
        print(json.dumps(document))
        return
    _print_trace(trace, fold_info)
    out.print(f"wrote {output}" + (f" and {report_dir}/report.html" if report_dir is not None else ""))


def _print_trace(trace: dict, fold_info: dict | None) -> None:
    samples = trace.get("samples", {})
    out.print(f"[bold]{trace['method']}[/bold]: {samples.get('fit_unique')} unique fit / {samples.get('val_unique')} "
              f"unique validation samples (oversampled to {samples.get('fit_size')} / {samples.get('val_size')}), "
              f"original validation accuracy {100 * trace['val_orig']:.2f} %")
    key = "alpha" if "alpha" in trace else "lambda"
    if trace.get("selection"):
        table = Table(title=f"selection ({trace['selected_by']}, slack {trace['slack']:g} {trace['slack_mode']})")
        for col in (key, "val accuracy %", "passes"):
            table.add_column(col, justify="right")
        for row in trace["selection"]:
            mark = "✓" if row["passed"] else ""
            chosen = " ←" if row[key] == trace[key] else ""
            table.add_row(f"{row[key]:g}{chosen}", f"{100 * row['val_acc']:.2f}", mark)
        out.print(table)
    if trace.get("layers"):
        table = Table(title=f"layers (α = {trace['alpha']:g}, schedule {trace.get('schedule')})")
        for col in ("layer", "kind", "τ", "λ", "mean factor", "units", "pruned (<0.01)"):
            table.add_column(col, justify="right")
        for row in trace["layers"]:
            table.add_row(row["name"], str(row.get("kind")), f"{row['tau']:.4f}", f"{row['lambda']:.4g}",
                          f"{row['mean_factor']:.4f}", str(row.get("units")), str(row.get("pruned_units")))
        out.print(table)
    else:
        out.print(f"{trace.get('layer', '')}: λ = {trace[key]:g} (absolute {trace.get('lambda_abs', float('nan')):.4g})")
    out.print(f"validation accuracy after repair: {100 * trace['val_acc']:.2f} %; time {trace['timing']['total_s']:.2f} s")
    for warning in trace.get("warnings", []):
        err.print(f"[yellow]warning:[/yellow] {warning}", markup=True, highlight=False)
    if fold_info:
        for entry in fold_info.get("folded", []):
            out.print(f"folded {entry['key']} ({entry['kind']} at {entry['target']}) into {', '.join(entry.get('into', []))}")
        for entry in fold_info.get("kept", []):
            out.print(f"kept patch {entry['key']} ({entry['kind']} at {entry['target']}): {entry['reason']}")


@app.command("prune-egem", epilog="Example: modelfix prune-egem runs/model.safetensors --clean-dir data/clean -o runs/egem.safetensors")
@handles_errors
def prune_egem(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    output: OutputOpt,
    clean_dir: CleanDirOpt = None,
    scenario: ScenarioOpt = None,
    method: Annotated[str, typer.Option("--method", help="egem (per-unit scaling, Eq. 5), pca-egem (Eq. 6) or egem-full (LRP/GI-weighted per-weight rule, Eq. 4; experimental).", rich_help_panel="Method")] = "egem",
    pca: Annotated[bool, typer.Option("--pca", help="Shorthand for --method pca-egem.", rich_help_panel="Method")] = False,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Use this α (no selection).", rich_help_panel="Selection")] = None,
    slack: SlackOpt = 0.05,
    slack_mode: SlackModeOpt = "relative",
    layers: Annotated[Optional[str], typer.Option("--layers", help="Refinement points: comma-separated module names or globs (default: per architecture family).", rich_help_panel="Method")] = None,
    samples_per_class: SamplesOpt = 700,
    schedule: Annotated[str, typer.Option("--schedule", help="triangular (strongest at the last layer), inverse-triangular or flat.", rich_help_panel="Method")] = "triangular",
    conv_mode: Annotated[str, typer.Option("--conv-mode", help="PCA-EGEM on conv maps: sum (paper code) or position.", rich_help_panel="Method")] = "sum",
    explainer: Annotated[str, typer.Option("--explainer", help="egem-full: gi (gradient×input) or lrp-eps (zennit).", rich_help_panel="Method")] = "gi",
    fold: Annotated[Optional[bool], typer.Option("--fold/--no-fold", help="--fold: every patch must fold into stock weights (error otherwise); --no-fold: keep patches. Default: fold what folds exactly.", rich_help_panel="Output")] = None,
    keep_incorrect: KeepIncorrectOpt = False,
    approve_mask: Annotated[Optional[Path], typer.Option("--approve-mask", help="Masks of RELEVANT regions mirroring the clean folder: keep a sample only if enough of its |LRP| falls inside.", rich_help_panel="Data")] = None,
    min_relevance: Annotated[float, typer.Option("--min-relevance", help="Share of |LRP| inside the --approve-mask region needed to approve a sample.", rich_help_panel="Data")] = 0.75,
    report: ReportOpt = None,
    eval_data: EvalDataOpt = None,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    trust_checkpoint: TrustOpt = False,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    in_channels: InChannelsOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """EGEM / PCA-EGEM soft-pruning from approved samples, no training (Linhardt et al.)."""
    from .repair.egem import SCHEDULES, EgemConfig, fit_egem
    from .repair.fold import fold_patches
    from .repair.patches import patch_entries
    from .repair.selection import check_slack

    method = "pca-egem" if pca else method
    if method not in ("egem", "pca-egem", "egem-full"):
        raise ModelfixError(f"--method must be egem, pca-egem or egem-full, not '{method}'")
    if schedule not in SCHEDULES:
        raise ModelfixError(f"--schedule must be one of {', '.join(SCHEDULES)}, not '{schedule}'")
    if conv_mode not in ("sum", "position"):
        raise ModelfixError(f"--conv-mode must be sum or position, not '{conv_mode}'")
    if explainer not in ("gi", "lrp-eps"):
        raise ModelfixError(f"--explainer must be gi or lrp-eps, not '{explainer}'")
    check_slack(slack, slack_mode)
    if alpha is not None and not 0.0 < alpha <= 1.0:
        raise ModelfixError(f"--alpha must be in (0, 1], got {alpha}", hint="smaller α prunes more; 1 is the identity")
    if output.suffix != ".safetensors":
        raise ModelfixError(f"-o {output}: the output must be a .safetensors file")
    model, card = _load(model_path, trust_checkpoint, _device(device), arch, num_classes, in_channels, input_size, mean, std)
    spec, pool, split = _refinement(model, card, clean_dir, scenario, data_root, seed, samples_per_class, keep_incorrect,
                                    approve_mask, min_relevance, batch_size)
    config = EgemConfig(method=method, layers=layers, alpha=alpha, slack=slack, slack_mode=slack_mode, schedule=schedule,
                        conv_mode=conv_mode, batch_size=batch_size, explainer=explainer)
    repaired, trace = fit_egem(model, split, config)
    fold_info = None
    if patch_entries(repaired) and fold is not False:
        result = fold_patches(repaired, strict=bool(fold))
        fold_info = {"folded": result.folded, "kept": result.kept}
    settings = {"method": method, "layers": layers, "alpha": alpha, "slack": slack, "slack_mode": slack_mode,
                "schedule": schedule, "conv_mode": conv_mode, "explainer": explainer, "samples_per_class": samples_per_class,
                "keep_incorrect": keep_incorrect, "seed": seed, "fold": fold}
    _finish(repaired, card, model_path, output, report, "prune-egem", settings, trace, spec, pool, fold_info, json_output,
            [Path(p) for p in (clean_dir, approve_mask) if p], model, eval_data, data_root, seed)


@app.command("refit", epilog="Example: modelfix refit runs/model.safetensors --clean-dir data/clean --method rgem -o runs/rgem.safetensors")
@handles_errors
def refit(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    output: OutputOpt,
    clean_dir: CleanDirOpt = None,
    scenario: ScenarioOpt = None,
    method: Annotated[str, typer.Option("--method", help="rgem (fit the original logits) or ridge (fit one-hot labels).", rich_help_panel="Method")] = "rgem",
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Ridge penalty relative to the mean feature second moment (no selection).", rich_help_panel="Selection")] = None,
    slack: SlackOpt = 0.05,
    slack_mode: SlackModeOpt = "relative",
    samples_per_class: SamplesOpt = 700,
    keep_incorrect: KeepIncorrectOpt = False,
    report: ReportOpt = None,
    eval_data: EvalDataOpt = None,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    trust_checkpoint: TrustOpt = False,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    in_channels: InChannelsOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """RGEM / Ridge: closed-form float64 refit of the last linear layer on approved samples."""
    from .repair.lastlayer import METHODS, RefitConfig, fit_refit
    from .repair.selection import check_slack

    if method not in METHODS:
        raise ModelfixError(f"--method must be one of {', '.join(METHODS)}, not '{method}'")
    check_slack(slack, slack_mode)
    if lam is not None and not lam > 0:
        raise ModelfixError(f"--lambda must be positive, got {lam}")
    if output.suffix != ".safetensors":
        raise ModelfixError(f"-o {output}: the output must be a .safetensors file")
    model, card = _load(model_path, trust_checkpoint, _device(device), arch, num_classes, in_channels, input_size, mean, std)
    from .zoo import last_linear

    last_linear(model.net)  # a model without a linear head fails here, before any data is read
    spec, pool, split = _refinement(model, card, clean_dir, scenario, data_root, seed, samples_per_class, keep_incorrect,
                                    batch_size=batch_size)
    config = RefitConfig(method=method, lam=lam, slack=slack, slack_mode=slack_mode, batch_size=batch_size)
    repaired, trace = fit_refit(model, split, config)
    settings = {"method": method, "lambda": lam, "slack": slack, "slack_mode": slack_mode,
                "samples_per_class": samples_per_class, "keep_incorrect": keep_incorrect, "seed": seed}
    _finish(repaired, card, model_path, output, report, "refit", settings, trace, spec, pool, None, json_output,
            [Path(clean_dir)] if clean_dir else [], model, eval_data, data_root, seed)
