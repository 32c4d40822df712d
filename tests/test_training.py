"""The one training loop: it learns, it is deterministic, it stops on NaN, and best-state selection is real."""

import math

import pytest
import torch
from torch import nn

from modelfix.data import Dataset
from modelfix.errors import ModelfixError, TrainingFailed
from modelfix.training import TaskObjective, TrainConfig, accuracy, train


def separable(n=400, seed=0):
    """Two Gaussian blobs in 1×4×4 images: class = sign of the mean pixel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.5 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return Dataset(x=x, y=y, class_names=["neg", "pos"], name="blobs")


def tiny_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_training_learns_a_separable_problem(optimizer):
    data = separable()
    torch.manual_seed(0)
    model = tiny_net()
    before = accuracy(model, data)
    result = train(model, data, TrainConfig(optimizer=optimizer, lr=0.05, epochs=5, batch_size=32), progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert accuracy(model, data) > max(0.95, before)


def test_same_seed_same_weights_and_other_seed_differs():
    data = separable()

    def run(seed):
        torch.manual_seed(123)
        model = tiny_net()
        train(model, data, TrainConfig(lr=0.01, epochs=2, batch_size=16, seed=seed), progress=False)
        return torch.cat([p.flatten() for p in model.parameters()])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_bce_loss_matches_one_hot_definition():
    from modelfix.training import task_loss

    logits = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([2])
    expected = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 - 1 / (1 + math.exp(-2.0)))
                 + math.log(1 - 1 / (1 + math.exp(1.0)))) / 3
    assert float(task_loss("bce")(logits, y)) == pytest.approx(expected, rel=1e-6)


def test_nan_loss_stops_with_epoch_and_last_finite_loss():
    data = separable(64)
    calls = {"n": 0}

    def objective(model, batch):
        calls["n"] += 1
        loss = TaskObjective()(model, batch)[0]
        return (loss * float("nan") if calls["n"] == 3 else loss), {}

    with pytest.raises(TrainingFailed) as info:
        train(tiny_net(), data, TrainConfig(epochs=3, batch_size=32), objective=objective, progress=False)
    message = str(info.value)
    assert "epoch 2, step 1" in message and "last finite loss" in message
    assert info.value.exit_code == 1


def test_select_best_restores_the_best_validation_epoch():
    data = separable(200, seed=1)
    val = separable(200, seed=2)
    torch.manual_seed(0)
    model = tiny_net()
    result = train(model, data, TrainConfig(lr=0.02, epochs=6, batch_size=20, select="best"), val=val, progress=False)
    best = max(r["val_accuracy"] for r in result.history)
    assert result.history[result.best_epoch - 1]["val_accuracy"] == best
    assert accuracy(model, val) == pytest.approx(best)


@pytest.mark.parametrize(
    "kwargs, option",
    [({"optimizer": "rmsprop"}, "--optimizer"), ({"lr": -1}, "--lr"), ({"epochs": 0}, "--epochs"),
     ({"batch_size": 0}, "--batch-size"), ({"loss": "hinge"}, "--loss"), ({"select": "median"}, "--select")],
)
def test_bad_config_names_the_option(kwargs, option):
    with pytest.raises(ModelfixError, match=option):
        TrainConfig(**kwargs)


def test_select_best_without_validation_is_refused():
    with pytest.raises(ModelfixError, match="--val"):
        train(tiny_net(), separable(32), TrainConfig(select="best"), progress=False)
