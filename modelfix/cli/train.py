"""The training commands: `train` (random init), `finetune` (a checkpoint), `annotate` (teacher masks), `methods`.

`train --method M` and `finetune --method M` run the same registered objective through the one training loop and
the same λ sweep (`repair.finetune`); they differ only in where the weights start. Registered on the main Typer
app when `modelfix.cli` is imported; no algorithms live here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..app.resolve import check_fits, device_name, load_checkpoint, load_dataset, parse_floats
from ..errors import ModelfixError
from .base import app, finish_repair, handles_errors, out
from .config import recorded_invocation
from .options import (schedule_options, data_options, ArtifactOpt, DataRootOpt, DeviceOpt, EvalDataOpt, JsonOpt, MasksOpt, MeanOpt, OverwriteOpt,
                     SeedOpt, StdOpt, StrictOpt, checkpoint_options, repair_job_common)

# ---- options shared by train and finetune ---------------------------------------------------------------------------

MethodOpt = Annotated[str, typer.Option("--method", help="erm, retrain, erm-l2, tap, rrr, rbr, crayon-attention, r4-rand, r4-adv, r4-cert, smooth-rrr, ibp-ex, ibp-ex-rrr or pgd-ex (see `modelfix methods`).", rich_help_panel="Method")]
LambdaOpt = Annotated[Optional[str], typer.Option("--lambda", help="Penalty weight; a comma-separated list runs a sweep chosen on --val; auto (the default for methods with a weight, but crayon-attention) calibrates λ₀ = task/penalty on the first batches and sweeps λ₀·{0.1, 1, 10}.", rich_help_panel="Method")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="TAP: comma-separated module names to hook (default: per architecture family).", rich_help_panel="Method")]
TapNormOpt = Annotated[Optional[str], typer.Option("--tap-norm", help="TAP: squared (default) or l1 (the paper's Eq. 8).", rich_help_panel="Method")]
TargetOpt = Annotated[Optional[str], typer.Option("--rrr-target", help="RRR: log-prob-sum (Ross/TAP, default), loss (R4) or logit-sum (Heo).", rich_help_panel="Method")]
FeedbackOpt = Annotated[Optional[Path], typer.Option("--feedback", help="crayon-attention: yes/no/maybe verdicts per training sample (samples.csv, YAML or JSON).", rich_help_panel="Method")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="crayon-attention: weight of the yes-sample term (default 0); ibp-ex/ibp-ex-rrr: weight α of the plain CE (default 0.5).", rich_help_panel="Method")]
BetaOpt = Annotated[Optional[float], typer.Option("--beta", help="crayon-attention: weight of the no-sample term (default 30; --lambda sweeps it).", rich_help_panel="Method")]
CrayonLossOpt = Annotated[Optional[str], typer.Option("--crayon-loss", help="crayon-attention: preprint (default) or normalized (the released code's variant).", rich_help_panel="Method")]
EpsOpt = Annotated[Optional[float], typer.Option("--eps", help="r4-rand/r4-adv/smooth-rrr/pgd-ex/r4-cert/ibp-ex/ibp-ex-rrr: perturbation radius in pixel units (box x ± ε·M).", rich_help_panel="Method")]
SamplesOpt = Annotated[Optional[int], typer.Option("--samples", help="r4-rand/smooth-rrr: perturbed copies per image.", rich_help_panel="Method")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="r4-adv/pgd-ex: PGD steps.", rich_help_panel="Method")]
RampOpt = Annotated[bool, typer.Option("--ramp", help="ibp-ex/ibp-ex-rrr: Heo's per-epoch schedules, α from --alpha to --alpha/2 and ε from --eps-start to --eps-start + --eps.", rich_help_panel="Method")]
EpsStartOpt = Annotated[Optional[float], typer.Option("--eps-start", help="ibp-ex/ibp-ex-rrr with --ramp: ε of the first epoch (default 0).", rich_help_panel="Method")]
StepSizeOpt = Annotated[Optional[float], typer.Option("--step-size", help="r4-adv/pgd-ex: PGD step (default ε/4 for r4-adv, ε/steps for pgd-ex).", rich_help_panel="Method")]
ValOpt = Annotated[Optional[str], typer.Option("--val", help="Validation data: per-epoch accuracy, --select best, and the choice between several --lambda values.", rich_help_panel="Data")]
SelectByOpt = Annotated[str, typer.Option("--select-by", help="Choose among --lambda values: counterfactual (worst group with the artifact pasted on half of --val, within a 5 % clean-accuracy slack), or the papers' rules accuracy (= paper) or loss.", rich_help_panel="Method")]
DataOpt = Annotated[str, typer.Option("--data", help="Training data: a folder, a .npz/.safetensors bundle or SCENARIO[:SPLIT].", rich_help_panel="Data")]
OptimizerOpt = Annotated[Optional[str], typer.Option("--optimizer", help="sgd (with momentum), adam or adamw (default: the method's, else adam).", rich_help_panel="Training")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Learning rate (default: the method's, else 1e-3).", rich_help_panel="Training")]
EpochsOpt = Annotated[int, typer.Option("--epochs", rich_help_panel="Training")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", rich_help_panel="Training")]
WeightDecayOpt = Annotated[Optional[float], typer.Option("--weight-decay", help="Weight decay (default: the method's, else 0).", rich_help_panel="Training")]
MomentumOpt = Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum (default 0.9).", rich_help_panel="Training")]
LossOpt = Annotated[str, typer.Option("--loss", help="ce (softmax cross-entropy), bce (one-hot BCE, the EGEM paper) or double-softmax (R4's CE of softmax outputs; for reproducing R4 only).", rich_help_panel="Training")]
GradClipOpt = Annotated[Optional[float], typer.Option("--grad-clip", help="Clip the gradient norm (default: the method's, else none).", rich_help_panel="Training")]
SelectOpt = Annotated[str, typer.Option("--select", help="final, or best (best validation accuracy) epoch of each run.", rich_help_panel="Training")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Also write results.json, report.md and report.html (before/after metrics, the λ sweep, heatmaps) into this folder.", rich_help_panel="Output")]


def _config(method, optimizer, lr, epochs, batch_size, weight_decay, momentum, seed, loss, grad_clip, select,
            schedule: dict | None = None, device: str = "cpu"):
    """TrainConfig: defaults < the method's `train_defaults` < what the user passed; fp16 off CUDA refused here."""
    from ..precision import check_precision
    from ..training import TrainConfig

    given = {"optimizer": optimizer, "lr": lr, "grad_clip": grad_clip, "momentum": momentum,
             "weight_decay": weight_decay}
    fields = {**method.train_defaults, **{k: v for k, v in given.items() if v is not None}, **(schedule or {})}
    config = TrainConfig(epochs=epochs, batch_size=batch_size, seed=seed, loss=loss, select=select, **fields)
    check_precision(config.precision, device_name(device))
    return config


