"""The one training loop: `train` from random init and every guided fine-tune run through here.

A guided method is an *objective*: a callable `(model, batch) -> (loss, parts)` where `batch` is a dict of
tensors (x, y, mask, has_mask, group) already on the model's device and `parts` names the loss terms for the log.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import Dataset, ImageSource, batches, to_dataset
from .data.stream import augment_batch
from .data.transforms import Augment
from .errors import ModelfixError, TrainingFailed
from .precision import PRECISIONS, autocast, check_precision, grad_scaler
from .progress import log_epoch, progress_bar

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("ce", "bce", "double-softmax")
SCHEDULES = ("none", "step", "exponential", "cosine")


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...


def start_epoch(objective, epoch: int, epochs: int) -> dict:
    """Tell a scheduled objective (one with `set_epoch(epoch, epochs)`, epoch counted from 0) which epoch begins;
    returns what it reports for the log (e.g. IBP-Ex's α and ε ramps), {} for an unscheduled one."""
    set_epoch = getattr(objective, "set_epoch", None)
    return dict(set_epoch(epoch, epochs) or {}) if callable(set_epoch) else {}


@dataclass
class TrainConfig:
    """Everything that decides a run; stored in the card's history so the run can be repeated."""

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 128
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    loss: str = "ce"
    grad_clip: float | None = None
    select: str = "final"  # "final" or "best" (best validation accuracy)
    freeze_bn: bool = False  # BatchNorm in eval mode with its affine parameters out of the optimiser (EGEM's Retrain)
    # Learning-rate schedule, stepped once per epoch (`lr_at_epoch`): none | step | exponential | cosine, after
    # `warmup_epochs` of linear warm-up. gamma: the factor per epoch (exponential; the CRAYON paper's 0.975) or per
    # `step_size` epochs (step).
    schedule: str = "none"
    warmup_epochs: int = 0
    gamma: float = 0.975
    step_size: int = 10
    # fp32 | bf16 | fp16: the forward and loss under autocast, fp16 with loss scaling (precision.py); the guided
    # penalties keep their second-order terms in float32 (docs/finetunes.md, "Mixed precision")
    precision: str = "fp32"
    augment: bool = False  # random resized crop + horizontal flip of image and mask (data.transforms.Augment)
    # A cap on the optimiser steps of a run, for benchmarks and smoke runs (None: every epoch to its end). The
    # shuffle still spans the whole data; the run stops after this many steps, inside an epoch if need be.
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ModelfixError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not '{self.optimizer}'")
        if self.loss not in LOSSES:
            raise ModelfixError(f"--loss must be one of {', '.join(LOSSES)}, not '{self.loss}'")
        if self.select not in ("final", "best"):
            raise ModelfixError(f"--select must be 'final' or 'best', not '{self.select}'")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ModelfixError(f"--lr must be a positive number, not {self.lr}")
        if self.epochs < 1:
            raise ModelfixError(f"--epochs must be at least 1, not {self.epochs}")
        if self.batch_size < 1:
            raise ModelfixError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.weight_decay < 0:
            raise ModelfixError(f"--weight-decay must be >= 0, not {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ModelfixError(f"--schedule must be one of {', '.join(SCHEDULES)}, not '{self.schedule}'")
        if self.warmup_epochs < 0:
            raise ModelfixError(f"--warmup-epochs must be >= 0, not {self.warmup_epochs}")
        if not (0 < self.gamma <= 1):
            raise ModelfixError(f"--gamma must be in (0, 1], not {self.gamma}")
        if self.step_size < 1:
            raise ModelfixError(f"--step-size must be at least 1, not {self.step_size}")
        if self.precision not in PRECISIONS:
            raise ModelfixError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'")
        if self.max_steps is not None and self.max_steps < 1:
            raise ModelfixError(f"--max-steps must be at least 1, not {self.max_steps}")

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at_epoch(config: TrainConfig, epoch: int) -> float:
    """The learning rate of `epoch` (counted from 1). Warm-up: lr·e/W for e ≤ W. After it, with t = e − W − 1 epochs
    since warm-up and T = epochs − W: `none` lr; `step` lr·γ^⌊t/step_size⌋; `exponential` lr·γ^t; `cosine`
    lr·(1 + cos(π·t/T))/2 (the last epoch stays above 0)."""
    warmup = config.warmup_epochs
    if epoch <= warmup:
        return config.lr * epoch / warmup
    t, span = epoch - warmup - 1, max(config.epochs - warmup, 1)
    if config.schedule == "step":
        return config.lr * config.gamma ** (t // config.step_size)
    if config.schedule == "exponential":
        return config.lr * config.gamma ** t
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * t / span))
    return config.lr


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the shuffling generator is seeded separately, per run)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def task_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Batch-mean task loss on logits: softmax cross-entropy, BCE over one-hot targets (the EGEM paper), or
    `double-softmax`: cross-entropy applied to softmax(logits) as if they were logits, i.e. CE(softmax(p), y). That is
    R4's task loss on DecoyMNIST (its model ends in a Softmax and nn.CrossEntropyLoss softmaxes again); it is bounded
    below by −log(e/(e + K − 1)) and has a weak gradient. It exists to reproduce R4's table; do not train with it."""
    if kind == "ce":
        return F.cross_entropy
    if kind == "double-softmax":
        return lambda logits, y: F.cross_entropy(F.softmax(logits, dim=1), y)

    def bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, F.one_hot(y, logits.shape[1]).to(logits.dtype))

    return bce


