"""Option types shared by several commands (one definition each)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel="Runtime")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for data generation, poisoning and training.", rich_help_panel="Runtime")]
DataRootOpt = Annotated[Optional[Path], typer.Option("--data-root", help="Folder with MNIST/raw/*.gz for the MNIST scenarios (default: $MODELFIX_DATA).", rich_help_panel="Data")]
MasksOpt = Annotated[Optional[Path], typer.Option("--masks", help="Masks (1 = spurious): a folder mirroring an image folder, or a .npz/.safetensors bundle of the same items.", rich_help_panel="Data")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow unpickling a full pickled model. Only for files you trust.", rich_help_panel="Model")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture for a checkpoint without a model card (see `modelfix archs`).", rich_help_panel="Model")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="Number of classes (card-less checkpoints).", rich_help_panel="Model")]
InChannelsOpt = Annotated[Optional[int], typer.Option("--in-channels", help="Input channels (card-less checkpoints).", rich_help_panel="Model")]
InputSizeOpt = Annotated[Optional[str], typer.Option("--input-size", help="Input size HxW, e.g. 28x28 (card-less checkpoints).", rich_help_panel="Model")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean, comma-separated (card-less checkpoints).", rich_help_panel="Model")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Per-channel std, comma-separated (card-less checkpoints).", rich_help_panel="Model")]
EvalDataOpt = Annotated[Optional[str], typer.Option("--eval-data", help="With --report: test data for the before/after accuracy (clean and poisoned), artifact reliance and heatmaps (a folder, bundle or SCENARIO[:SPLIT]; default: the test split of the model's scenario).", rich_help_panel="Output")]


ArtifactOpt = Annotated[Optional[str], typer.Option("--artifact", help="Artifact spec or YAML file: pasted by the counterfactual selection and for the before/after evaluation on poisoned data (default: the one on the model card).", rich_help_panel="Output")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output that modelfix did not write.", rich_help_panel="Output")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 when the repair ends with a warning (a no-op, a missing class, a collapsed class, a grid edge, a shortcut that remains or was not checked, clean accuracy down more than 5 points).", rich_help_panel="Output")]


def repair_job_common(seed: int, device: str, batch_size: int, overwrite: bool, data_root, checkpoint: dict) -> dict:
    """The RepairJob fields every repair command fills the same way (`checkpoint` from `checkpoint_options`)."""
    from ..app.resolve import device_name

    overrides = {k: v for k, v in checkpoint.items() if k != "trust"}
    return {"seed": seed, "device": device_name(device), "batch_size": batch_size, "trust": checkpoint["trust"],
            "overwrite": overwrite, "data_root": data_root, "overrides": overrides}


CHECKPOINT_OPTIONS = (("trust_checkpoint", TrustOpt, False), ("arch", ArchOpt, None), ("num_classes", NumClassesOpt, None),
                      ("in_channels", InChannelsOpt, None), ("input_size", InputSizeOpt, None), ("mean", MeanOpt, None),
                      ("std", StdOpt, None))


def checkpoint_options(command: Callable) -> Callable:
    """Give a command the options of a card-less checkpoint (`--trust-checkpoint`, `--arch`, `--num-classes`,
    `--in-channels`, `--input-size`, `--mean`, `--std`), declared once, here: the command receives them as one
    keyword `checkpoint: dict`, ready for `modelfix.app.resolve.load_checkpoint(path, device=…, **checkpoint)`."""
    def pack(values: dict) -> dict:
        return {"trust": values.pop("trust_checkpoint"), **values}

    return option_group(command, "checkpoint", CHECKPOINT_OPTIONS, pack)


ResizeOpt = Annotated[Optional[str], typer.Option("--resize", help="Bring images of other sizes to the model's input: shorter (shorter side to size/crop-pct, centre crop), plain, or none (same size required). Masks follow with nearest neighbours.", rich_help_panel="Data")]
CropPctOpt = Annotated[float, typer.Option("--crop-pct", help="--resize shorter: the centre crop's share of the resized image (timm's convention).", rich_help_panel="Data")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="DataLoader worker processes decoding images (0: in this process).", rich_help_panel="Data")]
SkipBadOpt = Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images (listed in the log and counted) instead of stopping.", rich_help_panel="Data")]
MaxPixelsOpt = Annotated[int, typer.Option("--max-pixels", help="Refuse images larger than this many pixels, from the header (decompression bombs).", rich_help_panel="Data")]
ColumnOpt = Annotated[Optional[str], typer.Option("--columns", help="Manifest columns as path=COL,label=COL[,mask=COL,group=COL] (default: path,label,mask,group).", rich_help_panel="Data")]
DATA_OPTIONS = (("resize", ResizeOpt, None), ("crop_pct", CropPctOpt, 0.875), ("workers", WorkersOpt, 0),
                ("skip_bad", SkipBadOpt, False), ("max_pixels", MaxPixelsOpt, 2**28), ("columns", ColumnOpt, None))


def data_options(command: Callable) -> Callable:
    """Give a command the options of how images are read (`--resize`, `--crop-pct`, `--workers`, `--skip-bad`,
    `--max-pixels`, `--columns`), declared once, here: the command receives them as one keyword `reading: dict`,
    ready for `modelfix.app.resolve.load_dataset(..., reading=reading)`."""
    return option_group(command, "reading", DATA_OPTIONS, lambda values: values)


def option_group(command: Callable, keyword: str, options: tuple, pack: Callable[[dict], dict]) -> Callable:
    """`command` with the `options` ((name, annotated type, default), …) added to its signature; their values reach
    it packed into one keyword argument `keyword`."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name, _, _ in options}
        return command(*args, **{keyword: pack(values)}, **kwargs)

    wrapper.__signature__ = extended_signature(command, options, drop=keyword)
    return wrapper


