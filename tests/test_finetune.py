"""The λ sweep behind `finetune` and `train --method`: one run per λ from the same start, the choice on validation."""

import copy

import pytest
import torch
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.data import Dataset
from modelfix.errors import ModelfixError
from modelfix.repair.finetune import finetune, preflight, validation_loss
from modelfix.repair.methods import make_objective
from modelfix.training import TrainConfig
from modelfix.zoo import build_model

CONFIG = TrainConfig(optimizer="adam", lr=1e-2, epochs=2, batch_size=16)


def _model(arch="mlp"):
    torch.manual_seed(0)
    card = ModelCard(arch=arch, num_classes=3, class_names=["a", "b", "c"], input=InputSpec(1, 8, 8, (0.0,), (1.0,)))
    return build_model(card)


def _data(n=48, masks=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    y = torch.arange(n) % 3
    x[:, 0, 0, 0] = y.float() / 2  # a spurious corner pixel that encodes the label
    mask = torch.zeros(n, 1, 8, 8)
    mask[:, :, :2, :2] = 1
    return Dataset(x=x, y=y, class_names=["a", "b", "c"], mask=mask,
                   has_mask=torch.full((n,), masks, dtype=torch.bool))


def test_sweep_runs_every_lambda_from_the_same_start_and_leaves_the_input_untouched():
    model, data, val = _model(), _data(), _data(seed=1)
    before = copy.deepcopy(model.state_dict())
    result = finetune(model, data, "rrr", CONFIG, lambdas=[0.0, 1e-2, 10.0], val=val, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.lambdas == [0.0, 1e-2, 10.0] and len(result.runs) == 3
    assert [run["chosen"] for run in result.runs].count(True) == 1
    # λ = 0 is ERM: its penalty is reported but carries no weight, so its task loss differs from λ = 10's
    assert result.runs[0]["final_task"] != result.runs[2]["final_task"]
    best = max(range(3), key=lambda i: (result.runs[i]["val_accuracy"], -result.runs[i]["val_loss"]))
    assert result.chosen == best
    chosen = result.runs[result.chosen]
    assert validation_loss(result.model, val) == pytest.approx(chosen["val_loss"])


def test_select_by_loss_picks_the_lowest_validation_loss():
    result = finetune(_model(), _data(), "erm-l2", CONFIG, lambdas=[0.0, 1.0, 100.0], val=_data(seed=1),
                      select_by="loss", progress=False)
    losses = [run["val_loss"] for run in result.runs]
    assert result.chosen == losses.index(min(losses))
    assert result.to_dict()["chosen_lambda"] == result.lambdas[result.chosen]


def test_one_run_without_lambda_uses_the_method_default_and_needs_no_validation():
    result = finetune(_model(), _data(), "rrr", CONFIG, progress=False)
    assert result.lambdas == [1e-3] and result.select_by is None and result.runs[0]["chosen"]


def test_the_weight_given_as_a_hyperparameter_is_the_one_recorded():
    """`--beta 3` (the weight through its own option, no --lambda) is what ran, so it is what the report says."""
    given = finetune(_model(), _data(), "rrr", CONFIG, hparams={"lam": 0.25}, progress=False)
    default = finetune(_model(), _data(), "rrr", CONFIG, progress=False)
    assert given.runs[0]["lambda"] == 0.25 and default.runs[0]["lambda"] == 1e-3
    assert given.runs[0]["final_loss"] != default.runs[0]["final_loss"]  # a different weight really ran


def test_validation_loss_is_the_mean_task_loss():
    model, val = _model(), _data(n=10)
    model.eval()
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(val.x), val.y))
    assert validation_loss(model, val, batch_size=3) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method,lambdas,val,message", [
    ("erm", [1.0], None, "has no penalty weight"),
    ("rrr", [-1.0], None, "finite and >= 0"),
    ("rrr", [float("nan")], None, "finite and >= 0"),
    ("rrr", [1.0, 1.0], "val", "same value twice"),
    ("rrr", [1.0, 2.0], None, "needs validation data"),
    ("egem", None, None, "post-hoc"),
])
def test_bad_sweeps_are_refused(method, lambdas, val, message):
    with pytest.raises(ModelfixError, match=message):
        finetune(_model(), _data(), method, CONFIG, lambdas=lambdas, val=_data() if val else None, progress=False)


def test_lambda_and_the_weight_it_sets_cannot_both_be_given():
    with pytest.raises(ModelfixError, match="also given"):
        finetune(_model(), _data(), "rrr", CONFIG, lambdas=[1.0], hparams={"lam": 2.0}, progress=False)


def test_mask_methods_refuse_data_without_a_single_mask():
    with pytest.raises(ModelfixError, match="needs masks"):
        finetune(_model(), _data(masks=False), "rrr", CONFIG, progress=False)
    finetune(_model(), _data(masks=False), "erm-l2", CONFIG, progress=False)  # no masks needed


def test_a_bad_layer_fails_before_training():
    model = _model("egem-cnn-ref")
    with pytest.raises(ModelfixError, match="not spatial"):
        finetune(model, _data(), "tap", CONFIG, hparams={"layers": "fc1"}, progress=False)
    with pytest.raises(ModelfixError, match="not a module"):
        finetune(model, _data(), "tap", CONFIG, hparams={"layers": "conv9"}, progress=False)


def test_preflight_leaves_weights_and_batchnorm_statistics_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    before = copy.deepcopy(net.state_dict())
    preflight(make_objective("tap", net, layers="2"), net, _data())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
