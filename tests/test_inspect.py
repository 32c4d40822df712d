"""`describe`: layers and shapes from a dry run that leaves the model untouched."""

from __future__ import annotations

import torch

from modelfix.card import InputSpec, ModelCard
from modelfix.inspect_model import describe
from modelfix.zoo import build_model, default_input_spec


def test_describe_tap_cnn_layers_and_shapes():
    card = ModelCard(arch="tap-cnn", num_classes=10, input=default_input_spec("tap-cnn")).with_history({"method": "x"})
    torch.manual_seed(0)
    model = build_model(card).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    info = describe(model, card)
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert [layer["name"] for layer in info["layers"]] == [
        "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc",
    ]
    assert layers["conv1"]["output_shape"] == [100, 28, 28]
    assert layers["pool1"]["output_shape"] == [100, 14, 14] and layers["pool1"]["type"] == "MaxPool2d"
    assert layers["conv2"]["output_shape"] == [100, 12, 12]
    assert layers["flatten"]["output_shape"] == [3600]
    assert layers["fc"]["output_shape"] == [10] and layers["fc"]["params"] == 3600 * 10 + 10
    assert layers["conv1"]["params"] == 100 * 9 + 100
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["output_shape"] == [10] and info["arch"] == "tap-cnn" and info["num_classes"] == 10
    assert all(n == 1 for n in info["calls"].values()) and info["reused"] == []
    assert info["history"][0]["method"] == "x" and info["patches"] == []

    # the model is unchanged: no hooks left, same mode, same weights, same outputs
    assert not model.training
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_describe_resnet_flags_reused_relu_and_keeps_train_mode():
    card = ModelCard(arch="resnet18", num_classes=3, input=InputSpec(3, 32, 32, (0.5,), (0.25,)))
    model = build_model(card).train()
    bn = model.net.bn1
    running = bn.running_mean.clone()
    info = describe(model, card)
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert "layer1" in layers and layers["layer1"]["output_shape"] == [64, 8, 8] and not layers["layer1"]["leaf"]
    assert layers["fc"]["output_shape"] == [3] and layers["fc"]["leaf"]
    assert info["calls"]["layer1.0.relu"] == 2 and "layer1.0.relu" in info["reused"]
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, running)  # the dry run did not update batch-norm statistics
