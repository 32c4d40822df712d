"""The method registry (modelfix.repair.methods): entries, objectives built from it, errors, training integration."""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

from modelfix.card import InputSpec
from modelfix.data import Dataset
from modelfix.errors import ModelfixError
from modelfix.repair.guidance import RRR, TAP
from modelfix.repair.methods import METHODS, Method, get_method, make_objective, register
from modelfix.training import TrainConfig, train
from modelfix.zoo import Classifier

FINETUNES = ["erm", "retrain", "erm-l2", "tap", "rrr", "rbr"]
POSTHOC = ["egem", "pca-egem", "egem-full", "rgem", "ridge"]


def tiny_model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 3, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
                                    flatten=nn.Flatten(), fc=nn.Linear(48, 3)))
    return Classifier(net, InputSpec(1, 8, 8, (0.1,), (0.3,)))


def tiny_data(masked: bool = True) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 8, 8, generator=g)
    mask = torch.zeros(12, 1, 8, 8)
    if masked:
        mask[::2, :, :3, :3] = 1
    return Dataset(x=x, y=torch.arange(12) % 3, mask=mask, has_mask=torch.full((12,), masked))


def batch_of(data: Dataset) -> dict:
    return next(iter(data.batches(len(data))))


def test_registry_holds_the_issue_4_methods():
    assert [n for n in FINETUNES + POSTHOC if n not in METHODS] == []
    for name in FINETUNES:
        method = get_method(name)
        assert method.kind == "finetune" and callable(method.build) and method.summary and method.paper
    for name in POSTHOC:
        assert get_method(name).kind == "posthoc" and get_method(name).build is None
    assert {n for n in FINETUNES if get_method(n).needs_masks} == {"tap", "rrr", "rbr"}
    assert get_method("tap").hyperparameters == {"lam": 1e-3, "layers": None, "norm": "squared"}
    assert get_method("rrr").hyperparameters == {"lam": 1e-3, "target": "log-prob-sum"}
    assert get_method("rbr").hyperparameters == {"lam": 3.0}
    assert get_method("erm-l2").hyperparameters == {"l2": 1e-3}
    assert get_method("retrain").train_defaults == {"optimizer": "adam", "grad_clip": 1e-3, "freeze_bn": True}
    assert "Zhang" in get_method("tap").paper and "Ross" in get_method("rrr").paper
    assert "Shao" in get_method("rbr").paper and "Linhardt" in get_method("egem").paper


def test_train_defaults_are_valid_train_config_overrides():
    for method in METHODS.values():
        config = TrainConfig(**method.train_defaults)
        assert all(getattr(config, k) == v for k, v in method.train_defaults.items())


@pytest.mark.parametrize("name", FINETUNES)
def test_every_finetune_builds_an_objective_with_a_finite_loss(name):
    model, batch = tiny_model().train(), batch_of(tiny_data())
    objective = make_objective(name, model)
    loss, parts = objective(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert "task" in parts and all(isinstance(v, float) for v in parts.values())
    if name not in ("erm", "retrain"):
        assert parts["penalty"] > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_make_objective_passes_hyperparameters_and_loss():
    model = tiny_model()
    rrr = make_objective("rrr", model, loss="bce", target="loss", lam=0.5)
    assert isinstance(rrr, RRR) and rrr.target == "loss" and rrr.lam == 0.5 and rrr.loss == "bce"
    tap = make_objective("tap", model, layers="pool1", norm="l1")
    assert isinstance(tap, TAP) and tap.layers == "pool1" and tap.norm == "l1" and tap.lam == 1e-3
    assert make_objective("erm-l2", model, l2=0.25).l2 == 0.25


def test_registry_errors():
    with pytest.raises(ModelfixError, match="unknown method 'tapp'") as info:
        get_method("tapp")
    assert "tap" in str(info.value) and "egem" in str(info.value)
    with pytest.raises(ModelfixError, match="no hyper-parameter 'lambda'") as info:
        make_objective("rrr", tiny_model(), **{"lambda": 1.0})
    assert "lam" in str(info.value) and "target" in str(info.value)
    with pytest.raises(ModelfixError, match="post-hoc"):
        make_objective("egem", tiny_model())
    with pytest.raises(ModelfixError, match="'pool9'"):  # TAP checks its layers when built on a model
        make_objective("tap", tiny_model(), layers=["pool9"])
    with pytest.raises(ModelfixError, match="already registered"):
        register(get_method("erm"))


def test_register_keeps_the_registry_open():
    method = Method("erm-copy", "finetune", "test entry", "none", {"l2": 0.0},
                    build=lambda model, loss="ce", **hp: make_objective("erm-l2", model, loss=loss, **hp))
    try:
        assert register(method) is method and get_method("erm-copy") is method
        assert make_objective("erm-copy", tiny_model()).l2 == 0.0
    finally:
        METHODS.pop("erm-copy", None)
    with pytest.raises(ModelfixError, match="build"):
        register(dataclasses.replace(method, name="no-build", build=None))
    assert "no-build" not in METHODS


@pytest.mark.parametrize("name", ["tap", "rrr", "rbr"])
def test_mask_methods_train_exactly_like_erm_when_no_mask_is_set(name):
    """Through the training loop: with every mask empty a mask method's run is bit-identical to ERM's."""
    data = tiny_data(masked=False)
    config = TrainConfig(optimizer="sgd", lr=0.1, epochs=2, batch_size=4)
    reference, guided = tiny_model(), tiny_model()
    train(reference, data, config, progress=False)
    result = train(guided, data, config, objective=make_objective(name, guided), progress=False)
    assert result.history[-1]["penalty"] == 0.0
    for a, b in zip(reference.state_dict().values(), guided.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["erm-l2", "tap", "rrr", "rbr"])
def test_penalties_steer_training_away_from_erm(name):
    """With masks set, one short run moves the weights differently from ERM and logs the penalty."""
    data = tiny_data()
    config = TrainConfig(optimizer="sgd", lr=0.05, epochs=1, batch_size=6)
    reference, guided = tiny_model(), tiny_model()
    train(reference, data, config, progress=False)
    hp = {"lam": 1.0} if name in ("tap", "rrr", "rbr") else {"l2": 1.0}
    result = train(guided, data, config, objective=make_objective(name, guided, **hp), progress=False)
    assert result.history[-1]["penalty"] > 0
    moved = [not torch.allclose(a, b) for a, b in zip(reference.state_dict().values(), guided.state_dict().values())]
    assert any(moved)


def test_retrain_defaults_freeze_batchnorm_in_training():
    method = get_method("retrain")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
    model = Classifier(net, InputSpec(1, 8, 8, (0.0,), (1.0,)))
    before = copy.deepcopy(net[1].state_dict())
    config = TrainConfig(**{**method.train_defaults, "epochs": 1, "batch_size": 4})
    train(model, tiny_data(), config, objective=make_objective("retrain", model), progress=False)
    for key, value in before.items():
        assert torch.equal(net[1].state_dict()[key], value), key
