"""Any model: torchvision names beyond the registry, timm (optional), a user's factory, config.json beside the
weights, bounded sizes before allocating, bounded JSON, and the mixed-precision helper."""

from __future__ import annotations

import json
import sys
import time

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.checkpoint import ModelOverrides, load_model
from modelfix.errors import CheckpointError, ModelfixError
from modelfix.precision import autocast, grad_scaler
from modelfix.zoo import build_net, default_input_spec, get_arch


def test_any_torchvision_classifier_and_its_input():
    net = build_net("mobilenet_v3_small", 5, 1, (64, 64))  # not in the registry
    assert net.classifier[-1].out_features == 5 and net.features[0][0].in_channels == 1
    spec = default_input_spec("inception_v3")  # torchvision's preset: 299 crop, ImageNet statistics
    assert (spec.channels, spec.height, spec.width) == (3, 299, 299)
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    with pytest.raises(ModelfixError, match="unknown architecture 'resnet19'"):
        get_arch("resnet19")


def test_cardless_torchvision_checkpoint_needs_only_arch(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=7)
    net.features[0][0] = nn.Conv2d(1, 16, 3, 2, 1, bias=False)  # a grey-input model
    net.eval()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "m.pt")
    model, card = load_model(tmp_path / "m.pt", ModelOverrides(arch="mobilenet_v3_small"))
    assert card.num_classes == 7 and card.input.channels == 1  # from fc out_features / first conv in_channels
    assert (card.input.height, card.input.width) == (224, 224)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - model.mean) / model.std), atol=1e-6)


def test_config_json_supplies_input_and_classes(tmp_path):
    torch.manual_seed(0)
    net = build_net("egem-cnn", 3, 1, (28, 28))
    safetensors.torch.save_file(net.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "egem-cnn", "num_classes": 3, "label_names": ["a", "b", "c"],
        "pretrained_cfg": {"input_size": [1, 28, 28], "mean": [0.25], "std": [0.5], "crop_pct": 0.9}}))
    _, card = load_model(tmp_path / "model.safetensors")
    assert card.arch == "egem-cnn" and card.class_names == ["a", "b", "c"]
    assert card.input.mean == (0.25,) and card.input.std == (0.5,) and card.input.size == (28, 28)
    (tmp_path / "config.json").write_text('{"pretrained_cfg": {"input_size": [1, 28, "x"]}}')
    with pytest.raises(CheckpointError, match="config.json: 'input_size' must be"):
        load_model(tmp_path / "model.safetensors", ModelOverrides(arch="egem-cnn"))


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes, in_channels, input_size, width=4):\n"
        "    flat = width * (input_size[0] - 2) * (input_size[1] - 2)\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.Flatten(), nn.Linear(flat, num_classes))\n"
        "def not_a_net(num_classes):\n"
        "    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = build_net("mynets:tiny", 4, 2, (8, 8), width=5)
    assert net[0].in_channels == 2 and net[0].out_channels == 5 and net[2].in_features == 5 * 6 * 6
    with pytest.raises(ModelfixError, match="cannot import module 'nomodule_xyz'"):
        build_net("nomodule_xyz:make", 2, 3, (8, 8))
    with pytest.raises(ModelfixError, match="has no callable 'missing'"):
        build_net("mynets:missing", 2, 3, (8, 8))
    with pytest.raises(ModelfixError, match="returned a int"):
        build_net("mynets:not_a_net", 2, 3, (8, 8))
    # a card that names a factory does not import it unless the user says so
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    card = ModelCard(arch="mynets:tiny", num_classes=2, input=InputSpec(1, 8, 8, (0.0,), (1.0,)))
    safetensors.torch.save_file(net.state_dict(), str(tmp_path / "f.safetensors"), metadata=card.to_metadata())
    sys.modules.pop("mynets", None)
    with pytest.raises(CheckpointError, match="names the Python factory 'mynets:tiny'"):
        load_model(tmp_path / "f.safetensors")
    assert "mynets" not in sys.modules
    model, _ = load_model(tmp_path / "f.safetensors", ModelOverrides(arch="mynets:tiny"))
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 2)


