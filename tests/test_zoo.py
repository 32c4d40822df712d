"""The architecture registry and the normalising Classifier wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.errors import ModelfixError, UnsupportedModel
from modelfix.zoo import (
    ARCHITECTURES,
    Classifier,
    build_model,
    build_net,
    default_input_spec,
    last_linear,
    list_architectures,
)

SMALL = ["mlp", "tap-cnn", "egem-cnn", "derma-cnn", "crayon-mlp"]


def _size(arch: str) -> tuple[int, int]:
    """Default input size for small nets; 32x32 keeps the torchvision forward checks fast."""
    spec = default_input_spec(arch)
    return (32, 32) if spec.height == 224 else (spec.height, spec.width)


def test_registry_lists_torchvision_and_small_nets():
    names = list_architectures()
    for arch in ["resnet18", "resnet34", "resnet50", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "densenet121", *SMALL]:
        assert arch in names
        info = ARCHITECTURES[arch]
        assert info.description and info.source
        assert isinstance(info.input_spec, InputSpec)


# VGG's 100M-parameter head takes seconds to initialise on CPU; its shapes are checked on the meta device.
HEAVY = {"vgg11", "vgg11_bn", "vgg16", "vgg16_bn"}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_arch_builds_and_gives_logits(arch, in_channels):
    torch.manual_seed(0)
    device = torch.device("meta" if arch in HEAVY else "cpu")
    with device:
        net = build_net(arch, 5, in_channels, _size(arch)).eval()
        with torch.no_grad():
            out = net(torch.rand(2, in_channels, *_size(arch)))
    assert out.shape == (2, 5)
    if device.type == "cpu":
        assert torch.isfinite(out).all()


def test_torchvision_first_conv_keeps_hyperparameters():
    net = build_net("resnet18", 3, 1, (32, 32))
    conv = net.conv1
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (
        1, 64, (7, 7), (2, 2), (3, 3),
    )
    assert conv.bias is None


@pytest.mark.parametrize("arch,features", [("tap-cnn", 3600), ("derma-cnn", 14400), ("egem-cnn", 256)])
def test_small_net_flatten_sizes_at_default_input(arch, features):
    spec = default_input_spec(arch)
    net = build_net(arch, 10, spec.channels, spec.size)
    first_linear = next(m for m in net.modules() if isinstance(m, nn.Linear))
    assert first_linear.in_features == features


def test_small_nets_work_at_other_input_sizes():
    for arch in SMALL:
        net = build_net(arch, 4, 3, (40, 36))
        assert net(torch.zeros(1, 3, 40, 36)).shape == (1, 4)


def test_mlp_hidden_kwarg_and_bad_kwarg():
    net = build_net("mlp", 10, 1, (28, 28), hidden=64)
    assert net.fc1.out_features == 64 and net.fc1.in_features == 784
    with pytest.raises(ModelfixError, match="mlp"):
        build_net("mlp", 10, 1, (28, 28), nonsense=1)


@pytest.mark.parametrize("arch", SMALL)
def test_no_relu_instance_is_used_twice(arch):
    spec = default_input_spec(arch)
    net = build_net(arch, 10, spec.channels, spec.size)
    counts: dict[int, int] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, o: counts.__setitem__(id(mod), counts.get(id(mod), 0) + 1))
        for m in net.modules()
        if isinstance(m, nn.ReLU)
    ]
    net(torch.zeros(1, spec.channels, *spec.size))
    for h in handles:
        h.remove()
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len({id(m) for m in relus}) >= 1
    assert all(n == 1 for n in counts.values())


def test_classifier_normalises_by_hand():
    spec = InputSpec(2, 1, 1, mean=(0.5, 0.25), std=(0.5, 2.0))
    model = Classifier(nn.Flatten(), spec)
    x = torch.tensor([[[[1.0]], [[1.25]]]])
    # (1 - 0.5) / 0.5 = 1, (1.25 - 0.25) / 2 = 0.5
    assert torch.equal(model(x), torch.tensor([[1.0, 0.5]]))
    one = Classifier(nn.Flatten(), InputSpec(3, 1, 1, mean=(0.5,), std=(0.25,)))
    assert one.mean.shape == (1, 3, 1, 1)
    assert torch.equal(one(torch.ones(1, 3, 1, 1)), torch.full((1, 3), 2.0))


@pytest.mark.parametrize("arch", ["resnet18", "tap-cnn"])
def test_state_dict_has_only_net_keys(arch):
    spec = default_input_spec(arch)
    card = ModelCard(arch=arch, num_classes=3, input=InputSpec(spec.channels, *_size(arch), spec.mean, spec.std))
    model = build_model(card)
    keys = list(model.state_dict())
    assert keys and all(k.startswith("net.") for k in keys)
    assert "mean" in dict(model.named_buffers()) and "std" in dict(model.named_buffers())


def test_last_linear():
    assert last_linear(build_net("resnet18", 3, 3, (32, 32)))[0] == "fc"
    with torch.device("meta"):
        assert last_linear(build_net("vgg11", 3, 3, (32, 32)))[0] == "classifier.6"
    assert last_linear(build_net("derma-cnn", 3, 3, (64, 64)))[0] == "fc3"
    with pytest.raises(UnsupportedModel):
        last_linear(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_unknown_arch_lists_known_ones():
    with pytest.raises(ModelfixError) as err:
        build_net("resnet9000", 10, 3, (32, 32))
    assert "resnet9000" in str(err.value) and "resnet18" in str(err.value) and "tap-cnn" in str(err.value)
    with pytest.raises(ModelfixError):
        default_input_spec("nope")
