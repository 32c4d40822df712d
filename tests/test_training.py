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


def test_double_softmax_is_cross_entropy_of_the_probabilities():
    """R4's task loss: p = softmax(z), then CE(p, y) = −log(e^{p_y} / Σ_k e^{p_k}), written out."""
    from modelfix.training import task_loss

    z = [2.0, -1.0, 0.5]
    e = [math.exp(v) for v in z]
    p = [v / sum(e) for v in e]
    expected = -math.log(math.exp(p[2]) / sum(math.exp(v) for v in p))
    assert float(task_loss("double-softmax")(torch.tensor([z]), torch.tensor([2]))) == pytest.approx(expected, rel=1e-6)
    # bounded below by −log(e / (e + K − 1)) however confident the logits
    floor = -math.log(math.e / (math.e + 2))
    assert float(task_loss("double-softmax")(torch.tensor([[0.0, 0.0, 60.0]]), torch.tensor([2]))) == pytest.approx(
        floor, rel=1e-6)


@pytest.mark.parametrize("config, expected", [
    ({"schedule": "none"}, [0.1, 0.1, 0.1, 0.1]),
    ({"schedule": "exponential", "gamma": 0.5}, [0.1, 0.05, 0.025, 0.0125]),
    ({"schedule": "exponential"}, [0.1, 0.0975, 0.095062, 0.092686]),  # CRAYON: × 0.975 per epoch
    ({"schedule": "step", "gamma": 0.1, "step_size": 3}, [0.1, 0.1, 0.1, 0.01]),
    # warm-up 2: 0.05, 0.1; then cosine over T = 2: t = 0 → 0.1, t = 1 → 0.1·(1 + cos(π/2))/2 = 0.05
    ({"schedule": "cosine", "warmup_epochs": 2}, [0.05, 0.1, 0.1, 0.05]),
    # cosine over 4: 0.1·(1 + cos(π·t/4))/2 for t = 0..3
    ({"schedule": "cosine"}, [0.1, 0.085355, 0.05, 0.014645]),
])
def test_learning_rate_per_epoch_follows_the_hand_computed_schedule(config, expected):
    data = separable(64)
    torch.manual_seed(0)
    model = tiny_net()
    cfg = TrainConfig(optimizer="sgd", lr=0.1, epochs=4, batch_size=64, **config)
    result = train(model, data, cfg, progress=False)
    assert [r["lr"] for r in result.history] == pytest.approx(expected, rel=1e-4)
    assert cfg.to_dict()["schedule"] == config["schedule"]


def test_schedule_really_sets_the_optimisers_learning_rate():
    """SGD without momentum on one full batch: the step is lr·g, so the parameter change over epoch e divided by
    the gradient at its start recovers that epoch's lr (0.1, 0.05, 0.025)."""
    data = separable(32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    steps = []

    def objective(m, batch):
        loss = nn.functional.cross_entropy(m(batch["x"]), batch["y"])
        (g,) = torch.autograd.grad(loss, m[1].bias, retain_graph=True)
        steps.append((m[1].bias.detach().clone(), g.detach().clone()))
        return loss, {}

    cfg = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.1, epochs=3, batch_size=32, schedule="exponential",
                      gamma=0.5)
    train(model, data, cfg, objective, progress=False)
    after = [b for b, _ in steps[1:]] + [model[1].bias.detach()]
    lrs = [float(((b0 - b1) / g).mean()) for (b0, g), b1 in zip(steps, after)]
    assert lrs == pytest.approx([0.1, 0.05, 0.025], rel=1e-4)  # float32 parameters


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
     ({"batch_size": 0}, "--batch-size"), ({"loss": "hinge"}, "--loss"), ({"select": "median"}, "--select"),
     ({"schedule": "linear"}, "--schedule"), ({"warmup_epochs": -1}, "--warmup-epochs"), ({"gamma": 0}, "--gamma"),
     ({"step_size": 0}, "--step-size")],
)
def test_bad_config_names_the_option(kwargs, option):
    with pytest.raises(ModelfixError, match=option):
        TrainConfig(**kwargs)


def test_select_best_without_validation_is_refused():
    with pytest.raises(ModelfixError, match="--val"):
        train(tiny_net(), separable(32), TrainConfig(select="best"), progress=False)
