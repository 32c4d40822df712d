"""EGEM's Retrain baseline (paper Supp. F.3; notes §4.3): fine-tune all layers on the refinement fit split with Adam,
BatchNorm frozen and the gradient norm clipped to 1e-3, the number of epochs chosen from a grid: by default with the
counterfactual rule (the best worst-group accuracy on the validation items with the artifact pasted on half of each
class, among the epochs within the clean slack; `counterfactual.py`) when an artifact is known, by the paper's slack
rule (the most epochs within the slack) with `select="paper"` or without an artifact.

One run up to the largest grid value with a snapshot at every grid point (as the reproduction does), so the
selection costs one training run, not one per grid point. More epochs = stronger.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

from torch import nn

from modelfix.errors import ModelfixError
from modelfix.repair.counterfactual import (NO_ARTIFACT, NO_ARTIFACT_WARNING, check_rule, counterfactual_set,
                                            find_artifact, rule_name, score_model, select_counterfactual)
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
    select: str = "counterfactual"  # or "paper": the most epochs within the slack
    artifact: object = None  # what the counterfactual rule pastes (a spec or an Artifact); None: no counterfactual


def choose_epochs(grid, accs, cf_scores, val_orig: float, slack: float, slack_mode: str) -> tuple[int, list[dict]]:
    """(index into `grid`, one row per epoch count): the paper's slack rule when `cf_scores` is None, else the
    counterfactual rule; rows carry `cf_worst` where scored."""
    index, rows = selection_table("epochs", grid, accs, val_orig, slack, slack_mode)
    if cf_scores is not None:
        index = select_counterfactual(cf_scores, accs, val_orig, slack, slack_mode)
        for row, score in zip(rows, cf_scores):  # a CounterfactualScore, or a plain worst-group float
            worst, mean = score if isinstance(score, tuple) else (score, None)
            row["cf_worst"] = worst
            if mean is not None:
                row["cf_mean"] = mean
    return index, rows


def fit_retrain(model: nn.Module, split: RefinementSplit, config: RetrainConfig, progress: bool = True):
    """Fine-tune a copy of `model` on the oversampled fit split; returns (model, trace) like the other methods."""
    check_slack(config.slack, config.slack_mode)
    check_rule(config.select)
    grid = (config.epochs,) if config.epochs is not None else tuple(sorted(set(config.grid)))
    if min(grid) < 1:
        raise ModelfixError(f"retrain epochs must be at least 1, got {min(grid)}")
    start = time.perf_counter()
    tuned = copy.deepcopy(model)
    val_orig = weighted_accuracy(model, split.val, split.val_counts)
    artifact = find_artifact(config.artifact, None) if config.select == "counterfactual" else None
    cf = None if artifact is None else counterfactual_set(split.val, artifact, config.seed)
    snapshots: dict[int, dict] = {}
    scores: dict[int, float] = {}
    cf_scores: dict = {}

    def snapshot(epoch: int, current: nn.Module) -> None:
        if epoch in grid:
            scores[epoch] = weighted_accuracy(current, split.val, split.val_counts)
            if cf is not None:
                cf_scores[epoch] = score_model(current, cf, config.batch_size)
            snapshots[epoch] = copy.deepcopy(current.state_dict())

    train_config = TrainConfig(optimizer="adam", lr=config.lr, epochs=max(grid), batch_size=config.batch_size,
                               seed=config.seed, loss=config.loss, grad_clip=config.grad_clip, freeze_bn=True)
    train(tuned, split.expanded("fit"), train_config, progress=progress, description="retrain",
          on_epoch_end=snapshot)
    accs = [scores[e] for e in grid]
    index, selection = choose_epochs(grid, accs, [cf_scores[e] for e in grid] if cf is not None else None, val_orig,
                                     config.slack, config.slack_mode)
    chosen = len(grid) - 1 if config.epochs is not None else index
    tuned.load_state_dict(snapshots[grid[chosen]])
    tuned.eval()
    if config.epochs is not None:
        selected_by, rule, warnings = "given", None, []
    elif cf is not None:
        selected_by, rule, warnings = "counterfactual", rule_name(config.slack, config.slack_mode), []
    elif config.select == "counterfactual":  # no artifact to paste: the paper's rule, said so
        selected_by, rule, warnings = "slack", NO_ARTIFACT, [NO_ARTIFACT_WARNING]
    else:
        selected_by, rule, warnings = "slack", None, []
    trace = {
        "method": "retrain",
        "epochs": grid[chosen],
        "selected_by": selected_by,
        "rule": rule,
        "slack": config.slack,
        "slack_mode": config.slack_mode,
        "val_orig": val_orig,
        "val_acc": accs[chosen],
        "selection": selection,
        "config": {**train_config.to_dict()},
        "samples": split.summary,
        "warnings": warnings,
        "timing": {"total_s": time.perf_counter() - start},
    }
    return tuned, trace


# EGEM's Retrain as a fine-tune of the training data (its epoch grid runs through `fit_retrain` above).
register(Method("retrain", "finetune", "EGEM's Retrain baseline: task loss, Adam, frozen BatchNorm, grad-norm clip 1e-3",
                'Linhardt, Müller, Montavon 2023/24, "Preemptively Pruning Clever-Hans Strategies in Deep Neural '
                'Networks", Supp. F.3', {},
                train_defaults={"optimizer": "adam", "grad_clip": 1e-3, "freeze_bn": True},
                build=lambda model, loss="ce": TaskObjective(loss)))
