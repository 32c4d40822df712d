"""Dataset, idx files, image folders (with masks), bundles, save_folder and load_data."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from modelfix.data import Dataset, load_bundle, load_data, load_folder, read_idx, save_bundle, save_folder
from modelfix.errors import DataError

# ---- helpers ---------------------------------------------------------------------------------------------------


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload


def png(path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def grey(value: int, h: int = 5, w: int = 6) -> np.ndarray:
    arr = np.full((h, w), value, dtype=np.uint8)
    arr[0, 0] = 255 - value
    return arr


def make_folder(root):
    """cat: 2 grey images, dog: 1; a mask for cat/a and dog/c."""
    png(root / "images" / "cat" / "a.png", grey(10))
    png(root / "images" / "cat" / "b.png", grey(20))
    png(root / "images" / "dog" / "c.png", grey(30))
    m = np.zeros((5, 6), np.uint8)
    m[1:3, 2:4] = 7  # any nonzero value marks spurious
    png(root / "masks" / "cat" / "a.png", m)
    (root / "masks" / "dog").mkdir(parents=True)
    np.save(root / "masks" / "dog" / "c.npy", m > 0)
    return root / "images", root / "masks"


# ---- Dataset ---------------------------------------------------------------------------------------------------


def small_dataset(n=10, c=1, h=4, w=5, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g).float() / 255
    y = torch.arange(n) % 3
    mask = (torch.rand(n, 1, h, w, generator=g) > 0.7).float()
    has_mask = torch.arange(n) % 2 == 0
    return Dataset(x=x, y=y, mask=mask * has_mask.view(n, 1, 1, 1), has_mask=has_mask, class_names=["a", "b", "c"],
                   name="small")


def test_dataset_defaults_and_accessors():
    d = Dataset(x=torch.zeros(4, 1, 3, 3), y=torch.tensor([0, 2, 2, 1]))
    assert d.class_names == ["0", "1", "2"] and d.num_classes == 3 and d.shape == (1, 3, 3)
    assert d.mask.shape == (4, 1, 3, 3) and not d.has_mask.any() and torch.equal(d.group, d.y)
    assert d.group_names == d.class_names
    assert d.class_counts().tolist() == [1, 1, 2]
    x, y, m, g = d[1]
    assert x.shape == (1, 3, 3) and int(y) == 2 and m.shape == (1, 3, 3) and int(g) == 2
    assert len(d) == 4 and d.x.dtype == torch.float32 and d.y.dtype == torch.int64


@pytest.mark.parametrize("kwargs, words", [
    ({"x": torch.zeros(4, 3, 3), "y": torch.zeros(4, dtype=torch.long)}, "N×C×H×W"),
    ({"x": torch.zeros(4, 1, 3, 3), "y": torch.zeros(3, dtype=torch.long)}, "y must have shape"),
    ({"x": torch.zeros(4, 1, 3, 3), "y": torch.zeros(4, dtype=torch.long), "mask": torch.zeros(4, 1, 2, 3)}, "mask"),
    ({"x": torch.zeros(4, 1, 3, 3), "y": torch.tensor([0, 1, 2, 3]), "class_names": ["a", "b"]}, "label 3"),
    ({"x": torch.zeros(4, 1, 3, 3), "y": torch.zeros(4, dtype=torch.long), "group": torch.zeros(5, dtype=torch.long)},
     "group"),
    ({"x": torch.full((2, 1, 3, 3), float("nan")), "y": torch.zeros(2, dtype=torch.long)}, "NaN"),
])
def test_dataset_validates(kwargs, words):
    with pytest.raises(DataError, match=words):
        Dataset(**kwargs)


def test_batches_in_order_and_shuffled():
    d = small_dataset(n=10)
    batches = list(d.batches(4))
    assert [len(b["y"]) for b in batches] == [4, 4, 2]
    assert set(batches[0]) == {"x", "y", "mask", "has_mask", "group", "index"}
    assert torch.equal(torch.cat([b["x"] for b in batches]), d.x)
    g = torch.Generator().manual_seed(3)
    shuffled = list(d.batches(4, shuffle=True, generator=g))
    index = torch.cat([b["index"] for b in shuffled])
    assert sorted(index.tolist()) == list(range(10)) and index.tolist() != list(range(10))
    assert torch.equal(torch.cat([b["x"] for b in shuffled]), d.x[index])
    assert torch.equal(torch.cat([b["mask"] for b in shuffled]), d.mask[index])
    assert [len(b["y"]) for b in d.batches(4, drop_last=True)] == [4, 4]


def test_subset_with_and_checksum():
    d = small_dataset(n=10)
    d.info.update(poisoned=torch.arange(10) < 3, checksum=d.checksum(), source="test")
    s = d.subset(torch.tensor([0, 5, 2]))
    assert torch.equal(s.x, d.x[[0, 5, 2]]) and s.y.tolist() == [0, 2, 2]
    assert s.info["poisoned"].tolist() == [True, False, True] and "checksum" not in s.info
    assert s.info["source"] == "test"
    assert len(d.subset(d.y == 0)) == 4
    assert len(d.subset(slice(2, 5))) == 3
    e = d.with_(name="other")
    assert e.name == "other" and e.x is d.x and e.checksum() == d.checksum()
    assert len(d.checksum()) == 16
    assert d.with_(x=d.x.flip(0)).checksum() != d.checksum()
    assert d.with_(y=d.y.flip(0), group=None).checksum() != d.checksum()
    assert d.with_(mask=torch.zeros_like(d.mask)).checksum() != d.checksum()


# ---- idx -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_images_and_labels(tmp_path, compress):
    pixels = bytes(range(24))
    images = idx_bytes(2051, (2, 3, 4), pixels)
    labels = idx_bytes(2049, (2,), bytes([7, 3]))
    for name, data in (("img", images), ("lbl", labels)):
        (tmp_path / name).write_bytes(gzip.compress(data) if compress else data)
    arr = read_idx(tmp_path / "img")
    assert arr.shape == (2, 3, 4) and arr.dtype == np.uint8
    assert arr.flatten().tolist() == list(range(24))
    assert read_idx(tmp_path / "lbl").tolist() == [7, 3]


@pytest.mark.parametrize("name, data, words", [
    ("badmagic", idx_bytes(2052, (2, 3, 4), bytes(24)), "magic 2052"),
    ("truncated", idx_bytes(2051, (2, 3, 4), bytes(23)), "23 bytes"),
    ("padded", idx_bytes(2049, (2,), bytes(3)), "3 bytes"),
    ("short", b"\x00\x00\x08", "too short"),
    ("shortheader", struct.pack(">II", 2051, 2), "too short"),
])
def test_read_idx_rejects_corruption(tmp_path, name, data, words):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError, match=words) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_rejects_broken_gzip_and_missing(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(2049, (100,), bytes(100)))[:20])
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(path)
    with pytest.raises(DataError, match="nothere"):
        read_idx(tmp_path / "nothere")


# ---- folders ---------------------------------------------------------------------------------------------------


def test_load_folder_with_masks(tmp_path):
    images, masks = make_folder(tmp_path / "d")
    d = load_folder(images, mask_dir=masks)
    assert d.class_names == ["cat", "dog"] and d.y.tolist() == [0, 0, 1]
    assert d.shape == (1, 5, 6)
    assert torch.allclose(d.x[0, 0], torch.from_numpy(grey(10)).float() / 255)
    assert d.has_mask.tolist() == [True, False, True]
    expected = torch.zeros(5, 6)
    expected[1:3, 2:4] = 1
    assert torch.equal(d.mask[0, 0], expected) and torch.equal(d.mask[2, 0], expected)
    assert not d.mask[1].any()
    assert d.info["files"] == ["cat/a.png", "cat/b.png", "dog/c.png"]
    # the images/ + masks/ layout is found on its own
    auto = load_folder(tmp_path / "d")
    assert torch.equal(auto.mask, d.mask) and torch.equal(auto.x, d.x)


def test_load_folder_maps_classes_to_the_model(tmp_path):
    images, _ = make_folder(tmp_path / "d")
    d = load_folder(images, class_names=["bird", "dog", "cat"])
    assert d.class_names == ["bird", "dog", "cat"] and d.num_classes == 3
    assert d.y.tolist() == [2, 2, 1]
    with pytest.raises(DataError) as err:
        load_folder(images, class_names=["bird", "dog"])
    assert "'cat'" in str(err.value) and str(images) in str(err.value)


def test_load_folder_numeric_classes_sort_numerically(tmp_path):
    for name in ("10", "2", "1"):
        png(tmp_path / name / "x.png", grey(3))
    assert load_folder(tmp_path).class_names == ["1", "2", "10"]


def test_load_folder_file_kinds(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    png(tmp_path / "rgb" / "a" / "x.png", rgb)
    png(tmp_path / "rgb" / "a" / "y.png", np.dstack([rgb, np.full((5, 6), 128, np.uint8)]))  # RGBA: alpha dropped
    (tmp_path / "rgb" / "b").mkdir()
    np.save(tmp_path / "rgb" / "b" / "hwc.npy", rgb)  # uint8 HWC
    np.save(tmp_path / "rgb" / "b" / "chw.npy", rgb.transpose(2, 0, 1).astype(np.float32) / 255)  # float CHW
    Image.fromarray(rgb).save(tmp_path / "rgb" / "b" / "z.jpg", quality=100, subsampling=0)
    d = load_folder(tmp_path / "rgb")
    want = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert d.shape == (3, 5, 6) and len(d) == 5
    for i, f in enumerate(d.info["files"]):
        if f.endswith(".jpg"):
            assert (d.x[i] - want).abs().max() < 0.1
        else:
            assert torch.allclose(d.x[i], want), f
    (tmp_path / "grey" / "a").mkdir(parents=True)
    np.save(tmp_path / "grey" / "a" / "two_d.npy", np.full((5, 6), 0.25, np.float32))
    g = load_folder(tmp_path / "grey")
    assert g.shape == (1, 5, 6) and torch.allclose(g.x, torch.full((1, 1, 5, 6), 0.25))


def test_folder_errors_name_the_culprit(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty") as err:
        load_folder(tmp_path / "empty")
    assert "empty" in str(err.value)
    png(tmp_path / "loose" / "a.png", grey(1))
    with pytest.raises(DataError, match="no class subfolders"):
        load_folder(tmp_path / "loose")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images") as err:
        load_folder(tmp_path / "noimg")
    assert "cat" in str(err.value)


def test_folder_size_and_channel_mismatch(tmp_path):
    png(tmp_path / "sizes" / "a" / "x.png", grey(1, 5, 6))
    png(tmp_path / "sizes" / "b" / "y.png", grey(1, 6, 6))
    with pytest.raises(DataError, match="sizes") as err:
        load_folder(tmp_path / "sizes")
    assert "x.png" in str(err.value) and "y.png" in str(err.value)
    png(tmp_path / "chans" / "a" / "x.png", grey(1))
    png(tmp_path / "chans" / "a" / "y.png", np.zeros((5, 6, 3), np.uint8))
    with pytest.raises(DataError, match="channel") as err:
        load_folder(tmp_path / "chans")
    assert "x.png" in str(err.value) and "y.png" in str(err.value)


def test_mask_errors_name_the_files(tmp_path):
    png(tmp_path / "img" / "a" / "x.png", grey(1))
    png(tmp_path / "m1" / "a" / "x.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(DataError) as err:
        load_folder(tmp_path / "img", mask_dir=tmp_path / "m1")
    assert "m1/a/x.png" in str(err.value) and "img/a/x.png" in str(err.value)
    png(tmp_path / "m2" / "a" / "orphan.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(DataError, match="orphan.png"):
        load_folder(tmp_path / "img", mask_dir=tmp_path / "m2")
    png(tmp_path / "m3" / "zebra" / "x.png", np.zeros((5, 6), np.uint8))
    with pytest.raises(DataError, match="zebra/x.png"):
        load_folder(tmp_path / "img", mask_dir=tmp_path / "m3")
    with pytest.raises(DataError, match="nomasks"):
        load_folder(tmp_path / "img", mask_dir=tmp_path / "nomasks")


# ---- save_folder -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_save_folder_round_trip_is_exact(tmp_path, channels):
    d = small_dataset(n=12, c=channels)
    d = d.with_(group=torch.arange(12) % 4, group_names=["g0", "g1", "g2", "g3"],
                info={"poisoned": torch.arange(12) > 8, "artifact": "corner-patch"})
    out = save_folder(d, tmp_path / "out")
    assert (out / "images" / "a" / "00000.png").is_file() and (out / "masks" / "a" / "00000.png").is_file()
    assert not (out / "masks" / "b" / "00001.png").exists()  # item 1 has no mask
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["class_names"] == ["a", "b", "c"] and meta["counts"] == {"a": 4, "b": 4, "c": 4}
    assert meta["info"]["checksum"] == d.checksum()
    back = load_folder(out)
    assert torch.equal(back.x, d.x) and torch.equal(back.y, d.y)
    assert torch.equal(back.mask, d.mask) and torch.equal(back.has_mask, d.has_mask)
    assert torch.equal(back.group, d.group) and back.group_names == d.group_names
    assert back.checksum() == d.checksum() and back.name == "small"
    assert torch.equal(back.info["poisoned"], d.info["poisoned"]) and back.info["artifact"] == "corner-patch"
    assert load_data(out).checksum() == d.checksum()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_save_folder_npy_keeps_floats(tmp_path):
    d = small_dataset(n=5).with_(x=torch.rand(5, 1, 4, 5) * 3 - 1)
    with pytest.raises(DataError, match="npy"):
        save_folder(d, tmp_path / "png")
    assert not (tmp_path / "png").exists()
    back = load_folder(save_folder(d, tmp_path / "npy", fmt="npy"))
    assert torch.equal(back.x, d.x) and torch.equal(back.mask, d.mask) and back.checksum() == d.checksum()


def test_save_folder_refuses_non_empty_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        save_folder(small_dataset(), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    save_folder(small_dataset(), tmp_path / "empty")
    assert (tmp_path / "empty" / "dataset.json").is_file()


# ---- bundles ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_bundle_round_trip(tmp_path, suffix):
    d = small_dataset(n=9, c=3).with_(group=torch.arange(9) % 2, info={"poisoned": torch.arange(9) < 2})
    path = save_bundle(d, tmp_path / f"data{suffix}")
    back = load_bundle(path)
    for key in ("x", "y", "mask", "has_mask", "group"):
        assert torch.equal(getattr(back, key), getattr(d, key)), key
    assert back.class_names == d.class_names and back.name == "small"
    assert torch.equal(back.info["poisoned"], d.info["poisoned"])
    assert load_data(path).checksum() == d.checksum()


def test_bundle_uint8_three_dims_and_class_mapping(tmp_path):
    x = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    np.savez(tmp_path / "b.npz", x=x, y=np.array([0, 1, 1, 0]), mask=x > 20, class_names=np.array(["cat", "dog"]))
    d = load_bundle(tmp_path / "b.npz")
    assert d.shape == (1, 3, 3) and torch.equal(d.x[:, 0], torch.from_numpy(x).float() / 255)
    assert torch.equal(d.mask[:, 0], torch.from_numpy(x > 20).float()) and d.has_mask.all()
    mapped = load_bundle(tmp_path / "b.npz", class_names=["dog", "bird", "cat"])
    assert mapped.y.tolist() == [2, 0, 0, 2] and mapped.num_classes == 3
    with pytest.raises(DataError, match="'cat'"):
        load_bundle(tmp_path / "b.npz", class_names=["dog"])


@pytest.mark.parametrize("arrays, key", [
    ({"y": np.zeros(2, int)}, "'x'"),
    ({"x": np.zeros((2, 1, 3, 3), np.float32)}, "'y'"),
    ({"x": np.zeros((2, 1, 3, 3), np.float32), "y": np.zeros(3, int)}, "'y'"),
    ({"x": np.zeros((2, 3, 3, 1, 1), np.float32), "y": np.zeros(2, int)}, "'x'"),
    ({"x": np.zeros((2, 1, 3, 3), np.float32), "y": np.zeros(2, int), "mask": np.zeros((2, 3, 4))}, "'mask'"),
    ({"x": np.zeros((2, 1, 3, 3), np.float32), "y": np.zeros(2, int), "group": np.zeros(3, int)}, "'group'"),
])
def test_bundle_errors_name_file_and_key(tmp_path, arrays, key):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=key) as err:
        load_bundle(path)
    assert "bad.npz" in str(err.value)


def test_bundle_unreadable(tmp_path):
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        load_bundle(tmp_path / "junk.npz")
    (tmp_path / "junk.safetensors").write_text("nope")
    with pytest.raises(DataError, match="junk.safetensors"):
        load_bundle(tmp_path / "junk.safetensors")


# ---- load_data -------------------------------------------------------------------------------------------------


def test_load_data_resolves_each_kind(tmp_path):
    images, masks = make_folder(tmp_path / "d")
    assert len(load_data(images, mask_dir=masks)) == 3
    assert load_data(tmp_path / "d").has_mask.sum() == 2
    assert load_data("decoy-digits:val").name == "decoy-digits:val"
    assert load_data("decoy-digits").info["split"] == "train"
    with pytest.raises(DataError, match="neither a folder, a bundle nor a scenario") as err:
        load_data(tmp_path / "nowhere")
    assert "decoy-digits" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nowhere.npz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a bundle"):
        load_data(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="no split 'nope'"):
        load_data("decoy-digits:nope")
