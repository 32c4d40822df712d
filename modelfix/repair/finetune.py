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

from ..data import Dataset
from ..errors import ModelfixError
from ..training import TaskObjective, TrainConfig, accuracy, task_loss, train
from .registry import Method, check_options, get_method, make_objective, register, register_runner

SELECT_BY = ("accuracy", "loss")


@dataclass
class SweepResult:
    """The chosen model and, per λ, what its run did (`runs[i]` belongs to `lambdas[i]`)."""

    model: nn.Module
    method: str
    lambdas: list[float | None]
    chosen: int
    select_by: str | None
    runs: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "lambdas": self.lambdas, "chosen": self.chosen,
                "chosen_lambda": self.lambdas[self.chosen], "select_by": self.select_by, "runs": self.runs}


@torch.no_grad()
def validation_loss(model: nn.Module, data: Dataset, loss: str = "ce", batch_size: int = 1000) -> float:
    """Mean task loss over `data` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_fn, total = task_loss(loss), 0.0
    for batch in data.batches(batch_size):
        y = batch["y"].to(device)
        total += float(loss_fn(model(batch["x"].to(device)), y)) * len(y)
    model.train(was_training)
    return total / max(len(data), 1)


def check_lambdas(method: Method, lambdas) -> list[float | None]:
    """The sweep as a list; [None] (the method's default) when none is given."""
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


def check_masks(method: Method, data: Dataset) -> None:
    """A mask method on data without a single mask would silently be ERM: refuse it."""
    if method.needs_masks and not bool(data.has_mask.any()):
        raise ModelfixError(f"method '{method.name}' needs masks of the spurious regions, but no training image has one",
                            hint="pass --masks DIR (a folder mirroring the images), a bundle with masks, or make "
                                 "teacher masks with `modelfix annotate`")


def preflight(objective, model: nn.Module, data: Dataset) -> None:
    """Run the objective once on two items (no update) so a bad layer name or shape fails before any training."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in next(iter(data.subset(slice(0, 2)).batches(2))).items()}
    state = copy.deepcopy(model.state_dict())  # BatchNorm running statistics must not move
    try:
        objective(model, batch)
    finally:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)


def finetune(model: nn.Module, data: Dataset, method: str, config: TrainConfig, lambdas=None, hparams=None,
             val: Dataset | None = None, select_by: str = "accuracy", progress: bool = True) -> SweepResult:
    """Run `method` once per λ from copies of `model` (which is left untouched) and return the chosen run."""
    entry = get_method(method)
    hparams = dict(hparams or {})
    values = check_lambdas(entry, lambdas)
    if lambdas and entry.weight in hparams:
        raise ModelfixError(f"--lambda sets '{entry.weight}' of method '{method}', which is also given on its own",
                            hint="give one of them")
    if select_by not in SELECT_BY:
        raise ModelfixError(f"--select-by must be one of {', '.join(SELECT_BY)}, not '{select_by}'")
    if len(values) > 1 and val is None:
        raise ModelfixError("--lambda with several values needs validation data to choose between them",
                            hint="pass --val, e.g. decoy-digits:val or a folder of held-out images")
    check_masks(entry, data)
    best, best_key, runs, chosen = None, None, [], 0
    for i, lam in enumerate(values):
        candidate = copy.deepcopy(model)
        weight = {entry.weight: lam} if lam is not None else {}
        objective = make_objective(method, candidate, loss=config.loss, **hparams, **weight)
        if i == 0:
            preflight(objective, candidate, data)
        label = f"{method}" + (f" λ={lam:g}" if lam is not None else "")
        result = train(candidate, data, config, objective, val=val, progress=progress, description=label)
        last = result.history[-1]
        run = {"lambda": lam if lam is not None else (hparams.get(entry.weight, entry.hyperparameters.get(entry.weight))
                                                      if entry.weight else None),
               "final_loss": last["loss"], "final_task": last.get("task"), "final_penalty": last.get("penalty"),
               "best_epoch": result.best_epoch, "seconds": result.seconds, "epochs": result.history}
        if val is not None:
            run["val_accuracy"] = accuracy(candidate, val)
            run["val_loss"] = validation_loss(candidate, val, config.loss)
            key = (-run["val_loss"],) if select_by == "loss" else (run["val_accuracy"], -run["val_loss"])
        else:
            key = (0,)
        runs.append(run)
        if best_key is None or key > best_key:
            best, best_key, chosen = candidate, key, i
    for i, run in enumerate(runs):
        run["chosen"] = i == chosen
    return SweepResult(model=best, method=method, lambdas=[r["lambda"] for r in runs], chosen=chosen,
                       select_by=select_by if val is not None else None, runs=runs)


# ---- the registry's entries: plain ERM, and the runner every fine-tune shares ----------------------------------

SWEEP_OPTIONS = {"lambdas": None, "select_by": "accuracy"}
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
    """The λ sweep of `entry` on `inputs.data` from `inputs.model` (untouched), chosen on `inputs.val`."""
    from modelfix.repair.result import RepairResult, Selection

    config, hparams, sweep = split_options(entry, {"seed": inputs.seed, **options})
    if "verdicts" in entry.hyperparameters:  # feedback methods get the data and one verdict per item
        from modelfix.feedback import read_sample_feedback

        hparams = {**hparams, "data": inputs.data,
                   "verdicts": read_sample_feedback(inputs.feedback).for_data(inputs.data)}
    result = finetune(inputs.model, inputs.data, entry.name, config, lambdas=sweep["lambdas"], hparams=hparams,
                      val=inputs.val, select_by=sweep["select_by"], progress=inputs.progress)
    runs = result.runs
    selection = None
    if len(runs) > 1:
        selection = Selection("lambda", [r["lambda"] for r in runs], [r.get("val_accuracy") for r in runs],
                              result.chosen, rule=f"best validation {result.select_by}")
    settings = {**{k: v for k, v in hparams.items() if k not in ("data", "verdicts")}, **sweep,
                "config": config.to_dict()}
    return RepairResult(result.model, entry.name, "finetune", settings, {"sweep": result.to_dict()}, selection,
                        {"total_s": sum(r["seconds"] for r in runs)})


register_runner("finetune", run_finetune)