def test_absurd_sizes_refused_before_allocating(tmp_path):
    # mlp with hidden 1,500,000 on 1×28×28: 784·1.5e6 + 1.5e6 + 1.5e6·10 + 10 = 1,192,500,010 parameters (4.4 GiB)
    card = ModelCard(arch="mlp", num_classes=10, input=InputSpec(1, 28, 28, (0.0,), (1.0,)),
                     arch_kwargs={"hidden": 1_500_000})
    small = build_net("mlp", 10, 1, (28, 28), hidden=4)
    safetensors.torch.save_file(small.state_dict(), str(tmp_path / "m.safetensors"), metadata=card.to_metadata())
    start = time.perf_counter()
    with pytest.raises(ModelfixError, match="has 1,192,500,010 parameters, above the limit"):
        load_model(tmp_path / "m.safetensors")
    assert time.perf_counter() - start < 5  # nothing of 9 GB was allocated or initialised
    with pytest.raises(ModelfixError, match="too large"):
        build_net("resnet18", 10, 3, (100000, 100000))
    card = ModelCard(arch="egem-cnn", num_classes=10, input=InputSpec(1, 100000, 100000, (0.0,), (1.0,)))
    safetensors.torch.save_file(small.state_dict(), str(tmp_path / "big.safetensors"), metadata=card.to_metadata())
    with pytest.raises(ModelfixError, match="too large"):
        load_model(tmp_path / "big.safetensors")


def test_deeply_nested_json_is_a_user_error(tmp_path):
    net = build_net("egem-cnn", 2, 1, (28, 28))
    safetensors.torch.save_file(net.state_dict(), str(tmp_path / "m.safetensors"))
    (tmp_path / "m.card.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nests 100000 levels deep"):
        load_model(tmp_path / "m.safetensors")
    (tmp_path / "m.card.json").unlink()
    (tmp_path / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(CheckpointError, match="config.json nests 100000 levels"):
        load_model(tmp_path / "m.safetensors", ModelOverrides(arch="egem-cnn"))


def test_timm_models_when_installed(tmp_path):
    timm = pytest.importorskip("timm")
    net = build_net("timm:resnet18", 3, 1, (64, 64))
    assert net.conv1.in_channels == 1 and net.fc.out_features == 3
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    safetensors.torch.save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "resnet18", "num_classes": 4, "label_names": list("wxyz"),
        "pretrained_cfg": {"input_size": [3, 160, 160], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    model, card = load_model(tmp_path / "model.safetensors")
    assert card.arch == "timm:resnet18" and card.class_names == list("wxyz") and card.input.size == (160, 160)
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(model(x), ref((x - 0.5) / 0.25), atol=1e-5)


# ---- precision -------------------------------------------------------------------------------------------------


def test_bf16_autocast_runs_on_cpu_forward_and_backward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    x = torch.rand(5, 3, 8, 8)
    with autocast("bf16", "cpu"):
        out = net(x)
        loss = nn.functional.cross_entropy(out, torch.tensor([0, 1, 0, 1, 0]))
    assert out.dtype == torch.bfloat16
    scaler = grad_scaler("bf16", "cpu")
    scaler.scale(loss).backward()  # disabled scaler: the plain loss
    assert net[0].weight.grad is not None and net[0].weight.grad.dtype == torch.float32
    assert bool(torch.isfinite(net[0].weight.grad).all()) and float(net[0].weight.grad.abs().sum()) > 0
    with autocast("fp32", "cpu"):
        assert net(x).dtype == torch.float32
    with pytest.raises(ModelfixError, match="fp16 needs a CUDA device"):
        autocast("fp16", "cpu")
    with pytest.raises(ModelfixError, match="precision 'fp8'"):
        autocast("fp8", "cpu")
