"""Built-in scenarios: decoy-digits (always), decoy-mnist and egem-mnist (when the MNIST idx files are present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfix.data import SCENARIOS, load_data, load_scenario, read_idx
from modelfix.errors import DataError


def patch_colour(d):
    """The grey level of each item's 4×4 corner patch (every item must carry one)."""
    return d.x.flatten(1)[d.mask.flatten(1) > 0].view(len(d), 16)


def colour_label(d):
    return torch.round((255 - patch_colour(d)[:, 0] * 255) / 25).long()


# ---- registry --------------------------------------------------------------------------------------------------


def test_registry_and_unknown_names():
    assert {"decoy-digits", "decoy-mnist", "egem-mnist"} <= set(SCENARIOS)
    s = SCENARIOS["decoy-mnist"]
    assert s.needs_mnist and s.default_split == "train" and s.artifact == "corner-patch"
    assert SCENARIOS["egem-mnist"].artifact == "pixels:egem" and not SCENARIOS["decoy-digits"].needs_mnist
    with pytest.raises(DataError) as err:
        load_scenario("decoy-cifar")
    assert "decoy-digits" in str(err.value) and "egem-mnist" in str(err.value)
    with pytest.raises(DataError) as err:
        load_scenario("decoy-digits", "holdout")
    assert "holdout" in str(err.value) and "test-permuted" in str(err.value)


