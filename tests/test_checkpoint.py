"""Model cards, safe checkpoint loading and atomic saving."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import safetensors.torch
import torch
import torchvision
from safetensors import safe_open
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.checkpoint import ModelOverrides, load_model, save_model, sha256_file, sidecar_path
from modelfix.errors import ArchitectureMismatch, CheckpointError, ModelfixError
from modelfix.zoo import build_model, build_net, default_input_spec


def _card(arch: str = "tap-cnn", num_classes: int = 4, **kw) -> ModelCard:
    spec = kw.pop("input", None) or default_input_spec(arch)
    return ModelCard(arch=arch, num_classes=num_classes, input=spec, **kw)


def _model(card: ModelCard, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(card).eval()


def _x(card: ModelCard, n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, card.input.channels, card.input.height, card.input.width, generator=g)


# --------------------------------------------------------------------------------------------------- card


def test_card_dict_round_trip_and_defaults():
    card = _card(class_names=["a", "b", "c", "d"], artifact="corner-patch", dataset={"name": "decoy", "seed": 0})
    d = card.to_dict()
    assert d["schema"] == "modelfix.card/v1"
    assert ModelCard.from_dict(json.loads(card.to_json())) == card
    assert _card(num_classes=3).class_names == ["0", "1", "2"]
    meta = card.to_metadata()
    assert meta["format"] == "pt" and set(meta) == {"format", "modelfix.card", "modelfix.version"}
    assert all(isinstance(v, str) for v in meta.values())
    assert ModelCard.from_metadata(meta) == card
    assert ModelCard.from_metadata({"format": "pt"}) is None


def test_card_from_dict_names_the_bad_field():
    d = _card().to_dict()
    del d["num_classes"]
    with pytest.raises(CheckpointError, match="'num_classes'"):
        ModelCard.from_dict(d)
    d = _card().to_dict()
    d["input"]["mean"] = [0.1, 0.2]  # 2 values for 1 channel
    with pytest.raises(CheckpointError, match="input"):
        ModelCard.from_dict(d)
    d = _card().to_dict()
    del d["input"]["height"]
    with pytest.raises(CheckpointError, match="input.height"):
        ModelCard.from_dict(d)


def test_with_history_is_a_stamped_copy():
    card = _card()
    child = card.with_history({"method": "egem", "seed": 3})
    assert card.history == [] and len(child.history) == 1
    entry = child.history[0]
    assert entry["method"] == "egem" and entry["versions"]["torch"] == torch.__version__
    assert "modelfix" in entry["versions"] and entry["timestamp"].endswith("+00:00")
    assert child.fingerprint() != card.fingerprint() and card.fingerprint() == _card().fingerprint()


def test_input_spec_validates_lengths():
    with pytest.raises(ModelfixError):
        InputSpec(3, 8, 8, mean=(0.1, 0.2), std=(1.0,))
    assert InputSpec.from_dict(InputSpec(3, 8, 8, (0.5,), (0.2, 0.2, 0.2)).to_dict()).std == (0.2, 0.2, 0.2)


# --------------------------------------------------------------------------------------------------- round trip


def test_save_load_round_trip_is_exact(tmp_path):
    card = _card("egem-cnn", 3, class_names=["x", "y", "z"]).with_history({"method": "train", "lr": 0.1})
    model = _model(card)
    out = save_model(model, card, tmp_path / "sub" / "m.safetensors")
    assert out == tmp_path / "sub" / "m.safetensors"

    loaded, loaded_card = load_model(out)
    assert not loaded.training
    assert loaded_card == card
    before, after = model.state_dict(), loaded.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    with torch.no_grad():
        assert torch.equal(model(_x(card)), loaded(_x(card)))

    side = sidecar_path(out)
    assert side.name == "m.card.json" and side.is_file()
    with safe_open(str(out), framework="pt") as f:
        assert ModelCard.from_metadata(f.metadata()) == ModelCard.from_json(side.read_text()) == card
    assert sorted(os.listdir(out.parent)) == ["m.card.json", "m.safetensors"]  # no temp files left
    assert len(sha256_file(out)) == 64


def test_modelfix_file_loads_into_plain_torchvision_model(tmp_path):
    card = _card("resnet18", 3, input=InputSpec(3, 32, 32, (0.5,), (0.25,)))
    model = _model(card)
    path = save_model(model, card, tmp_path / "r18.safetensors")
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    plain.eval()
    x = _x(card, 2)
    with torch.no_grad():
        assert torch.equal(plain((x - 0.5) / 0.25), model(x))


# --------------------------------------------------------------------------------------------------- torch files


def test_wrapped_pt_state_dict_with_module_prefix_and_inferred_shapes(tmp_path):
    torch.manual_seed(0)
    net = build_net("tap-cnn", 7, 3, (28, 28))
    wrapped = {
        "epoch": 12,
        "args": argparse.Namespace(lr=0.1),  # allowed like timm does
        "state_dict": {"module." + k: v for k, v in net.state_dict().items()},
    }
    path = tmp_path / "ckpt.pth"
    torch.save(wrapped, path)
    model, card = load_model(path, ModelOverrides(arch="tap-cnn"))
    assert card.num_classes == 7 and card.input.channels == 3  # inferred from fc.weight and conv1.weight
    assert (card.input.height, card.input.width) == (28, 28) and card.class_names == [str(i) for i in range(7)]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in model.net.state_dict().items())
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 7)


def test_pt_with_net_prefix_sidecar_and_overrides(tmp_path):
    card = _card("mlp", 2, class_names=["cat", "dog"])
    model = _model(card)
    path = tmp_path / "classifier.pt"
    torch.save({"model": model.state_dict()}, path)  # Classifier keys: net.fc1.weight, ...
    sidecar_path(path).write_text(card.to_json(indent=2))
    loaded, loaded_card = load_model(path)
    assert loaded_card == card
    _, renamed = load_model(path, ModelOverrides(class_names=["no", "yes"], mean=(0.5,), std=(0.5,)))
    assert renamed.class_names == ["no", "yes"] and renamed.input.mean == (0.5,) and renamed.arch == "mlp"


def test_pickled_full_model_is_refused_unless_trusted(tmp_path):
    torch.manual_seed(0)
    net = build_net("crayon-mlp", 3, 1, (28, 28))
    path = tmp_path / "full.pt"
    torch.save(net, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, ModelOverrides(arch="crayon-mlp"))
    message = str(err.value)
    assert "--trust-checkpoint" in message and "pickled" in message and "Sequential" in message
    assert str(path) in message
    model, card = load_model(path, ModelOverrides(arch="crayon-mlp"), trust=True)
    assert card.num_classes == 3
    assert all(torch.equal(net.state_dict()[k], v) for k, v in model.net.state_dict().items())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_is_refused(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.trace(nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_model(path, ModelOverrides(arch="mlp"))


# --------------------------------------------------------------------------------------------------- errors


def test_num_classes_mismatch_names_key_and_hints(tmp_path):
    card = _card("tap-cnn", 2)
    path = save_model(_model(card), card, tmp_path / "two.safetensors")
    with pytest.raises(ArchitectureMismatch) as err:
        load_model(path, ModelOverrides(num_classes=10))
    message = str(err.value)
    assert "fc.weight" in message and "--num-classes 2" in message and str(path) in message


def test_wrong_arch_lists_keys(tmp_path):
    card = _card("mlp", 10)
    path = save_model(_model(card), card, tmp_path / "m.safetensors")
    with pytest.raises(ArchitectureMismatch, match="missing keys: fc3.weight, fc3.bias") as err:
        load_model(path, ModelOverrides(arch="crayon-mlp", num_classes=10))
    assert "fc1.weight has shape (512, 784) in the file but (50, 784)" in str(err.value)
    assert "--arch" in str(err.value)


def test_card_less_checkpoint_needs_arch(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(build_net("mlp", 10, 1, (28, 28)).state_dict(), path)
    with pytest.raises(CheckpointError, match="no model card; pass --arch") as err:
        load_model(path)
    assert "resnet18" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ModelfixError, match="unknown architecture"):
        load_model(path, ModelOverrides(arch="resnet9000"))


def test_missing_file_and_corrupt_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_model(bad)
    card = _card("mlp", 10)
    good = save_model(_model(card), card, tmp_path / "good.safetensors")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_model(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_model(garbage, ModelOverrides(arch="mlp"))


def test_unknown_patch_kind_is_refused(tmp_path):
    card = _card("mlp", 10, patches=[{"kind": "from-the-future", "after": "fc1"}])
    tensors = {k: v.contiguous() for k, v in _model(card).net.state_dict().items()}
    tensors["modelfix.patch.0.scale"] = torch.ones(512)
    path = tmp_path / "future.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=card.to_metadata())
    with pytest.raises(CheckpointError, match="unknown patch kind 'from-the-future'"):
        load_model(path)


# --------------------------------------------------------------------------------------------------- saving


def test_saving_over_an_input_is_refused(tmp_path):
    card = _card("mlp", 10)
    model = _model(card)
    src = save_model(model, card, tmp_path / "in.safetensors")
    before = src.read_bytes()
    with pytest.raises(ModelfixError, match="refusing"):
        save_model(model, card, tmp_path / "." / "in.safetensors", inputs=[str(src)])
    with pytest.raises(ModelfixError, match="safetensors"):
        save_model(model, card, tmp_path / "out.pt")
    assert src.read_bytes() == before


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    card = _card("mlp", 10)
    model = _model(card)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_model(model, card, out_dir / "m.safetensors")
    assert os.listdir(out_dir) == []
    monkeypatch.undo()

    # a failure after the weights are in place (renaming the sidecar) removes them too
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr("modelfix.checkpoint.os.replace", flaky_replace)
    with pytest.raises(ModelfixError, match="cannot write"):
        save_model(model, card, out_dir / "m.safetensors")
    assert os.listdir(out_dir) == []