def _hparams(method, layers, tap_norm, rrr_target, alpha=None, beta=None, crayon_loss=None, eps=None, samples=None,
             steps=None, step_size=None, ramp=False, eps_start=None) -> dict:
    """Method options the user gave, each refused on a method it does not apply to."""
    layer_key = "layer" if "layer" in method.hyperparameters else "layers"  # Grad-CAM takes one layer, TAP several
    given = {layer_key: ("--layers", layers), "norm": ("--tap-norm", tap_norm), "target": ("--rrr-target", rrr_target),
             "alpha": ("--alpha", alpha), "beta": ("--beta", beta), "variant": ("--crayon-loss", crayon_loss),
             "eps": ("--eps", eps), "samples": ("--samples", samples), "steps": ("--steps", steps),
             "step_size": ("--step-size", step_size), "ramp": ("--ramp", ramp or None),
             "eps_start": ("--eps-start", eps_start)}
    hparams = {}
    for key, (option, value) in given.items():
        if value is None:
            continue
        if key not in method.hyperparameters:
            raise ModelfixError(f"{option} does not apply to method '{method.name}'")
        hparams[key] = value
    return hparams


def _options(config, hparams: dict, lambdas: str | None, select_by: str) -> dict:
    """The flat option dict of a fine-tune: TrainConfig fields, the method's hyper-parameters, the λ sweep."""
    auto = lambdas is not None and lambdas.strip().lower() == "auto"
    return {**config.to_dict(), **hparams, "lambdas": "auto" if auto else parse_floats(lambdas, "--lambda"),
            "select_by": select_by}


def _finetune_method(name: str):
    from ..repair.registry import get_method

    method = get_method(name)
    if method.kind != "finetune":
        raise ModelfixError(f"'{name}' is a post-hoc method; it runs through its own command",
                            hint="prune-egem for egem/pca-egem/egem-full, refit for rgem/ridge")
    return method