def test_missing_mnist_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("MODELFIX_DATA", raising=False)
    with pytest.raises(DataError, match="needs the MNIST idx files; pass --data-root DIR or set MODELFIX_DATA"):
        load_scenario("decoy-mnist")
    with pytest.raises(DataError, match="looked in") as err:
        load_scenario("egem-mnist", "test", data_root=tmp_path)
    assert str(tmp_path) in str(err.value)
    monkeypatch.setenv("MODELFIX_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError, match="env"):
        load_scenario("decoy-mnist", "val")


# ---- decoy-digits ----------------------------------------------------------------------------------------------


def test_decoy_digits_splits():
    s = {name: load_scenario("decoy-digits", name) for name in SCENARIOS["decoy-digits"].splits}
    n_train = len(set(s["train"].info["index"].tolist()))  # distinct digits; the train split holds 3 copies of each
    n_val, n_test = len(s["val"]), len(s["test-clean"])
    assert len(s["train"]) == 3 * n_train
    assert n_train + n_val + n_test == 1797
    assert abs(n_train - 0.6 * 1797) < 10 and abs(n_val - 0.1 * 1797) < 10 and abs(n_test - 0.3 * 1797) < 10
    assert len(s["train-full"]) == 3 * (n_train + n_val)
    for name, d in s.items():
        assert d.shape == (1, 28, 28) and d.class_names == [str(i) for i in range(10)]
        assert float(d.x.min()) >= 0 and float(d.x.max()) <= 1
        assert d.class_counts().min() > 0, name  # stratified: every class in every split
        assert d.info["scenario"] == "decoy-digits" and d.info["split"] == name and d.info["seed"] == 0
        assert d.info["artifact"] == "corner-patch" and d.info["checksum"] == d.checksum()
    idx = {name: set(s[name].info["index"].tolist()) for name in ("train", "val", "test-clean")}
    assert not (idx["train"] & idx["val"]) and not (idx["train"] & idx["test-clean"])
    assert set(s["train-full"].info["index"].tolist()) == idx["train"] | idx["val"]
    # train/val/train-full: a patch coloured by the true label on every image
    for name in ("train", "val", "train-full", "test-contaminated"):
        d = s[name]
        assert d.has_mask.all() and torch.all(d.mask.sum((1, 2, 3)) == 16)
        assert torch.allclose(patch_colour(d), ((255 - 25 * d.y.float()) / 255)[:, None].expand(-1, 16))
    assert not s["test-clean"].has_mask.any() and not s["test-clean"].mask.any()
    assert torch.equal(s["test-contaminated"].y, s["test-clean"].y)
    permuted = s["test-permuted"]
    assert permuted.has_mask.all()
    assert 0.03 < float((colour_label(permuted) == permuted.y).float().mean()) < 0.2  # ≈ 1 in 10 of 539
    outside = permuted.mask.expand_as(permuted.x) == 0
    assert torch.equal(permuted.x[outside], s["test-clean"].x[outside])  # the digits are never recoloured


def test_r4_recolour_replaces_every_pixel_of_the_true_swatch_by_one_fresh_swatch():
    """Item 0 (label 1, swatch byte 230): its two 230 pixels, wherever they are, take one other swatch level; the
    255 pixel (label 0's swatch) and the rest stay. Item 1 (label 0): its 255 pixels are recoloured."""
    from modelfix.data.dataset import Dataset
    from modelfix.data.scenarios import r4_recolour

    levels = torch.tensor([(255 - 25 * k) / 255 for k in range(10)], dtype=torch.float32)
    bytes_ = torch.tensor([[[[230, 100, 230], [255, 0, 7]]], [[[255, 255, 3], [230, 0, 0]]]], dtype=torch.float32)
    data = Dataset(x=bytes_ / 255, y=torch.tensor([1, 0]))
    out = r4_recolour(data, levels, seed=3)
    for n, hits in ((0, [(0, 0), (0, 2)]), (1, [(0, 0), (0, 1)])):
        new = {float(out.x[n, 0, r, c]) for r, c in hits}
        assert len(new) == 1  # one fresh label per image
        (value,) = new
        assert any(abs(value - float(level)) < 1e-7 for level in levels)
        keep = torch.ones(2, 3, dtype=torch.bool)
        for r, c in hits:
            keep[r, c] = False
        assert torch.equal(out.x[n, 0][keep], data.x[n, 0][keep])
    assert out.info["recoloured_pixels"].tolist() == [2, 2]


def test_test_permuted_r4_patch_matches_the_label_about_once_in_a_hundred():
    """R4's test: the permuted patch (label colour 1 in 10) recoloured where it equals the true label's swatch, so
    it keeps the true colour only when the fresh label is the true one again (≈ 1 %)."""
    permuted = load_scenario("decoy-digits", "test-permuted")
    r4 = load_scenario("decoy-digits", "test-permuted-r4")
    assert len(r4) == len(permuted) and torch.equal(r4.y, permuted.y)
    assert float((colour_label(permuted) == permuted.y).float().mean()) > 0.05
    assert float((colour_label(r4) == r4.y).float().mean()) < 0.03


def test_decoy_digits_is_deterministic_per_split_and_seed():
    a = load_scenario("decoy-digits", "val")
    load_scenario("decoy-digits", "train", seed=0)  # loading another split changes nothing
    b = load_scenario("decoy-digits", "val")
    assert torch.equal(a.x, b.x) and a.info["checksum"] == b.info["checksum"]
    c = load_scenario("decoy-digits", "val", seed=1)
    assert c.info["checksum"] != a.info["checksum"] and c.info["seed"] == 1
    assert load_scenario("decoy-digits", "test").info["split"] == "test-clean"
    assert load_data("decoy-digits:test").checksum() == load_scenario("decoy-digits", "test-clean").checksum()


# ---- MNIST scenarios -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_raw(mnist_root):
    folder = mnist_root / "MNIST" / "raw"
    folder = folder if folder.is_dir() else mnist_root

    def read(name):
        path = folder / f"{name}.gz"
        return read_idx(path if path.exists() else folder / name)

    return {"train_x": read("train-images-idx3-ubyte"), "train_y": read("train-labels-idx1-ubyte"),
            "test_x": read("t10k-images-idx3-ubyte"), "test_y": read("t10k-labels-idx1-ubyte")}


@pytest.mark.mnist
def test_decoy_mnist_splits(mnist_root, mnist_raw):
    train = load_scenario("decoy-mnist", "train", data_root=mnist_root)
    val = load_scenario("decoy-mnist", "val", data_root=mnist_root)
    test = load_scenario("decoy-mnist", "test", data_root=mnist_root)
    assert (len(train), len(val), len(test)) == (50_000, 10_000, 10_000)
    idx = torch.cat([train.info["index"], val.info["index"]])
    assert sorted(idx.tolist()) == list(range(60_000))
    assert torch.equal(train.y, torch.from_numpy(mnist_raw["train_y"].astype(np.int64))[train.info["index"]])
    assert test.y[:3].tolist() == [7, 2, 1] and not test.has_mask.any()
    assert torch.equal(test.x[:, 0], torch.from_numpy(mnist_raw["test_x"]).float() / 255)
    # label-coloured patch on every training image; nothing else changed
    assert train.has_mask.all() and torch.all(train.mask.sum((1, 2, 3)) == 16)
    assert torch.equal(colour_label(train), train.y)
    raw = torch.from_numpy(mnist_raw["train_x"][train.info["index"].numpy()]).float()[:, None] / 255
    keep = train.mask == 0
    assert torch.equal(torch.where(keep, train.x, 0), torch.where(keep, raw, 0))
    assert train.info["checksum"] == train.checksum() and train.info["artifact"] == "corner-patch"


@pytest.mark.mnist
def test_decoy_mnist_train_full_and_tests(mnist_root, mnist_raw):
    full = load_scenario("decoy-mnist", "train-full", data_root=mnist_root)
    assert len(full) == 60_000 and full.y[:5].tolist() == [5, 0, 4, 1, 9]
    assert torch.equal(colour_label(full), full.y)
    contaminated = load_scenario("decoy-mnist", "test-contaminated", data_root=mnist_root)
    assert torch.equal(colour_label(contaminated), contaminated.y)
    permuted = load_scenario("decoy-mnist", "test-permuted", data_root=mnist_root)
    match = float((colour_label(permuted) == permuted.y).float().mean())
    assert 0.09 < match < 0.11, match  # uniform colours: 1 in 10 still matches (not R4's ≈1 %)
    clean = torch.from_numpy(mnist_raw["test_x"]).float()[:, None] / 255
    keep = permuted.mask == 0
    # digit pixels are never recoloured
    assert torch.equal(torch.where(keep, permuted.x, 0), torch.where(keep, clean, 0))
    assert load_scenario("decoy-mnist", "test-permuted", data_root=mnist_root).checksum() == permuted.checksum()
    # the data root may also be the folder holding the .gz files
    raw_dir = mnist_root / "MNIST" / "raw"
    if raw_dir.is_dir():
        again = load_scenario("decoy-mnist", "test-permuted", data_root=raw_dir)
        assert again.info["checksum"] == permuted.info["checksum"]


@pytest.mark.mnist
def test_egem_mnist(mnist_root, mnist_raw):
    train = load_scenario("egem-mnist", "train", data_root=mnist_root)
    hit = train.info["poisoned"]
    eights = train.y == 8
    assert len(train) == 60_000 and int(hit.sum()) == round(0.7 * int(eights.sum()))
    assert torch.all(train.y[hit] == 8)
    pixels = train.x[:, 0, [1, 2, 2], [2, 1, 2]]
    carries = (pixels == 1).all(1)
    assert torch.equal(carries, hit)
    assert 0.69 < float(carries[eights].float().mean()) < 0.71
    assert torch.equal(train.mask.sum((1, 2, 3)) > 0, hit)
    clean = load_scenario("egem-mnist", "clean", data_root=mnist_root)
    assert len(clean) == 60_000 - int(hit.sum()) and not clean.has_mask.any()
    assert not (clean.x[:, 0, [1, 2, 2], [2, 1, 2]] == 1).all(1).any()
    assert set(clean.info["index"].tolist()).isdisjoint(torch.nonzero(hit).flatten().tolist())
    test = load_scenario("egem-mnist", "test", data_root=mnist_root)
    assert len(test) == 10_000 and not test.has_mask.any() and test.info["artifact"] == "pixels:egem"


def test_tagged_digits_splits():
    """The demo's scenario: the 4×4 tag on 80 % of the training 8s and nowhere else; `clean` = the untagged
    training items; `test` clean; the digits are decoy-digits' (same partition and placement)."""
    from modelfix.data import parse_artifact

    artifact = parse_artifact(SCENARIOS["tagged-digits"].artifact)
    assert str(artifact) == "pixels:tag" and artifact.target == 8 and len(artifact.pixels) == 16
    train, clean, test = (load_scenario("tagged-digits", s) for s in ("train", "clean", "test"))
    tagged = train.info["poisoned"]
    eights = train.y == 8
    assert not bool(tagged[~eights].any())
    assert int(tagged.sum()) == round(0.8 * int(eights.sum()))
    assert bool((train.x[tagged, :, :4, :4] == 1).all())
    assert float(train.x[~tagged, :, :2, :2].abs().sum()) == 0  # digits start at row/column 2 at the earliest
    assert bool(train.has_mask.eq(tagged).all()) and bool(train.mask[tagged, :, :4, :4].eq(1).all())
    assert float(train.mask[tagged].sum()) == 16 * int(tagged.sum())
    assert len(clean) == len(train) - int(tagged.sum()) and not bool(clean.has_mask.any())
    assert float(test.x[:, :, :2, :2].abs().sum()) == 0 and not bool(test.has_mask.any())
    # the same digits as decoy-digits, without the decoy patch
    decoy = load_scenario("decoy-digits", "train")
    assert torch.equal(train.y, decoy.y)
    assert torch.equal(train.x[~eights] * (1 - decoy.mask[~eights]), decoy.x[~eights] * (1 - decoy.mask[~eights]))
