"""The lazy image source, manifests, transforms to the model's input, the batch stream and bad-file handling.

Expected squares, pixel values and orders are computed by hand in the comments, not by the code under test.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from modelfix.card import InputSpec
from modelfix.data import Augment, Columns, ImageSource, batches, load_data, load_folder, open_source, to_dataset
from modelfix.data.decode import decode
from modelfix.errors import DataError


def _square(h, w, rows, cols, value=255):
    a = np.zeros((h, w), np.uint8)
    a[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = value
    return a


def _one_image_folder(tmp_path, img: np.ndarray, mask: np.ndarray) -> Path:
    (tmp_path / "d" / "a").mkdir(parents=True)
    (tmp_path / "m" / "a").mkdir(parents=True)
    Image.fromarray(img).save(tmp_path / "d" / "a" / "x.png")
    Image.fromarray(mask).save(tmp_path / "m" / "a" / "x.png")
    return tmp_path / "d"


def _rows_cols(m: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    r = torch.nonzero(m.any(dim=1)).flatten()
    c = torch.nonzero(m.any(dim=0)).flatten()
    return (int(r.min()), int(r.max())), (int(c.min()), int(c.max()))


# ---- transforms: a mask stays on its square ---------------------------------------------------------------------


@pytest.mark.parametrize("resize, shape, crop_pct, rows, cols, want_rows, want_cols", [
    # 64×128 → shorter side to floor(16/0.5) = 32 (32×64), centre crop 16×16 at top 8, left 24:
    # rows 24..39 → 12..19 → 4..11; cols 56..79 → 28..39 → 4..15.
    ("shorter", (64, 128), 0.5, (24, 39), (56, 79), (4, 11), (4, 15)),
    # 60×90 → 30×30 plain: rows ÷ 2, cols ÷ 3: rows 20..39 → 10..19, cols 30..59 → 10..19.
    ("plain", (60, 90), 0.875, (20, 39), (30, 59), (10, 19), (10, 19)),
    # 16×16 with 'none': unchanged.
    ("none", (16, 16), 0.875, (3, 9), (5, 12), (3, 9), (5, 12)),
])
def test_mask_and_image_stay_on_the_square(tmp_path, resize, shape, crop_pct, rows, cols, want_rows, want_cols):
    sq = _square(*shape, rows, cols)
    target = 30 if resize == "plain" else 16
    src = open_source(_one_image_folder(tmp_path, np.stack([sq] * 3, axis=2), sq), 3, target, target,
                      resize=resize, crop_pct=crop_pct, mask_dir=tmp_path / "m")
    batch = next(batches(src, 1))
    mask, img = batch["mask"][0, 0], batch["x"][0]
    assert batch["has_mask"].tolist() == [True]
    assert _rows_cols(mask) == (want_rows, want_cols)
    want = torch.zeros(target, target, dtype=torch.bool)
    want[want_rows[0]:want_rows[1] + 1, want_cols[0]:want_cols[1] + 1] = True
    assert torch.equal(mask.bool(), want)
    assert torch.equal(img[0] > 0.5, want)  # bilinear image, thresholded, on the same pixels


def test_none_refuses_another_size_naming_the_file(tmp_path):
    sq = _square(20, 20, (0, 1), (0, 1))
    src = open_source(_one_image_folder(tmp_path, sq, sq), 1, 16, 16, resize="none")
    with pytest.raises(DataError, match=r"x\.png is 20×20 but the model takes 16×16"):
        next(batches(src, 1))


def test_augmentation_moves_image_and_mask_alike():
    # crop rows 8..23, cols 8..23 of a 32×32 image, upsample ×2, flip: the square rows 12..15, cols 10..13 goes to
    # crop rows 4..7, cols 2..5 → rows 8..15, cols 4..11 → flipped cols 31-11..31-4 = 20..27.
    m = torch.from_numpy(_square(32, 32, (12, 15), (10, 13), 1).astype(np.float32))[None]
    img = m.repeat(3, 1, 1)
    x, mask = Augment.apply(img, m, 8, 8, 16, 16, True)
    assert _rows_cols(mask[0]) == ((8, 15), (20, 27))
    assert int(mask.sum()) == 8 * 8
    assert torch.equal(x[0] > 0.5, mask[0].bool())


def test_augmented_stream_is_deterministic_and_keeps_masks_on_images(tmp_path):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    (tmp_path / "m" / "a").mkdir(parents=True)
    for i in range(6):
        sq = _square(32, 32, (4 + i, 20), (6, 18 + i))
        Image.fromarray(sq).save(root / "a" / f"{i}.png")
        Image.fromarray(sq).save(tmp_path / "m" / "a" / f"{i}.png")
    src = open_source(root, 1, 32, 32, mask_dir=tmp_path / "m")
    runs = [list(batches(src, 3, shuffle=True, seed=4, workers=w, augment=Augment(scale=(0.3, 0.6))))
            for w in (0, 2)]
    areas = []
    for a, b in zip(*runs):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["mask"], b["mask"])
        for x, m, i in zip(a["x"], a["mask"], a["index"].tolist()):
            # bilinear vs nearest may disagree on the square's border only, never inside or far outside it
            assert int(((x[0] > 0.5) != m[0].bool()).sum()) <= 2 * (32 + 32)
            areas.append((int(m.sum()), (17 - i) * (13 + i)))  # rows 4+i..20, cols 6..18+i before augmenting
    assert any(got != before for got, before in areas)  # the crops did move the masks


# ---- channel conversions --------------------------------------------------------------------------------------


def test_channel_conversions(tmp_path):
    grey = np.full((4, 5), 100, np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pal = Image.fromarray(np.ones((4, 5), np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.fromarray(np.full((4, 5), 13107, np.uint16)).save(tmp_path / "deep.png")
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2] = 255, 0, 0
    Image.fromarray(rgb).save(tmp_path / "red.tif")
    np.save(tmp_path / "arr.npy", np.full((3, 4, 5), 0.25, np.float32))
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=95)

    arr, note = decode(tmp_path / "deep.png")
    assert arr.dtype == np.float32 and arr[0, 0, 0] == np.float32(13107) / np.float32(65535) and "65535" in note
    assert decode(tmp_path / "rgba.png")[1] == "RGBA → RGB"

    def one(name, channels):
        (tmp_path / "set" / "c").mkdir(parents=True, exist_ok=True)
        target = tmp_path / "set" / "c" / name
        target.write_bytes((tmp_path / name).read_bytes())
        src = open_source(tmp_path / "set", channels, 4, 5, resize="none")
        out = next(batches(src, 1))["x"][0]
        target.unlink()
        return out

    assert torch.equal(one("grey.png", 3), torch.full((3, 4, 5), 100 / 255))  # replicated
    assert torch.equal(one("rgba.png", 3)[:, 0, 0], torch.tensor([10, 20, 30]) / 255)  # alpha dropped, not applied
    assert torch.equal(one("pal.png", 3)[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # palette index 1 = red
    assert torch.equal(one("red.tif", 3)[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(one("red.tif", 1)[0, 0, 0], torch.tensor(76 / 255))  # (255·299 + 500) // 1000 = 76
    assert torch.equal(one("arr.npy", 3), torch.full((3, 4, 5), 0.25))
    assert torch.equal(one("deep.png", 1), torch.full((1, 4, 5), 13107 / 65535))
    jpg = one("grey.jpg", 1)
    assert jpg.shape == (1, 4, 5) and float((jpg - 100 / 255).abs().max()) < 3 / 255  # lossy, but grey 100


# ---- manifests -------------------------------------------------------------------------------------------------


def _png(path: Path, value: int, size=(6, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


def test_manifest_quoted_paths_masks_groups(tmp_path):
    _png(tmp_path / "imgs" / "with, comma.png", 10)
    _png(tmp_path / "imgs" / "b.png", 20, (12, 9))
    _png(tmp_path / "masks" / "b.png", 255, (12, 9))
    (tmp_path / "labels.csv").write_text(
        'path,label,mask,group\n"imgs/with, comma.png",dog,,outdoor\nimgs/b.png,cat,masks/b.png,indoor\n')
    data = load_data(tmp_path / "labels.csv", input_spec=InputSpec(1, 6, 8, (0.0,), (1.0,)), resize="plain")
    assert isinstance(data, ImageSource)
    assert data.class_names == ["cat", "dog"] and data.y.tolist() == [1, 0]
    assert data.group_names == ["indoor", "outdoor"] and data.group.tolist() == [1, 0]
    assert data.has_mask.tolist() == [False, True]
    batch = next(batches(data, 2))
    assert batch["x"].shape == (2, 1, 6, 8)
    assert torch.equal(batch["x"][0], torch.full((1, 6, 8), 10 / 255))
    assert torch.equal(batch["mask"][1], torch.ones(1, 6, 8)) and torch.equal(batch["mask"][0], torch.zeros(1, 6, 8))


def test_tsv_with_own_column_names_and_model_classes(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    (tmp_path / "m.tsv").write_text("file\tcls\nb.png\tzebra\na.png\tant\n")
    data = load_data(tmp_path / "m.tsv", columns=Columns(path="file", label="cls"), class_names=["x", "zebra", "ant"])
    assert data.y.tolist() == [1, 2] and data.shape == (1, 6, 8)
    assert [Path(f).name for f in data.info["files"]] == ["b.png", "a.png"]


def test_manifest_missing_column_names_it(tmp_path):
    _png(tmp_path / "a.png", 1)
    (tmp_path / "m.csv").write_text("path,class\na.png,x\n")
    with pytest.raises(DataError, match="no column 'label'.*found: path, class"):
        load_data(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("path,label\nmissing.png,x\n")
    with pytest.raises(DataError, match="line 2: image .*missing.png does not exist"):
        load_data(tmp_path / "n.csv")


# ---- the DataLoader path equals the in-memory path ---------------------------------------------------------------


def test_dataloader_equals_in_memory_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("b", "a", "c"):
        for i in range(5):
            _png_rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
            (tmp_path / "d" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(_png_rgb).save(tmp_path / "d" / cls / f"{i}.png")
            if i % 2:
                (tmp_path / "m" / cls).mkdir(parents=True, exist_ok=True)
                mask = (rng.random((9, 7)) > 0.5).astype(np.uint8) * 255
                Image.fromarray(mask).save(tmp_path / "m" / cls / f"{i}.png")
    memory = load_folder(tmp_path / "d", mask_dir=tmp_path / "m")  # the old whole-tensor reader
    lazy = open_source(tmp_path / "d", 3, 9, 7, resize="none", mask_dir=tmp_path / "m")
    assert lazy.y.tolist() == [0] * 5 + [1] * 5 + [2] * 5  # classes a, b, c in sorted order
    for shuffle in (False, True):
        want = list(batches(memory, 4, shuffle=shuffle, seed=7))
        if shuffle:  # the order is torch.randperm(15) from Generator(7), as Dataset.batches draws it
            order = torch.randperm(15, generator=torch.Generator().manual_seed(7))
            assert torch.equal(torch.cat([b["index"] for b in want]), order)
        for workers in (0, 2):
            got = list(batches(lazy, 4, shuffle=shuffle, seed=7, workers=workers))
            assert [len(b["y"]) for b in got] == [4, 4, 4, 3]
            for g, w in zip(got, want):
                for key in ("x", "y", "mask", "has_mask", "group", "index"):
                    assert g[key].dtype == w[key].dtype and torch.equal(g[key], w[key]), key
    # a sampler decides the order (a DistributedSampler plugs in here)
    got = list(batches(lazy, 5, sampler=[14, 0, 3], workers=0))
    assert got[0]["index"].tolist() == [14, 0, 3] and torch.equal(got[0]["x"], memory.x[[14, 0, 3]])
    assert torch.equal(to_dataset(lazy).x, memory.x)


# ---- folders at real scale: mixed sizes, extra masks, bad files ------------------------------------------------


def test_mixed_sizes_need_a_policy_and_extra_masks_are_counted(tmp_path):
    _png(tmp_path / "d" / "a" / "1.png", 5, (10, 20))
    _png(tmp_path / "d" / "a" / "2.png", 5, (30, 12))
    _png(tmp_path / "m" / "a" / "1.png", 255, (10, 20))
    _png(tmp_path / "m" / "a" / "unused.png", 255, (3, 3))
    _png(tmp_path / "m" / "b" / "other.png", 255, (3, 3))
    with pytest.raises(DataError, match="differ in sizes"):
        load_data(tmp_path / "d")  # the in-memory reader, as before
    data = load_data(tmp_path / "d", mask_dir=tmp_path / "m", input_spec=InputSpec(3, 8, 8, (0.5,), (0.5,)))
    assert isinstance(data, ImageSource) and data.info["extra_masks"] == 2
    assert data.info["conversions"] == {"L → RGB": 2}  # two grey PNGs for an RGB model, stated
    batch = next(batches(data, 2))
    assert batch["x"].shape == (2, 3, 8, 8) and batch["has_mask"].tolist() == [True, False]


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width×height, then a broken IDAT: only a header scan survives it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 4) + b"IDATjunk" + b"\0\0\0\0"


def test_bad_files_are_named_or_skipped(tmp_path):
    for i in range(3):
        _png(tmp_path / "d" / "a" / f"{i}.png", i)
    (tmp_path / "d" / "a" / "corrupt.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"corrupt\.png"):
        load_data(tmp_path / "d", input_spec=InputSpec(1, 6, 8, (0.0,), (1.0,)))
    data = load_data(tmp_path / "d", input_spec=InputSpec(1, 6, 8, (0.0,), (1.0,)), skip_bad=True)
    assert len(data) == 3 and len(data.info["skipped"]) == 1 and "corrupt.png" in data.info["skipped"][0]


def test_bomb_refused_from_the_header(tmp_path):
    for i in range(2):
        _png(tmp_path / "d" / "a" / f"{i}.png", i)
    (tmp_path / "d" / "a" / "huge.png").write_bytes(_png_header(8000, 8000))
    spec = InputSpec(1, 6, 8, (0.0,), (1.0,))
    # 8000² = 64,000,000 pixels > 10⁶: refused by the header scan, before any decoding (the body is junk)
    with pytest.raises(DataError, match=r"huge\.png is 8000×8000 = 64,000,000 pixels, above the limit"):
        load_data(tmp_path / "d", input_spec=spec, max_pixels=10**6)
    data = load_data(tmp_path / "d", input_spec=spec, max_pixels=10**6, skip_bad=True)
    assert len(data) == 2 and "huge.png" in data.info["skipped"][0]
    # Pillow's own bomb limit (2 × MAX_IMAGE_PIXELS) is also one line naming the file
    (tmp_path / "d" / "a" / "huge.png").write_bytes(_png_header(20000, 20000))
    with pytest.raises(DataError, match=r"huge\.png"):
        load_data(tmp_path / "d", input_spec=spec)
    # the in-memory reader scans the header too
    with pytest.raises(DataError, match=r"huge\.png"):
        load_data(tmp_path / "d")


def test_pillow_syntax_error_names_the_file(tmp_path, monkeypatch):
    _png(tmp_path / "broken.png", 3)

    def broken(self):
        raise SyntaxError("broken PNG file")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    with pytest.raises(DataError, match=r"broken\.png: SyntaxError: broken PNG file"):
        decode(tmp_path / "broken.png")


def test_decode_error_in_a_worker_is_one_line(tmp_path):
    _png(tmp_path / "d" / "a" / "0.png", 1)
    noise = np.random.default_rng(0).integers(0, 256, (6, 8), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "d" / "a" / "1.png")
    good = (tmp_path / "d" / "a" / "1.png").read_bytes()
    (tmp_path / "d" / "a" / "1.png").write_bytes(good[:len(good) // 2])  # valid header, truncated body
    data = load_data(tmp_path / "d", input_spec=InputSpec(1, 6, 8, (0.0,), (1.0,)))  # header check passes
    with pytest.raises(DataError, match=r"1\.png") as err:
        list(batches(data, 2, workers=2))
    assert "\n" not in str(err.value)
    assert len(load_data(tmp_path / "d", input_spec=InputSpec(1, 6, 8, (0.0,), (1.0,)), check="decode",
                         skip_bad=True)) == 1


def test_non_zip_npz_says_so(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"\x80\x04not a zip")
    with pytest.raises(DataError, match="not a valid npz") as err:
        load_data(tmp_path / "x.npz")
    assert "allow_pickle" not in str(err.value)


def test_one_generator_across_epochs_gives_the_training_loops_orders():
    from modelfix.data import Dataset

    data = Dataset(x=torch.arange(10.0).reshape(10, 1, 1, 1), y=torch.arange(10) % 2)
    g_old, g_new = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):  # two epochs: the second order continues the same generator
        old = torch.cat([b["index"] for b in data.batches(4, shuffle=True, generator=g_old)])
        new = torch.cat([b["index"] for b in batches(data, 4, shuffle=True, generator=g_new)])
        assert torch.equal(old, new)
    assert torch.equal(torch.cat([b["x"] for b in batches(data, 3, sampler=[9, 2, 5, 0])]).flatten(),
                       torch.tensor([9.0, 2.0, 5.0, 0.0]))
    with pytest.raises(DataError, match="either shuffle or a sampler"):
        next(batches(data, 2, shuffle=True, sampler=[1]))