def _print_sweep(doc: dict) -> None:
    sweep = doc["sweep"]
    table = Table(title=f"{doc['command']} --method {doc['method']}: "
                        f"{len(sweep['runs'])} run(s), chosen by {sweep['select_by'] or '– (one run)'}")
    for col in ("λ", "final loss", "task", "penalty", "val acc %", "cf worst %", "val loss", "s"):
        table.add_column(col, justify="right")
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for run in sweep["runs"]:
        lam = "–" if run["lambda"] is None else f"{run['lambda']:g}" + (" diverged" if run.get("diverged") else "")
        table.add_row(lam + (" ←" if run["chosen"] else ""), fmt(run["final_loss"], ".4f"), fmt(run["final_task"], ".4f"),
                      fmt(run["final_penalty"], ".4g"),
                      fmt(None if run.get("val_accuracy") is None else 100 * run["val_accuracy"], ".2f"),
                      fmt(None if run.get("cf_worst_group") is None else 100 * run["cf_worst_group"], ".2f"),
                      fmt(run.get("val_loss"), ".4f"), fmt(run["seconds"], ".1f"))
    out.print(table)


def _run(job, json_output: bool, strict: bool) -> None:
    """Run the job through the application layer and render its sweep, verdict and warnings."""
    from ..app.repair import repair_files

    if job.feedback is None and "verdicts" in _finetune_method(job.method).hyperparameters:
        raise ModelfixError(f"method '{job.method}' needs --feedback FILE (yes/no/maybe per training sample)",
                            hint="`modelfix feedback saliency` writes a blank samples.csv; `feedback simulate` fills one")
    if job.feedback is not None and "verdicts" not in _finetune_method(job.method).hyperparameters:
        raise ModelfixError(f"--feedback does not apply to method '{job.method}'", hint="it feeds crayon-attention")
    _, doc = repair_files(job)

    def describe() -> None:
        _print_sweep(doc)
        if "train_accuracy" in doc:
            out.print(f"training accuracy {100 * doc['train_accuracy']:.2f} %")

    finish_repair(doc, job.output, job.report, json_output, strict, describe)


# ---- commands -----------------------------------------------------------------------------------------------------


@app.command(epilog="Example: modelfix train --arch mlp --data decoy-digits:train -o runs/shortcut.safetensors")
@handles_errors
@data_options
@schedule_options
def train(
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the trained .safetensors.", rich_help_panel="Output")],
    arch: Annotated[str, typer.Option("--arch", help="Architecture (see `modelfix archs`).", rich_help_panel="Model")] = "mlp",
    data: DataOpt = "decoy-digits:train",
    val: ValOpt = None,
    masks: MasksOpt = None,
    data_root: DataRootOpt = None,
    method: MethodOpt = "erm",
    lambdas: LambdaOpt = None,
    layers: LayersOpt = None,
    tap_norm: TapNormOpt = None,
    rrr_target: TargetOpt = None,
    feedback: FeedbackOpt = None,
    alpha: AlphaOpt = None,
    beta: BetaOpt = None,
    crayon_loss: CrayonLossOpt = None,
    eps: EpsOpt = None,
    samples: SamplesOpt = None,
    steps: StepsOpt = None,
    step_size: StepSizeOpt = None,
    ramp: RampOpt = False,
    eps_start: EpsStartOpt = None,
    select_by: SelectByOpt = "counterfactual",
    optimizer: OptimizerOpt = None,
    lr: LrOpt = None,
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 128,
    weight_decay: WeightDecayOpt = None,
    momentum: MomentumOpt = None,
    loss: LossOpt = "ce",
    grad_clip: GradClipOpt = None,
    select: SelectOpt = "final",
    report: ReportOpt = None,
    eval_data: EvalDataOpt = None,
    artifact: ArtifactOpt = None,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    reading: Optional[dict] = None,
    schedule: Optional[dict] = None,
) -> None:
    """Train a model from random initialisation, with plain ERM or a guided objective (how the papers train)."""
    import torch

    from ..app.repair import RepairJob
    from ..card import InputSpec, ModelCard
    from ..zoo import build_model, default_input_spec

    entry = _finetune_method(method)
    config = _config(entry, optimizer, lr, epochs, batch_size, weight_decay, momentum, seed, loss, grad_clip, select,
                     schedule, device)
    hparams = _hparams(entry, layers, tap_norm, rrr_target, alpha, beta, crayon_loss, eps, samples, steps, step_size, ramp,
                       eps_start)
    dev = device_name(device)
    base = default_input_spec(arch)
    probe = load_dataset(data, data_root, seed, masks, reading=reading, stream=True)  # the data decide channels, size and classes of a new model
    c, h, w = probe.shape
    spec = InputSpec(channels=c, height=h, width=w,
                     mean=parse_floats(mean, "--mean") or (base.mean if len(base.mean) in (1, c) else (base.mean[0],)),
                     std=parse_floats(std, "--std") or (base.std if len(base.std) in (1, c) else (base.std[0],)))
    card = ModelCard(arch=arch, num_classes=probe.num_classes, input=spec, class_names=list(probe.class_names),
                     artifact=probe.info.get("artifact"),
                     dataset={"spec": data, "checksum": probe.checksum(), "n": len(probe),
                              "seed": seed, "scenario": probe.info.get("scenario")},
                     provenance={"source": "random initialisation"})
    torch.manual_seed(seed)
    model = build_model(card).to(dev)
    job = RepairJob("train", method, output, model_and_card=(model, card), train_accuracy=True, options=_options(config, hparams, lambdas, select_by),
                    data=data, masks=masks, val=val, feedback=feedback, report=report, eval_data=eval_data,
                    artifact=artifact, data_root=data_root, seed=seed, device=dev, batch_size=batch_size,
                    overwrite=overwrite, config=config.to_dict())
    job.invocation, job.reading = recorded_invocation(), reading or {}
    job.loaded = probe if hasattr(probe, "x") else None  # in memory: read once; a lazy source reopens at the card's size
    _run(job, json_output, strict)


