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
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 when the repair ends with a warning (a no-op, a missing class, a collapsed class, a grid edge).", rich_help_panel="Output")]


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
    signature = inspect.signature(command, eval_str=True)
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in CHECKPOINT_OPTIONS]
    kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD else p
            for p in signature.parameters.values() if p.name != "checkpoint"]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name, _, _ in CHECKPOINT_OPTIONS}
        checkpoint = {"trust": values.pop("trust_checkpoint"), **values}
        return command(*args, checkpoint=checkpoint, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=kept + added)
    return wrapper
