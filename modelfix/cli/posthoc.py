"""The post-hoc repair commands (`prune-egem`, `refit`): load, build the refinement set, fit, fold, save, report.

Registered on the main Typer app when `modelfix.cli` is imported; no algorithms live here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..errors import ModelfixError
from .base import app, finish_repair, handles_errors, out
from .config import recorded_invocation
from .options import (data_options, ArtifactOpt, DataRootOpt, DeviceOpt, EvalDataOpt, JsonOpt, OverwriteOpt, SeedOpt, StrictOpt,
                     checkpoint_options, repair_job_common)

CleanDirOpt = Annotated[Optional[str], typer.Option("--clean-dir", help="Approved samples: an image folder DIR/<class>/..., a .npz/.safetensors bundle, or SCENARIO:SPLIT.", rich_help_panel="Data")]
ScenarioOpt = Annotated[Optional[str], typer.Option("--scenario", help="Use the built-in clean pool of a scenario (its `clean` split) instead of --clean-dir.", rich_help_panel="Data")]
SamplesOpt = Annotated[int, typer.Option("--samples-per-class", help="N refinement samples per class (oversampled if fewer; 20 % of them validate).", rich_help_panel="Data")]
KeepIncorrectOpt = Annotated[bool, typer.Option("--keep-incorrect", help="Also use samples the model gets wrong (the paper uses correctly predicted ones only).", rich_help_panel="Data")]
SlackOpt = Annotated[float, typer.Option("--slack", help="Strongest setting whose validation accuracy is ≥ (1 − s)·original.", rich_help_panel="Selection")]
SlackModeOpt = Annotated[str, typer.Option("--slack-mode", help="relative ((1 − s)·original) or absolute (original − s).", rich_help_panel="Selection")]
OutputOpt = Annotated[Path, typer.Option("-o", "--output", help="Where to write the repaired .safetensors.", rich_help_panel="Output")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Also write results.json, report.md and report.html (before/after metrics, selection trace, heatmaps) into this folder.", rich_help_panel="Output")]
BatchOpt = Annotated[int, typer.Option("--batch-size", rich_help_panel="Runtime")]
RuleOpt = Annotated[str, typer.Option("--select", help="counterfactual: the best worst-group accuracy (class × artifact) with the artifact (--artifact, else the card's) pasted on half the validation items, among the settings within the slack; paper: the strongest setting within the slack.", rich_help_panel="Selection")]


def _clean_spec(clean_dir: str | None, scenario: str | None) -> str:
    if (clean_dir is None) == (scenario is None):
        raise ModelfixError("give exactly one of --clean-dir DIR and --scenario NAME",
                            hint="e.g. --clean-dir data/clean or --scenario egem-mnist")
    return clean_dir if clean_dir is not None else f"{scenario}:clean"


def _finish(result, document: dict, output, report, json_output: bool, strict: bool) -> None:
    """Render a post-hoc repair: the JSON document, or the selection and layer tables, the warnings and the verdict."""
    finish_repair(document, output, report, json_output, strict,
                  lambda: _print_trace(document["trace"], document.get("fold")))


def _print_trace(trace: dict, fold_info: dict | None) -> None:
    samples = trace.get("samples", {})
    out.print(Text.assemble((str(trace["method"]), "bold"),
                            f": {samples.get('fit_unique')} unique fit / {samples.get('val_unique')} "
                            f"unique validation samples (oversampled to {samples.get('fit_size')} / "
                            f"{samples.get('val_size')}), original validation accuracy {100 * trace['val_orig']:.2f} %"))
    key = "alpha" if "alpha" in trace else "lambda"
    if trace.get("selection"):
        rule = trace.get("rule") or f"slack {trace['slack']:g} {trace['slack_mode']}"
        table = Table(title=f"selection ({rule})")
        for col in (key, "val accuracy %", "passes", "cf worst group %"):
            table.add_column(col, justify="right")
        for row in trace["selection"]:
            mark = "✓" if row["passed"] else ""
            chosen = " ←" if row[key] == trace[key] else ""
            cf = "–" if row.get("cf_worst") is None else f"{100 * row['cf_worst']:.2f}"
            table.add_row(f"{row[key]:g}{chosen}", f"{100 * row['val_acc']:.2f}", mark, cf)
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
    if fold_info:
        for entry in fold_info.get("folded", []):
            out.print(f"folded {entry['key']} ({entry['kind']} at {entry['target']}) into {', '.join(entry.get('into', []))}")
        for entry in fold_info.get("kept", []):
            out.print(f"kept patch {entry['key']} ({entry['kind']} at {entry['target']}): {entry['reason']}")


@app.command("prune-egem", epilog="Example: modelfix prune-egem runs/model.safetensors --clean-dir data/clean -o runs/egem.safetensors")
@handles_errors
@checkpoint_options
@data_options
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
    select: RuleOpt = "counterfactual",
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
    artifact: ArtifactOpt = None,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """EGEM / PCA-EGEM soft-pruning from approved samples, no training (Linhardt et al.)."""
    from ..app.repair import RepairJob, repair_files

    method = "pca-egem" if pca else method
    if method not in ("egem", "pca-egem", "egem-full"):
        raise ModelfixError(f"--method must be egem, pca-egem or egem-full, not '{method}'")
    if conv_mode not in ("sum", "position"):
        raise ModelfixError(f"--conv-mode must be sum or position, not '{conv_mode}'")
    if explainer not in ("gi", "lrp-eps"):
        raise ModelfixError(f"--explainer must be gi or lrp-eps, not '{explainer}'")
    if not 0.0 <= min_relevance <= 1.0:  # checked even without --approve-mask: a typo must not pass silently
        raise ModelfixError(f"--min-relevance must be in [0, 1], not {min_relevance}")
    options = {"alpha": alpha, "slack": slack, "slack_mode": slack_mode, "schedule": schedule, "layers": layers,
               "samples_per_class": samples_per_class, "keep_incorrect": keep_incorrect, "fold": fold,
               "min_relevance": min_relevance if approve_mask is not None else None, "select": select}
    if method == "pca-egem":
        options["conv_mode"] = conv_mode
    if method == "egem-full":
        options["explainer"] = explainer
    settings = {"method": method, "layers": layers, "alpha": alpha, "slack": slack, "slack_mode": slack_mode,
                "schedule": schedule, "conv_mode": conv_mode, "explainer": explainer, "samples_per_class": samples_per_class,
                "keep_incorrect": keep_incorrect, "seed": seed, "fold": fold, "select": select}
    job = RepairJob("prune-egem", method, output, model_path, options=options, clean=_clean_spec(clean_dir, scenario),
                    approve_mask=approve_mask, report=report, eval_data=eval_data, artifact=artifact,
                    config=settings, **repair_job_common(seed, device, batch_size, overwrite, data_root, checkpoint))
    job.invocation, job.reading = recorded_invocation(), reading or {}
    result, document = repair_files(job)
    _finish(result, document, output, report, json_output, strict)


@app.command("refit", epilog="Example: modelfix refit runs/model.safetensors --clean-dir data/clean --method rgem -o runs/rgem.safetensors")
@handles_errors
@checkpoint_options
@data_options
def refit(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    output: OutputOpt,
    clean_dir: CleanDirOpt = None,
    scenario: ScenarioOpt = None,
    method: Annotated[str, typer.Option("--method", help="rgem (fit the original logits) or ridge (fit one-hot labels).", rich_help_panel="Method")] = "rgem",
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Ridge penalty relative to the mean feature second moment (no selection).", rich_help_panel="Selection")] = None,
    slack: SlackOpt = 0.05,
    slack_mode: SlackModeOpt = "relative",
    select: RuleOpt = "counterfactual",
    samples_per_class: SamplesOpt = 700,
    keep_incorrect: KeepIncorrectOpt = False,
    report: ReportOpt = None,
    eval_data: EvalDataOpt = None,
    artifact: ArtifactOpt = None,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """RGEM / Ridge: closed-form float64 refit of the last linear layer on approved samples."""
    from ..app.repair import RepairJob, repair_files

    if method not in ("rgem", "ridge"):
        raise ModelfixError(f"--method must be one of rgem, ridge, not '{method}'")
    if lam is not None and not lam > 0:
        raise ModelfixError(f"--lambda must be positive, got {lam}")
    options = {"lam": lam, "slack": slack, "slack_mode": slack_mode, "samples_per_class": samples_per_class,
               "keep_incorrect": keep_incorrect, "select": select}
    settings = {"method": method, "lambda": lam, "slack": slack, "slack_mode": slack_mode,
                "samples_per_class": samples_per_class, "keep_incorrect": keep_incorrect, "seed": seed, "select": select}
    job = RepairJob("refit", method, output, model_path, options=options, clean=_clean_spec(clean_dir, scenario),
                    report=report, eval_data=eval_data, artifact=artifact, config=settings,
                    **repair_job_common(seed, device, batch_size, overwrite, data_root, checkpoint))
    job.invocation, job.reading = recorded_invocation(), reading or {}
    result, document = repair_files(job)
    _finish(result, document, output, report, json_output, strict)
