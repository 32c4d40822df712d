"""One table drives invariant tests over the whole registry (captum's test_hook_removal shape): after
`modelfix.repair(...)` the caller's model is bit-identical and carries no hook, the result is a RepairResult of the
method, and a missing input is one named error."""

from __future__ import annotations

import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import modelfix
from modelfix.card import InputSpec
from modelfix.data import Dataset
from modelfix.repair.result import MissingInput, RepairResult
from modelfix.zoo import Classifier

METHODS = [m.name for m in modelfix.list_methods()]
FEEDBACK = {"crayon-pruning", "crayon-attention"}  # need a verdicts file: only the missing-input contract here


def tiny_model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 4, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
                                    flatten=nn.Flatten(), fc1=nn.Linear(64, 16), relu3=nn.ReLU(),
                                    fc=nn.Linear(16, 3)))
    return Classifier(net, InputSpec(1, 8, 8, (0.1,), (0.3,))).eval()


def tiny_data(masked: bool = True) -> Dataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.rand(60, 1, 8, 8, generator=g) * 0.2
    x[:, :, 2:6, 2:6] += y.view(-1, 1, 1, 1) * 0.3  # a learnable signal, so predictions are mostly right
    mask = torch.zeros(60, 1, 8, 8)
    mask[:, :, :2, :2] = 1
    return Dataset(x=x, y=y, mask=mask, has_mask=torch.full((60,), masked), class_names=["a", "b", "c"])


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def trained():
    model, data = tiny_model(), tiny_data()
    modelfix.train(model, data, modelfix.TrainConfig(epochs=30, lr=0.03, batch_size=20), progress=False)
    return model.eval()


@pytest.mark.parametrize("name", [n for n in METHODS if n not in FEEDBACK])
def test_repair_leaves_the_caller_model_untouched_and_hook_free(name, trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    kind = modelfix.get_method(name).kind
    options = {"epochs": 1, "batch_size": 20} if kind == "finetune" else {"samples_per_class": 20}
    result = modelfix.repair(trained, tiny_data(), name, progress=False, **options)
    assert isinstance(result, RepairResult) and result.method.startswith(name.split("-full")[0])
    assert result.model is not trained
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert hooks(trained) == 0 and not trained.training
    assert isinstance(result.warnings, list) and isinstance(result.to_dict()["settings"], dict)


@pytest.mark.parametrize("name", [n for n in METHODS if modelfix.get_method(n).needs_masks or n in FEEDBACK])
def test_a_missing_input_is_one_named_error(name):
    with pytest.raises(MissingInput, match=f"method '{name}' needs"):
        modelfix.repair(tiny_model(), tiny_data(masked=False), name, progress=False)


def test_a_post_hoc_method_without_data_names_the_clean_pool():
    with pytest.raises(MissingInput, match="approved clean samples"):
        modelfix.repair(tiny_model(), None, "egem")


def test_egem_at_alpha_one_warns_that_nothing_changed(trained):
    result = modelfix.repair(trained, tiny_data(), "egem", alpha=1.0, samples_per_class=20, progress=False)
    assert any("α = 1" in w for w in result.warnings)


def test_ridge_keeps_the_head_rows_of_classes_absent_from_the_pool(trained):
    data = tiny_data()
    pool = data.subset(torch.nonzero(data.y != 0).flatten())  # no sample of class 'a'
    result = modelfix.repair(trained, pool, "ridge", samples_per_class=20, progress=False)
    head, old = result.model.net.fc, trained.net.fc
    assert torch.equal(head.weight[0], old.weight[0]) and torch.equal(head.bias[0], old.bias[0])
    assert not torch.equal(head.weight[1], old.weight[1])  # the present classes were refitted
    assert any("'a'" in w for w in result.warnings) and any("[0]" in w for w in result.warnings)


def test_a_new_method_is_one_file(tmp_path, monkeypatch):
    """A method file dropped into the repair package registers itself: `repair()`, `list_methods()` and
    `modelfix methods` find it with no other change (the docs test then asks for its page from the registry)."""
    import json

    import modelfix.repair
    from modelfix.repair import registry

    from cli_helpers import run

    (tmp_path / "halve_head.py").write_text('''
from modelfix.repair.registry import method
from modelfix.repair.result import RepairResult


@method("halve-head", "posthoc", "halve the last layer (a test entry)", "none", {"factor": 0.5}, needs=("clean",),
        command="prune-egem")
def run(inputs, **options):
    import copy
    model = copy.deepcopy(inputs.model)
    model.net.fc.weight.data.mul_(options["factor"])
    return RepairResult(model, "halve-head", "posthoc", options)
''')
    monkeypatch.setattr(modelfix.repair, "__path__", [*modelfix.repair.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_discovered", False)
    try:
        assert "halve-head" in [m.name for m in modelfix.list_methods()]
        model = tiny_model()
        result = modelfix.repair(model, tiny_data(), "halve-head")
        assert torch.equal(result.model.net.fc.weight, model.net.fc.weight * 0.5)
        listed = json.loads(run("methods", "--json").stdout)
        assert any(row["name"] == "halve-head" and row["kind"] == "posthoc" for row in listed)
    finally:
        registry.METHODS.pop("halve-head", None)
        sys.modules.pop("modelfix.repair.halve_head", None)
