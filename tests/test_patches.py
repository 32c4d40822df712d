"""Patches: save → load → same outputs; deep copies stay independent; a plain loader must fail on a patched file."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelfix.card import ModelCard
from modelfix.checkpoint import load_model, save_model
from modelfix.errors import CheckpointError, ModelfixError
from modelfix.repair.patches import (ChannelScale, PCAffine, PCASumRatio, attach_patch, patch_entries, patch_state,
                                     remove_patch, remove_patches)
from modelfix.zoo import build_model, build_net, default_input_spec


@pytest.fixture
def model():
    torch.manual_seed(0)
    card = ModelCard(arch="egem-cnn", num_classes=10, input=default_input_spec("egem-cnn"))
    return build_model(card).eval(), card


def test_patch_modules_compute_their_formulas():
    x = torch.randn(3, 4, 5, 5)
    c = torch.tensor([0.0, 0.5, 1.0, 2.0])
    assert torch.allclose(ChannelScale(c)(x), x * c.view(1, 4, 1, 1))
    a = torch.randn(6, 3)
    m, mean = torch.randn(3, 3), torch.randn(3)
    assert torch.allclose(PCAffine(m, mean)(a), mean + (a - mean) @ m.T, atol=1e-6)
    # position mode: the same affine map at every pixel
    y = PCAffine(m, mean)(x[:, :3])
    pixel = x[1, :3, 2, 3]
    assert torch.allclose(y[1, :, 2, 3], mean + m @ (pixel - mean), atol=1e-5)
    # sum ratio: channel sums become ā + M(s − ā), maps are rescaled channel-wise
    m4, mean4 = torch.randn(4, 4), torch.randn(4)
    out = PCASumRatio(m4, mean4)(x)
    s = x.sum(dim=(2, 3))
    assert torch.allclose(out.sum(dim=(2, 3)), mean4 + (s - mean4) @ m4.T, atol=1e-4)
    assert torch.allclose(out / x, (out / x)[:, :, :1, :1].expand_as(x), atol=1e-4)


def test_save_load_same_outputs_and_plain_loader_fails(model, tmp_path):
    net_model, card = model
    x = torch.rand(5, 1, 28, 28)
    before = net_model(x)
    attach_patch(net_model, "relu1", ChannelScale(torch.rand(8)), {"alpha": 0.1})
    attach_patch(net_model, "relu3", PCAffine(torch.eye(200) * 0.5, torch.rand(200)))
    patched = net_model(x)
    assert not torch.allclose(patched, before)
    path = save_model(net_model, card, tmp_path / "p.safetensors")
    loaded, loaded_card = load_model(path)
    assert torch.allclose(loaded(x), patched, atol=1e-6)
    assert [e["kind"] for e in loaded_card.patches] == ["channel_scale", "pca_affine"]
    assert loaded_card.patches[0]["alpha"] == 0.1
    sidecar = json.loads((tmp_path / "p.card.json").read_text())
    assert [e["target"] for e in sidecar["patches"]] == ["relu1", "relu3"]
    # a re-save writes the same patches again
    path2 = save_model(loaded, loaded_card, tmp_path / "q.safetensors")
    assert set(load_file(path2)) == set(load_file(path))
    # the plain architecture refuses the file instead of silently dropping the repair
    with pytest.raises(RuntimeError, match="modelfix.patch"):
        build_net("egem-cnn", 10, 1, (28, 28)).load_state_dict(load_file(path))


def test_deepcopy_copies_patches_and_removal_restores(model):
    net_model, _ = model
    x = torch.rand(2, 1, 28, 28)
    before = net_model(x)
    attach_patch(net_model, "relu2", ChannelScale(torch.zeros(16)))
    clone = copy.deepcopy(net_model)
    clone.patches["p0"].scale.fill_(1.0)  # the copy's hook must use the copy's patch
    assert torch.allclose(clone(x), before, atol=1e-6)
    assert not torch.allclose(net_model(x), before)
    remove_patches(net_model)
    assert patch_entries(net_model) == [] and patch_state(net_model) == ({}, [])
    assert torch.allclose(net_model(x), before)
    assert all(not m._forward_hooks for m in net_model.modules())


def test_patches_on_one_target_run_in_order(model):
    net_model, _ = model
    attach_patch(net_model, "relu3", ChannelScale(torch.full((200,), 2.0)))
    attach_patch(net_model, "relu3", PCAffine(torch.zeros(200, 200), torch.ones(200)))  # constant 1 after scale
    key = attach_patch(net_model, "relu3", ChannelScale(torch.full((200,), 3.0)))
    seen = {}
    net_model.net.fc2.register_forward_pre_hook(lambda m, args: seen.setdefault("a", args[0]))
    net_model(torch.rand(1, 1, 28, 28))
    assert torch.allclose(seen["a"], torch.full((1, 200), 3.0))
    remove_patch(net_model, key)
    assert [e["key"] for e in patch_entries(net_model)] == ["p0", "p1"]


def test_bad_patch_files_are_refused(model, tmp_path):
    net_model, card = model
    attach_patch(net_model, "relu1", ChannelScale(torch.rand(8)))
    path = save_model(net_model, card, tmp_path / "p.safetensors")
    tensors = load_file(path)
    meta = json.loads((tmp_path / "p.card.json").read_text())

    def write(name, tensors, patches):
        card_dict = dict(meta, patches=patches)
        target = tmp_path / name
        save_file(tensors, str(target), metadata={"format": "pt", "modelfix.card": json.dumps(card_dict)})
        (tmp_path / name.replace(".safetensors", ".card.json")).write_text(json.dumps(card_dict))
        return target

    with pytest.raises(CheckpointError, match="unknown patch kind"):
        load_model(write("a.safetensors", tensors, [dict(meta["patches"][0], kind="magic")]))
    stripped = {k: v for k, v in tensors.items() if not k.startswith("modelfix.patch.")}
    with pytest.raises(CheckpointError, match="lacks its tensor"):
        load_model(write("b.safetensors", stripped, meta["patches"]))
    with pytest.raises(CheckpointError, match="card lists no patches"):
        load_model(write("c.safetensors", tensors, []))
    with pytest.raises(ModelfixError, match="no such module"):
        attach_patch(net_model, "nope", ChannelScale(torch.rand(8)))
