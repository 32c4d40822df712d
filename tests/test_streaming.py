"""Lazy sources flow through evaluate, train and finetune without being decoded whole.

The lazy and the in-memory paths must give the same numbers and weights (same order, same batches), a command on a
lazy source never decodes the whole source, the artifact is pasted after the transform, and `--max-steps` caps a
run. Expected counts and squares are worked out by hand in the comments.
"""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from modelfix.card import InputSpec, ModelCard
from modelfix.checkpoint import save_model
from modelfix.cli import app
from modelfix.data import Dataset, batches, open_source, save_bundle, to_dataset
from modelfix.data.poison import poisoned_chunks
from modelfix.evaluate import evaluate
from modelfix.training import TrainConfig, train
from modelfix.zoo import build_model

poison_module = importlib.import_module("modelfix.data.poison")  # the package's `poison` names the function
stream = importlib.import_module("modelfix.data.stream")
CLASSES = 3
PER_CLASS = 6
SIZE = 16


def _folder(root):
    """3 classes × 6 RGB images of mixed sizes (18–30 px a side), each with a mask marking its top-left 5×5."""
    rng = np.random.default_rng(0)
    for k in range(CLASSES):
        for i in range(PER_CLASS):
            h, w = (int(v) for v in rng.integers(18, 31, 2))
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), np.uint8)
            mask[:5, :5] = 255
            for kind, arr in (("images", img), ("masks", mask)):
                (root / kind / f"c{k}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / kind / f"c{k}" / f"{i}.png")
    return root


@pytest.fixture
def setup(tmp_path):
    root = _folder(tmp_path)
    card = ModelCard(arch="tap-cnn", num_classes=CLASSES, input=InputSpec(3, SIZE, SIZE, (0.5,), (0.25,)),
                     class_names=[f"c{k}" for k in range(CLASSES)], artifact="corner-patch,size=4,num_classes=3")
    torch.manual_seed(0)
    model = build_model(card)
    save_model(model, card, tmp_path / "model.safetensors")
    source = open_source(root / "images", 3, SIZE, SIZE, resize="shorter", mask_dir=root / "masks",
                         class_names=card.class_names)
    save_bundle(to_dataset(source), tmp_path / "same.npz")  # the same items decoded, in memory
    return tmp_path, model, source


class Budget(Dataset):
    """A Dataset that refuses to hold more than `limit` items: stands in for the one `to_dataset` builds."""

    limit = 8

    def __post_init__(self):
        if len(self.x) > self.limit:
            raise AssertionError(f"{len(self.x)} items decoded into memory at once (budget {self.limit})")
        super().__post_init__()


def _invoke(args):
    result = CliRunner().invoke(app, ["--no-progress", *args])
    assert result.exit_code == 0, result.output
    return result


def test_lazy_evaluate_equals_in_memory_and_never_decodes_the_source(setup, monkeypatch):
    tmp, _, _ = setup
    common = ["evaluate", str(tmp / "model.safetensors"), "--poison", "0,0.5,1", "--labels", "correlated,random",
              "--batch-size", "4", "--json"]
    memory = json.loads(_invoke([*common, "--data", str(tmp / "same.npz")]).stdout)
    monkeypatch.setattr(stream, "Dataset", Budget)  # from here on no more than 8 items may be decoded at once
    lazy = json.loads(_invoke([*common, "--data", str(tmp / "images"), "--resize", "shorter"]).stdout)
    assert len(lazy["levels"]) == 5  # level 0, then 0.5 and 1 under each of the two label modes
    for a, b in zip(lazy["levels"], memory["levels"]):
        assert a == b
    # level 0.5 poisons round(0.5 · 18) = 9 items (labels random: every item eligible), level 1 all 18
    assert [row["n_poisoned"] for row in lazy["levels"]] == [0, 9, 9, 18, 18]


def test_lazy_finetune_rrr_equals_in_memory_weights_and_never_decodes_the_source(setup, monkeypatch):
    tmp, _, _ = setup
    common = ["finetune", str(tmp / "model.safetensors"), "--method", "rrr", "--lambda", "1", "--epochs", "1",
              "--batch-size", "4", "--select-by", "accuracy", "--optimizer", "sgd", "--lr", "0.05"]
    _invoke([*common, "--data", str(tmp / "same.npz"), "-o", str(tmp / "memory.safetensors")])
    monkeypatch.setattr(stream, "Dataset", Budget)
    _invoke([*common, "--data", str(tmp / "images"), "--masks", str(tmp / "masks"), "--resize", "shorter",
             "-o", str(tmp / "lazy.safetensors")])
    memory, lazy = load_file(tmp / "memory.safetensors"), load_file(tmp / "lazy.safetensors")
    original = load_file(tmp / "model.safetensors")
    assert memory.keys() == lazy.keys()
    assert any(not torch.equal(memory[k], original[k]) for k in memory)  # the fine-tune moved the weights
    for k in memory:
        assert torch.equal(memory[k], lazy[k]), k


def test_poisoned_batches_paste_after_the_transform_with_the_chunks_draws(setup, monkeypatch):
    _, _, source = setup
    monkeypatch.setattr(poison_module, "CHUNK", 5)  # chunks of 5 read in batches of 2: 2 + 2 + 1 per chunk
    memory = to_dataset(source)
    lazy = list(poisoned_chunks(source, "corner-patch,size=4,num_classes=3", 1.0, "random", seed=3, batch_size=2))
    whole = list(poisoned_chunks(memory, "corner-patch,size=4,num_classes=3", 1.0, "random", seed=3))
    assert [len(idx) for idx, _, _ in lazy] == [2, 2, 1] * 3 + [2, 1]  # 18 items = chunks 5, 5, 5, 3
    idx = torch.cat([i for i, _, _ in lazy])
    x = torch.cat([x for _, x, _ in lazy])
    footprint = torch.cat([f for _, _, f in lazy])
    assert torch.equal(idx, torch.cat([i for i, _, _ in whole]))
    assert torch.equal(x, torch.cat([x for _, x, _ in whole]))
    assert torch.equal(footprint, torch.cat([f for _, _, f in whole]))
    # pasted on the 16×16 model input: a 4×4 square (16 pixels) in one of its corners, whatever the file's size
    for f in footprint[:, 0]:
        rows, cols = torch.nonzero(f.any(1)).flatten(), torch.nonzero(f.any(0)).flatten()
        assert int(f.sum()) == 16
        assert (int(rows[0]), int(rows[-1])) in ((0, 3), (12, 15)) and (int(cols[0]), int(cols[-1])) in ((0, 3), (12, 15))


def test_max_steps_caps_the_run(setup):
    _, model, source = setup
    calls = []

    def objective(m, batch):
        calls.append(len(batch["y"]))
        return torch.nn.functional.cross_entropy(m(batch["x"]), batch["y"]), {}

    train(model, source, TrainConfig(epochs=2, batch_size=4, max_steps=6), objective, progress=False)
    # 18 items at batch 4: 5 steps per epoch (4, 4, 4, 4, 2); 6 steps = epoch 1 whole and the first of epoch 2
    assert calls == [4, 4, 4, 4, 2, 4]


def test_training_stream_of_a_source_equals_in_memory_batches(setup):
    _, _, source = setup
    memory = to_dataset(source)
    lazy_gen, memory_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(2):  # two epochs from one generator each
        for a, b in zip(batches(source, 4, shuffle=True, generator=lazy_gen),
                        memory.batches(4, shuffle=True, generator=memory_gen)):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"])


def test_source_subset_and_checksum(setup):
    _, _, source = setup
    view = source.subset([4, 0])
    assert len(view) == 2 and view.y.tolist() == [0, 0] and view.items[0] == source.items[4]
    before = source.checksum()
    assert view.checksum() != before
    assert source.subset(range(len(source))).checksum() == before
    path = source.items[0].path
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file touched: the checksum must change
    assert source.checksum() != before


def test_evaluate_api_on_source_equals_dataset(setup):
    _, model, source = setup
    kwargs = dict(levels=(0.0, 1.0), labels=("correlated",), seed=1, batch_size=5, progress=False)
    from modelfix.data import parse_artifact

    art = parse_artifact("corner-patch,size=4,num_classes=3")
    a = evaluate(model, source, art, **kwargs)
    b = evaluate(model, to_dataset(source), art, **kwargs)
    assert a["levels"] == b["levels"]


@pytest.mark.parametrize("command, method", [("refit", "ridge"), ("prune-egem", "pca-egem")])
def test_lazy_posthoc_equals_in_memory_and_decodes_only_its_split(setup, monkeypatch, command, method):
    tmp, _, _ = setup
    # 2 per class: 1 to fit and 1 to validate (ceil(0.2·2) = 1), so each decoded part holds 3 items (budget 8)
    common = [command, str(tmp / "model.safetensors"), "--method", method, "--samples-per-class", "2",
              "--keep-incorrect", "--batch-size", "4", "--json"]
    memory = json.loads(_invoke([*common, "--clean-dir", str(tmp / "same.npz"), "-o", str(tmp / "m.safetensors")]).stdout)
    monkeypatch.setattr(stream, "Dataset", Budget)
    lazy = json.loads(_invoke([*common, "--clean-dir", str(tmp / "images"), "--resize", "shorter",
                               "-o", str(tmp / "l.safetensors")]).stdout)
    assert lazy["selection"] == memory["selection"]
    memory_w, lazy_w = load_file(tmp / "m.safetensors"), load_file(tmp / "l.safetensors")
    assert memory_w.keys() == lazy_w.keys()
    for k in memory_w:
        assert torch.equal(memory_w[k], lazy_w[k]), k


def test_explain_decodes_only_the_items_it_explains(setup, monkeypatch):
    tmp, _, _ = setup
    monkeypatch.setattr(stream, "Dataset", Budget)  # 18 items on disk, at most 8 decoded at once
    _invoke(["explain", str(tmp / "model.safetensors"), "--data", str(tmp / "images"), "--resize", "shorter",
             "--limit", "4", "--method", "gradient", "-o", str(tmp / "maps")])
    assert len(list((tmp / "maps").rglob("*.png"))) >= 4  # a heatmap per explained item


def test_repair_report_on_lazy_eval_data_equals_in_memory(setup):
    tmp, _, _ = setup
    docs = {}
    for name, data in (("memory", [str(tmp / "same.npz")]), ("lazy", [str(tmp / "images"), "--resize", "shorter"])):
        _invoke(["refit", str(tmp / "model.safetensors"), "--method", "ridge", "--clean-dir", str(tmp / "same.npz"),
                 "--samples-per-class", "2", "--keep-incorrect", "--eval-data", *data,
                 "--report", str(tmp / f"report-{name}"), "-o", str(tmp / f"{name}.safetensors")])
        docs[name] = json.loads((tmp / f"report-{name}" / "results.json").read_text())
    for phase in ("before", "after"):  # the before/after evaluation: clean and fully poisoned, 18 items each
        assert docs["lazy"]["evaluation"][phase]["levels"] == docs["memory"]["evaluation"][phase]["levels"]
        assert [row["n"] for row in docs["lazy"]["evaluation"][phase]["levels"]] == [18, 18]
