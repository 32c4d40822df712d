"""Refinement points: family defaults, the generic small-net rule, `--layers` names and globs, and their errors."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.errors import ModelfixError, UnsupportedModel
from modelfix.repair.points import Point, find_points
from modelfix.zoo import Classifier, build_model, default_input_spec


def make(arch: str, size: int | None = None, device: str = "cpu") -> Classifier:
    """A zoo model; torchvision nets are built on the meta device (shapes are all a dry run needs, and it is fast)."""
    spec = default_input_spec(arch)
    if size is not None:
        spec = dataclasses.replace(spec, height=size, width=size)
    with torch.device(device):
        return build_model(ModelCard(arch=arch, num_classes=10, input=spec))


def names(points: list[Point]) -> list[str]:
    return [p.name for p in points]


def test_small_net_defaults_follow_the_generic_rule():
    """The input of each Conv/Linear after the first (the EGEM paper's MNIST points): egem-cnn 28 → conv 3×3 → 26
    → pool → 13; conv 5×5 → 9 → pool → 4, flattened 16·4·4 = 256; fc 200."""
    egem = find_points(make("egem-cnn"))
    assert egem == [
        Point("pool1", 1, (8, 13, 13)),
        Point("flatten", 2, (256,)),
        Point("relu3", 3, (200,)),
    ]
    assert [p.kind for p in egem] == ["conv", "dense", "dense"]
    assert names(find_points(make("mlp"))) == ["relu1"]  # relu after the last Linear would be excluded; none here
    assert names(find_points(make("tap-cnn"))) == ["pool1", "flatten"]
    assert names(find_points(make("crayon-mlp"), "auto")) == ["relu1", "relu2"]


def test_resnet_defaults_are_the_stem_and_the_four_stages():
    points = find_points(make("resnet18", 32, "meta"))
    assert names(points) == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert [p.index for p in points] == [1, 2, 3, 4, 5]
    assert points[0].shape == (64, 8, 8) and points[-1].shape == (512, 1, 1)


@pytest.mark.parametrize(
    "arch, pools",
    [("vgg11", [2, 5, 10, 15, 20]), ("vgg11_bn", [3, 7, 14, 21, 28])],  # BN shifts the MaxPool indices
)
def test_vgg_defaults_are_the_pools_by_type_and_the_classifier_relus(arch, pools):
    points = find_points(make(arch, 32, "meta"))
    assert names(points) == [f"features.{i}" for i in pools] + ["classifier.1", "classifier.4"]
    assert [p.kind for p in points] == ["conv"] * 5 + ["dense"] * 2


def test_densenet_defaults_are_the_transitions_and_the_last_block():
    points = find_points(make("densenet121", 32, "meta"))
    assert names(points) == [
        "features.transition1", "features.transition2", "features.transition3", "features.denseblock4",
    ]


def test_glob_selects_stages_not_their_insides_and_keeps_execution_order():
    model = make("resnet18", 32, "meta")
    assert names(find_points(model, "layer*")) == ["layer1", "layer2", "layer3", "layer4"]
    assert names(find_points(model, ["layer4", "layer1"])) == ["layer1", "layer4"]  # execution order, not given
    assert names(find_points(model, "layer1.*")) == ["layer1.0", "layer1.1"]
    # `**` crosses dots; a glob silently skips the shared BasicBlock relu (2 calls per forward)
    deep = find_points(model, "layer1.**")
    assert "layer1.0.relu" not in names(deep) and "layer1.0.conv1" in names(deep)
    # duplicates collapse; indices are 1..L
    points = find_points(model, "layer2, layer2 ,layer*")
    assert names(points) == ["layer1", "layer2", "layer3", "layer4"] and [p.index for p in points] == [1, 2, 3, 4]


def test_execution_order_not_registration_order():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 3)  # registered first, runs last
            self.act2 = nn.ReLU()
            self.fc = nn.Linear(8 * 4 * 4, 6)
            self.act1 = nn.ReLU()
            self.conv = nn.Conv2d(1, 8, 3)

        def forward(self, x):
            x = self.act1(self.conv(x)).flatten(1)
            return self.head(self.act2(self.fc(x)))

    model = Classifier(Reordered(), InputSpec(1, 6, 6, (0.0,), (1.0,)))
    assert names(find_points(model)) == ["act1", "act2"]
    assert names(find_points(model, "*")) == ["conv", "act1", "fc", "act2", "head"]


def test_activation_after_the_last_linear_or_not_after_conv_is_no_default():
    net = nn.Sequential(
        OrderedDict(
            pool=nn.MaxPool2d(2), act0=nn.ReLU(),  # no Conv/Linear before it
            conv=nn.Conv2d(1, 4, 3), bn=nn.BatchNorm2d(4), act1=nn.ReLU(),  # BN in between is allowed
            flatten=nn.Flatten(), fc=nn.Linear(4 * 2 * 2, 2), act2=nn.Sigmoid(),  # after the final Linear
        )
    )
    model = Classifier(net, InputSpec(1, 8, 8, (0.0,), (1.0,)))
    assert names(find_points(model)) == ["flatten"]  # act1, moved on to the input of fc


def test_functional_activations_need_explicit_layers():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 3)
            self.fc2 = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    model = Classifier(Functional(), InputSpec(1, 2, 2, (0.0,), (1.0,)))
    with pytest.raises(UnsupportedModel, match=r"no default refinement points in Functional.*pass --layers NAMES"):
        find_points(model)
    assert names(find_points(model, "fc1")) == ["fc1"]


def test_layer_errors_are_one_line_and_name_the_culprit():
    model = make("resnet18", 32, "meta")
    with pytest.raises(ModelfixError, match=r"--layers 'foo' matches no module of the network; e\.g\. "):
        find_points(model, "foo")
    with pytest.raises(ModelfixError, match=r"--layers 'nothing\*' matches no module"):
        find_points(model, "layer1,nothing*")
    once = r"'layer1\.0\.relu' runs 2 times per forward pass; a refinement point must run exactly once"
    with pytest.raises(ModelfixError, match=once):
        find_points(model, "layer1.0.relu")
    with pytest.raises(ModelfixError, match=r"'layer1\.\*\.relu' matches no module usable.*runs 2 times"):
        find_points(model, "layer1.*.relu")
    with pytest.raises(ModelfixError, match="--layers is empty"):
        find_points(model, " , ")
    for error in ("foo", "layer1.0.relu"):
        with pytest.raises(ModelfixError) as info:
            find_points(model, error)
        assert "\n" not in str(info.value)


def test_unused_module_and_non_tensor_outputs_are_refused():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.unused = nn.ReLU()
            self.seq = nn.Conv1d(2, 2, 1)  # per-item output (C, L): 2 dims
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.pair(x)[0].flatten(2)  # (N, 2, 4)
            return self.fc(self.seq(x).flatten(1))

    model = Classifier(Odd(), InputSpec(2, 2, 2, (0.0,), (1.0,)))
    with pytest.raises(ModelfixError, match="'unused' never runs"):
        find_points(model, "unused")
    with pytest.raises(ModelfixError, match="'pair' does not return a single tensor"):
        find_points(model, "pair")
    with pytest.raises(ModelfixError, match=r"'seq' outputs per-item shape \(2, 4\)"):
        find_points(model, "seq")
    assert names(find_points(model, "*")) == ["fc"]  # a glob skips what cannot be a point


def test_dry_run_leaves_no_hooks_and_restores_training_flags():
    model = make("egem-cnn").train()
    model.net.relu2.eval()
    find_points(model)
    assert model.training and model.net.conv1.training and not model.net.relu2.training
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("arch", ["egem-cnn", "egem-cnn-ref", "tap-cnn", "crayon-mlp", "derma-cnn"])
def test_small_net_points_are_the_inputs_of_egem_fulls_consumers(arch):
    """egem and egem-full refine the same places: each default point's output is exactly what the matching consumer
    layer (every Conv/Linear after the first) receives, checked by hooks on one forward pass."""
    from modelfix.repair.egem_full import find_consumers

    model = make(arch)
    points, consumers = find_points(model), find_consumers(model)
    assert len(points) == len(consumers)
    seen = {}
    hooks = [model.net.get_submodule(p.name).register_forward_hook(
        lambda m, a, out, name=p.name: seen.__setitem__(name, out.detach().clone())) for p in points]
    hooks += [model.net.get_submodule(c).register_forward_pre_hook(
        lambda m, a, name=c: seen.__setitem__(name, a[0].detach().clone())) for c in consumers]
    torch.manual_seed(0)
    spec = model.input_spec
    with torch.no_grad():
        model.eval()(torch.rand(2, spec.channels, spec.height, spec.width))
    for h in hooks:
        h.remove()
    for point, consumer in zip(points, consumers):
        assert torch.equal(seen[point.name].flatten(1), seen[consumer].flatten(1)), (point.name, consumer)
