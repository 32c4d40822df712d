"""Metrics by hand on known predictions, and evaluate() against an analytic shortcut model."""

import pytest
import torch
from torch import nn

from modelfix.data import Dataset, parse_artifact, poison
from modelfix.errors import ModelfixError
from modelfix.evaluate import evaluate, metrics, predict


def test_metrics_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 0, 2])
    group = torch.tensor([0, 1, 1, 0, 1, 1])
    data = Dataset(x=torch.zeros(6, 1, 2, 2), y=y, group=group, group_names=["a", "b"], class_names=["x", "y", "z"])
    m = metrics(pred, data)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"] == pytest.approx({"x": 2 / 3, "y": 1 / 2, "z": 1.0})
    assert m["per_group"] == pytest.approx({"a": 1.0, "b": 2 / 4})
    assert m["macro_group_accuracy"] == pytest.approx(0.75)
    assert m["worst_group_accuracy"] == pytest.approx(0.5)
    assert m["worst_group"] == "b"
    assert "f1" not in m


def test_binary_f1_and_empty_class():
    y = torch.tensor([1, 1, 1, 0, 0])
    pred = torch.tensor([1, 1, 0, 1, 0])
    data = Dataset(x=torch.zeros(5, 1, 2, 2), y=y, class_names=["neg", "pos"])
    m = metrics(pred, data)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    three = Dataset(x=torch.zeros(2, 1, 2, 2), y=torch.tensor([0, 0]), class_names=["a", "b", "c"])
    assert metrics(torch.tensor([0, 1]), three)["per_class"]["c"] is None


class CornerReader(nn.Module):
    """Predicts the label a DecoyMNIST corner patch encodes (grey 255−25·y) and ignores everything else."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        corners = torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0], x[:, 0, -1, -1]], 1).amax(1)
        encoded = (255 - 255 * corners) / 25
        return -(torch.arange(10.0).view(1, -1) - encoded.view(-1, 1)).abs() + self.dummy


def blank_digits(n=2000):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset(x=torch.zeros(n, 1, 28, 28), y=y, class_names=[str(i) for i in range(10)])


def test_shortcut_model_is_perfect_when_correlated_and_near_chance_when_random():
    data = blank_digits()
    patch = parse_artifact("corner-patch")
    result = evaluate(CornerReader(), data, patch, levels=(1.0,), labels="correlated", progress=False)
    assert result["levels"][0]["accuracy"] == 1.0
    result = evaluate(CornerReader(), data, patch, levels=(0.0, 0.5, 1.0), labels="random", progress=False)
    acc = [row["accuracy"] for row in result["levels"]]
    assert 0.05 < acc[2] < 0.15
    assert result["levels"][1]["n_poisoned"] == 1000
    assert result["drops"][1]["accuracy"] == pytest.approx(acc[0] - acc[2])


def test_evaluate_repredicts_only_poisoned_items_but_equals_a_full_pass():
    data = blank_digits(500)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    patch = parse_artifact("corner-patch")
    result = evaluate(model, data, patch, levels=(0.3,), labels="random", seed=7, progress=False)
    full = metrics(predict(model, poison(data, patch, 0.3, labels="random", seed=7).x), data)
    row = result["levels"][0]
    for key in ("accuracy", "macro_group_accuracy", "worst_group_accuracy", "per_group"):
        assert row[key] == full[key]


@pytest.mark.parametrize("levels", [(1.5,), (-0.1,)])
def test_levels_outside_unit_interval_are_refused(levels):
    with pytest.raises(ModelfixError, match=r"\[0, 1\]"):
        evaluate(CornerReader(), blank_digits(10), parse_artifact("corner-patch"), levels=levels, progress=False)


def test_poison_without_artifact_is_refused():
    with pytest.raises(ModelfixError, match="--artifact"):
        evaluate(CornerReader(), blank_digits(10), None, levels=(0, 1), progress=False)