@app.command(epilog="Example: modelfix finetune runs/shortcut.safetensors --method rrr --data decoy-digits:train --val decoy-digits:val -o runs/rrr.safetensors")
@handles_errors
@checkpoint_options
@data_options
@schedule_options
def finetune(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the fine-tuned .safetensors.", rich_help_panel="Output")],
    method: MethodOpt = "rrr",  # the one that works from a shortcut checkpoint untuned (docs/benchmarks.md)
    data: DataOpt = "decoy-digits:train",
    masks: MasksOpt = None,
    val: ValOpt = None,
    data_root: DataRootOpt = None,
    lambdas: LambdaOpt = None,
    layers: LayersOpt = None,
    tap_norm: TapNormOpt = None,
    rrr_target: TargetOpt = None,
    feedback: FeedbackOpt = None,
    alpha: AlphaOpt = None,
    beta: BetaOpt = None,
    crayon_loss: CrayonLossOpt = None,
    eps: EpsOpt = None,
    samples: SamplesOpt = None,
    steps: StepsOpt = None,
    step_size: StepSizeOpt = None,
    ramp: RampOpt = False,
    eps_start: EpsStartOpt = None,
    select_by: SelectByOpt = "counterfactual",
    optimizer: OptimizerOpt = None,
    lr: LrOpt = None,
    epochs: EpochsOpt = 5,
    batch_size: BatchSizeOpt = 128,
    weight_decay: WeightDecayOpt = None,
    momentum: MomentumOpt = None,
    loss: LossOpt = "ce",
    grad_clip: GradClipOpt = None,
    select: SelectOpt = "final",
    report: ReportOpt = None,
    eval_data: EvalDataOpt = None,
    artifact: ArtifactOpt = None,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
    schedule: Optional[dict] = None,
) -> None:
    """Fine-tune a checkpoint with a guided objective (TAP, RRR, RBR, the R4 family, IBP-Ex, PGD-Ex, CRAYON-ATTENTION)
    or a baseline (retrain, erm-l2, erm)."""
    from ..app.repair import RepairJob

    entry = _finetune_method(method)
    config = _config(entry, optimizer, lr, epochs, batch_size, weight_decay, momentum, seed, loss, grad_clip, select,
                     schedule, device)
    hparams = _hparams(entry, layers, tap_norm, rrr_target, alpha, beta, crayon_loss, eps, samples, steps, step_size, ramp,
                       eps_start)
    job = RepairJob("finetune", method, output, model_path, options=_options(config, hparams, lambdas, select_by),
                    data=data, masks=masks, val=val, feedback=feedback, report=report, eval_data=eval_data,
                    artifact=artifact, config=config.to_dict(),
                    **repair_job_common(seed, device, batch_size, overwrite, data_root, checkpoint))
    job.invocation, job.reading = recorded_invocation(), reading or {}
    _run(job, json_output, strict)