class TaskObjective:
    """Plain empirical risk: the task loss and nothing else."""

    def __init__(self, loss: str = "ce"):
        self.loss_fn = task_loss(loss)

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.loss_fn(model(batch["x"]), batch["y"])
        return loss, {"task": float(loss.detach())}


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def training_layout(model: nn.Module) -> torch.memory_format:
    """Channels-last for nets with a 2-D convolution and no BatchNorm, the standard layout otherwise: measured
    (docs/benchmarks.md "Performance"), an ERM step took 0.72× on tap-cnn (torch's NCHW max-pool is slow on the CPU)
    but 1.15× on resnet18, whose train-mode BatchNorm runs slower in channels-last. The same numbers to float
    rounding either way."""
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return torch.channels_last if convs and not _batchnorms(model) else torch.contiguous_format


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset | ImageSource, batch_size: int = 1000) -> float:
    """Plain accuracy in eval mode (a lazy source streamed); the model's train/eval state is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for batch in batches(data, batch_size):
        correct += int((model(batch["x"].to(device)).argmax(1) == batch["y"].to(device)).sum())
    model.train(was_training)
    return correct / max(len(data), 1)


DIVERGENCE = 1e3


def check_divergence(epoch_loss: float, first_loss: float, num_classes: int, epoch: int) -> None:
    """A finite but exploded task loss (Adam at lr 1e9 ends near 1e12 at chance accuracy) is a failed run, not a
    model: an epoch's mean task loss above DIVERGENCE × the larger of the first step's and chance-level
    cross-entropy (ln K, so a fine-tune starting near 0 may still rise a little) stops the run. The task part, not
    the total: a guided objective's penalty may legitimately grow while the model learns."""
    reference = max(first_loss, math.log(max(num_classes, 2)))
    if epoch_loss > DIVERGENCE * reference:
        raise TrainingFailed(f"training diverged at epoch {epoch}: mean task loss {epoch_loss:.4g}, more than "
                             f"{DIVERGENCE:g}× the first step's {first_loss:.4g}", hint="lower --lr or the penalty weight")


def epoch_batches(data: Dataset | ImageSource, batch_size: int, generator: torch.Generator,
                  augment: Augment | None = None, seed: int = 0):
    """One epoch's batches of this process, as `(batch, items in the global batch)`; with `augment`, each item
    augmented (image and mask alike) from (`seed`, its index) only, so the draws do not depend on the world size.

    One process: `data.batches(batch_size, shuffle=True, generator=generator)`, each batch its own global batch (a
    lazy source: `modelfix.data.batches` with the same generator, the same orders and batches; under torchrun
    `train` decodes a lazy source first).
    Under torchrun every process draws the same permutation (same seed, same generator), cuts it into global batches
    of `world · batch_size` items and takes its contiguous block of each (`distributed.shard_indices`): every item
    once per epoch, and N processes at batch b step like one process at batch N·b. A short last global batch is
    split as evenly; a process whose block is empty still takes part in the step (its batch has no items).
    """
    rank, world = distributed.world()
    if world == 1:
        for batch in batches(data, batch_size, shuffle=True, generator=generator, augment=augment, seed=seed):
            yield batch, len(batch["y"])
        return
    order = torch.randperm(len(data), generator=generator)  # the draw Dataset.batches makes
    step = batch_size * world
    for start in range(0, len(order), step):
        block = order[start:start + step]
        part = distributed.shard_indices(len(block), rank, world)
        mine = block[part.start:part.stop]
        batch = {"x": data.x[mine], "y": data.y[mine], "mask": data.mask[mine], "has_mask": data.has_mask[mine],
                 "group": data.group[mine], "index": mine}
        yield (batch if augment is None else augment_batch(batch, augment, seed)), len(block)