def extended_signature(command: Callable, options, drop: str | None = None) -> inspect.Signature:
    """`command`'s signature (annotations evaluated, as Typer reads them) without `drop` and with `options`
    ((name, annotated type, default), …) added as keyword-only parameters: what Typer turns into options."""
    signature = inspect.signature(command, eval_str=True)
    kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD else p
            for p in signature.parameters.values() if p.name != drop]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in options]
    return signature.replace(parameters=kept + added)


ScheduleOpt = Annotated[str, typer.Option("--schedule", help="Learning-rate schedule, stepped per epoch: none, step, exponential (lr × gamma per epoch; CRAYON: 0.975) or cosine.", rich_help_panel="Training")]
WarmupOpt = Annotated[int, typer.Option("--warmup-epochs", help="Epochs of linear learning-rate warm-up before the schedule.", rich_help_panel="Training")]
GammaOpt = Annotated[float, typer.Option("--gamma", help="Decay factor per epoch (exponential) or per --step-epochs epochs (step).", rich_help_panel="Training")]
StepEpochsOpt = Annotated[int, typer.Option("--step-epochs", help="Epochs per step of the step schedule.", rich_help_panel="Training")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, bf16 (autocast, CPU or GPU) or fp16 (autocast and loss scaling, CUDA only).", rich_help_panel="Runtime")]
AugmentOpt = Annotated[bool, typer.Option("--augment", help="Random resized crop and horizontal flip of each training image with its mask.", rich_help_panel="Training")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Stop each run after this many optimiser steps (a cap for benchmarks and smoke runs; the shuffle still spans all the data).", rich_help_panel="Training")]
SCHEDULE_OPTIONS = (("schedule", ScheduleOpt, "none"), ("warmup_epochs", WarmupOpt, 0), ("gamma", GammaOpt, 0.975),
                    ("step_epochs", StepEpochsOpt, 10), ("precision", PrecisionOpt, "fp32"), ("augment", AugmentOpt, False),
                    ("max_steps", MaxStepsOpt, None))


def schedule_options(command: Callable) -> Callable:
    """The schedule options (TrainConfig's `schedule`, `warmup_epochs`, `gamma`, `step_size`), `precision`, `augment`
    and `max_steps`, declared once: the command receives them as one keyword `schedule: dict` of TrainConfig fields."""
    def pack(values: dict) -> dict:
        step = values.pop("step_epochs")  # the CLI name: `step_size` is PGD's option already
        return {**values, "step_size": step}

    return option_group(command, "schedule", SCHEDULE_OPTIONS, pack)