@app.command(epilog="Example: modelfix annotate runs/teacher.safetensors --data data/train --tau 0.01 -o masks/")
@handles_errors
@checkpoint_options
@data_options
def annotate(
    teacher_path: Annotated[Path, typer.Argument(metavar="TEACHER", help="A model trained on a small clean split (a .safetensors checkpoint).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="A new mask folder mirroring an image folder, or a .npz/.safetensors bundle (any data).", rich_help_panel="Output")],
    data: DataOpt = "decoy-digits:train",
    tau: Annotated[float, typer.Option("--tau", help="Fraction of pixels per image to mark: the τ·H·W least salient ones.")] = 0.01,
    random: Annotated[bool, typer.Option("--random", help="Random annotation baseline: τ·H·W random pixels per image (the teacher is only used for its classes and input size).")] = False,
    data_root: DataRootOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", rich_help_panel="Runtime")] = 256,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """Teacher masks: per image, the τ-fraction of pixels with the lowest input-gradient saliency of the teacher."""
    from ..repair.annotate import annotate as run_annotate
    from ..repair.annotate import check_tau, mask_size, write_masks

    check_tau(tau)
    if batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, not {batch_size}")
    from ..app.outputs import OutputPlan

    bundle = output.suffix in (".npz", ".safetensors")
    OutputPlan(folder=None if bundle else output, files=[output] if bundle else [], inputs=[teacher_path, data],
               folder_option="-o").check()
    model, card = load_checkpoint(teacher_path, device=device_name(device), **checkpoint)
    dataset = load_dataset(data, data_root, seed, card=card, reading=reading)
    check_fits(dataset, card, data)
    masked = run_annotate(None if random else model, dataset, tau=tau, random=random, seed=seed, batch_size=batch_size)
    from ..distributed import on_main

    on_main(lambda: write_masks(masked, output))  # under torchrun: rank 0, once every process has its masks
    written = output
    _, h, w = dataset.shape
    summary = {"output": str(written), "images": len(dataset), "tau": tau, "pixels_per_image": mask_size(tau, h * w),
               "kind": "random" if random else "teacher-saliency", "teacher": str(teacher_path)}
    if json_output:
        print(json.dumps(summary))
        return
    out.print(f"wrote {summary['pixels_per_image']} {'random' if random else 'least-salient'} pixels per image for "
              f"{len(dataset)} images to {written}")


@app.command("methods")
@handles_errors
def methods_cmd(json_output: JsonOpt = False) -> None:
    """Every repair method: what it does, its paper, its hyper-parameters and defaults."""
    from ..repair.registry import list_methods

    inputs = ("data", "verdicts")  # filled from --data and --feedback, not options
    rows = [{"name": m.name, "kind": m.kind, "command": m.command, "summary": m.summary, "paper": m.paper,
             "needs": list(m.needs), "needs_masks": m.needs_masks,
             "needs_feedback": any(n.endswith("feedback") for n in m.needs), "lambda": m.weight,
             "hyperparameters": {k: v for k, v in m.hyperparameters.items() if k not in inputs},
             "train_defaults": m.train_defaults} for m in list_methods()]
    if json_output:
        print(json.dumps(rows))
        return
    for kind, command in (("posthoc", "post-hoc: `prune-egem` / `refit`"), ("pruning", "pruning: `prune-crayon`"),
                          ("finetune", "fine-tunes: `finetune` / `train --method`")):
        out.print(Text(command, style="bold"), highlight=False)
        for row in (r for r in rows if r["kind"] == kind):
            hp = ", ".join(f"{k}={v}" for k, v in row["hyperparameters"].items()) or "none"
            needs = " (needs masks)" if row["needs_masks"] else " (needs --feedback)" if row["needs_feedback"] else ""
            out.print(Text.assemble("  ", (row["name"], "bold"), f": {row['summary']}{needs}"), highlight=False)
            out.print(f"      paper: {row['paper']}", highlight=False)
            out.print(f"      hyper-parameters: {hp}" + (f"; --lambda sets {row['lambda']}" if row["lambda"] else ""),
                      highlight=False)
            if row["train_defaults"]:
                out.print("      training defaults: " + ", ".join(f"{k}={v}" for k, v in row["train_defaults"].items()),
                          highlight=False)
