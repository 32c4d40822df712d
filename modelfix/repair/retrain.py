"""EGEM's Retrain baseline (paper Supp. F.3; notes §4.3): fine-tune all layers on the refinement fit split with Adam,
BatchNorm frozen and the gradient norm clipped to 1e-3, the number of epochs chosen from a grid by the slack rule.

One run up to the largest grid value with a snapshot at every grid point (as the reproduction does), so the
selection costs one training run, not one per grid point. More epochs = stronger.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from torch import nn

from modelfix.errors import ModelfixError
from modelfix.repair.refinement import RefinementSplit, weighted_accuracy
from modelfix.repair.selection import check_slack, selection_table
from modelfix.repair.registry import Method, register
from modelfix.training import TaskObjective, TrainConfig, train

EPOCH_GRID = (1, 5, 10, 20, 30, 50, 100)


@dataclass
class RetrainConfig:
    epochs: int | None = None  # given -> no selection
    grid: tuple[int, ...] = EPOCH_GRID
    lr: float = 1e-3  # the paper's MNIST rate (ImageNet ResNet50 5e-6, VGG16 5e-5, ISIC 1e-7)
    batch_size: int = 128
    grad_clip: float = 1e-3
    loss: str = "ce"
    slack: float = 0.05
    slack_mode: str = "relative"
    seed: int = 0


def fit_retrain(model: nn.Module, split: RefinementSplit, config: RetrainConfig, progress: bool = True):
    """Fine-tune a copy of `model` on the oversampled fit split; returns (model, trace) like the other methods."""
    check_slack(config.slack, config.slack_mode)
    grid = (config.epochs,) if config.epochs is not None else tuple(sorted(set(config.grid)))
    if min(grid) < 1:
        raise ModelfixError(f"retrain epochs must be at least 1, got {min(grid)}")
    start = time.perf_counter()
    tuned = copy.deepcopy(model)
    val_orig = weighted_accuracy(model, split.val, split.val_counts)
    snapshots: dict[int, dict] = {}
    scores: dict[int, float] = {}

    def snapshot(epoch: int, current: nn.Module) -> None:
        if epoch in grid:
            scores[epoch] = weighted_accuracy(current, split.val, split.val_counts)
            snapshots[epoch] = copy.deepcopy(current.state_dict())

    train_config = TrainConfig(optimizer="adam", lr=config.lr, epochs=max(grid), batch_size=config.batch_size,
                               seed=config.seed, loss=config.loss, grad_clip=config.grad_clip, freeze_bn=True)
    train(tuned, split.expanded("fit"), train_config, progress=progress, description="retrain",
          on_epoch_end=snapshot)
    accs = [scores[e] for e in grid]
    index, selection = selection_table("epochs", grid, accs, val_orig, config.slack, config.slack_mode)
    chosen = len(grid) - 1 if config.epochs is not None else index
    tuned.load_state_dict(snapshots[grid[chosen]])
    tuned.eval()
    trace = {
        "method": "retrain",
        "epochs": grid[chosen],
        "selected_by": "given" if config.epochs is not None else "slack",
        "slack": config.slack,
        "slack_mode": config.slack_mode,
        "val_orig": val_orig,
        "val_acc": accs[chosen],
        "selection": selection,
        "config": {**train_config.to_dict()},
        "samples": split.summary,
        "timing": {"total_s": time.perf_counter() - start},
    }
    return tuned, trace


# EGEM's Retrain as a fine-tune of the training data (its epoch grid by slack runs through `fit_retrain` above).
register(Method("retrain", "finetune", "EGEM's Retrain baseline: task loss, Adam, frozen BatchNorm, grad-norm clip 1e-3",
                'Linhardt, Müller, Montavon 2023/24, "Preemptively Pruning Clever-Hans Strategies in Deep Neural '
                'Networks", Supp. F.3', {},
                train_defaults={"optimizer": "adam", "grad_clip": 1e-3, "freeze_bn": True},
                build=lambda model, loss="ce": TaskObjective(loss)))