def train(
    model: nn.Module,
    data: Dataset | ImageSource,
    config: TrainConfig,
    objective: Objective | None = None,
    val: Dataset | ImageSource | None = None,
    progress: bool = True,
    description: str = "train",
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Fit `model` in place on `data` with `objective` (default: the task loss).

    Stops with TrainingFailed on the first non-finite loss. With `select="best"` the weights of the epoch with the
    best validation accuracy are restored at the end.
    """
    if len(data) == 0:
        raise ModelfixError("the training data is empty")
    if config.select == "best" and val is None:
        raise ModelfixError("--select best needs validation data (--val)")
    objective = objective or TaskObjective(config.loss)
    rank, world = distributed.world()
    if len(data) < world:
        raise ModelfixError(f"{len(data)} training items for {world} processes", hint="use fewer processes")
    if world > 1 and isinstance(data, ImageSource):  # the sharded loop slices whole tensors (as before streaming)
        data = to_dataset(data)
    distributed.broadcast_model(model)
    # the shuffle below is seeded alike everywhere; random draws of objectives (noise, PGD starts, dropout) differ
    seed_everything(config.seed + rank)
    shuffle_gen = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    layout = training_layout(model)
    model.to(memory_format=layout)  # back to the standard layout when training ends
    check_precision(config.precision, device)  # fp16 off CUDA: one line before any step
    scaler = grad_scaler(config.precision, device)  # enabled for fp16 only; a pass-through otherwise
    augment = Augment() if config.augment else None
    frozen = _batchnorms(model) if config.freeze_bn else []
    frozen_params = {id(p) for bn in frozen for p in bn.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen_params]
    optimizer = make_optimizer(trainable, config)

    result = TrainResult()
    best_acc, best_state = -1.0, None
    last_finite = first_loss = None
    names_seen: list[str] = []
    steps_per_epoch = math.ceil(len(data) / (config.batch_size * world))
    total_steps = config.epochs * steps_per_epoch if config.max_steps is None else \
        min(config.max_steps, config.epochs * steps_per_epoch)
    steps_done = 0
    start = time.perf_counter()
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(description, total=total_steps)
        for epoch in range(1, config.epochs + 1):
            if steps_done == total_steps:  # --max-steps reached
                break
            model.train()
            for bn in frozen:  # running statistics stay fixed
                bn.eval()
            schedule = start_epoch(objective, epoch - 1, config.epochs)
            lr = lr_at_epoch(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums: dict[str, float] = {}
            seen = 0
            stream = epoch_batches(data, config.batch_size, shuffle_gen, augment, config.seed + epoch)
            for step, (batch, n) in enumerate(stream, 1):
                if steps_done == total_steps:
                    break
                steps_done += 1
                batch = {k: v.to(device) for k, v in batch.items()}
                batch["x"] = batch["x"].to(memory_format=layout)
                mine = len(batch["y"])
                with autocast(config.precision, device):
                    loss, parts = objective(model, batch) if mine else (torch.zeros((), device=device), {})
                if world > 1:  # backward on this block, then the global batch's gradient, loss and parts
                    optimizer.zero_grad(set_to_none=True)
                    if mine:
                        scaler.scale(loss).backward()
                    names = sorted(parts) or names_seen  # an empty block has no parts of its own
                    names_seen = names
                    totals = distributed.average_gradients(
                        trainable, mine / n, [float(loss.detach()) * mine, *(float(parts.get(k, 0.0)) * mine for k in names)])
                    loss = torch.tensor(totals[0] / n)
                    parts = {k: v / n for k, v in zip(names, totals[1:])}
                if not torch.isfinite(loss):
                    where = f"epoch {epoch}, step {step}"
                    last = f"{last_finite:.6g}" if last_finite is not None else "none"
                    raise TrainingFailed(
                        f"loss became {float(loss.detach())} at {where} (last finite loss: {last})",
                        hint="lower --lr or the penalty weight",
                    )
                last_finite = float(loss.detach())
                if first_loss is None:
                    first_loss = float(parts.get("task", last_finite))
                if world == 1:
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                if config.grad_clip:  # the norm of what the optimiser moves: frozen BatchNorm's gradients do not count
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
                scaler.update()
                seen += n
                sums["loss"] = sums.get("loss", 0.0) + last_finite * n
                for name, value in parts.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * n
                bar.update(task, advance=1, description=f"{description} epoch {epoch}/{config.epochs} loss {last_finite:.4f}")
            distributed.average_buffers(model)  # BatchNorm statistics saw only this process's items
            record = {"epoch": epoch, "lr": lr, **schedule, **{k: v / seen for k, v in sums.items()}}
            check_divergence(record.get("task", record["loss"]), first_loss, len(data.class_names), epoch)
            if val is not None:
                record["val_accuracy"] = accuracy(model, val)
                if config.select == "best" and record["val_accuracy"] > best_acc:
                    best_acc = record["val_accuracy"]
                    best_state = copy.deepcopy(model.state_dict())
                    result.best_epoch = epoch
            result.history.append(record)
            log_epoch(description, epoch, config.epochs, enabled=progress, **{k: v for k, v in record.items() if k != "epoch"})
            if on_epoch_end is not None:  # e.g. snapshots at an epoch grid (EGEM's Retrain baseline)
                on_epoch_end(epoch, model)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
