"""Artifacts (where each pastes, its mask, its text/YAML specs) and poison()."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from modelfix.data import CornerPatch, Dataset, FixedPixels, ImagePaste, Stripe, parse_artifact, poison
from modelfix.errors import ArtifactSpecError, DataError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def changed(x, x_new):
    """Pixels changed on any channel, as n×1×H×W floats."""
    return (x != x_new).any(1, keepdim=True).float()


@pytest.fixture
def tag(tmp_path, monkeypatch):
    """A 3×4 RGBA tag: opaque red except a transparent left column; relative name tag.png in the cwd."""
    monkeypatch.chdir(tmp_path)
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[:, :, 0] = 255
    rgba[:, 1:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "tag.png")
    return "tag.png"


# ---- corner patch ----------------------------------------------------------------------------------------------


def test_corner_patch_colour_and_mask():
    x = torch.zeros(10, 1, 28, 28)
    labels = torch.arange(10)
    x_new, mask = CornerPatch().apply(x, labels, gen())
    assert torch.equal(mask, changed(x, x_new)) and mask.shape == (10, 1, 28, 28)
    assert mask.sum((1, 2, 3)).tolist() == [16.0] * 10
    for i in range(10):
        assert torch.allclose(x_new[i][mask[i].bool()], torch.tensor((255 - 25 * i) / 255))
        rows, cols = torch.nonzero(mask[i, 0], as_tuple=True)
        assert rows.min() in (0, 24) and rows.max() - rows.min() == 3
        assert cols.min() in (0, 24) and cols.max() - cols.min() == 3
    assert not x.any()  # input untouched


def test_corner_patch_rgb_fixed_level_and_corner_subset():
    x = torch.rand(50, 3, 10, 12)
    x_new, mask = CornerPatch(size=2, corners="tl+br").apply(x, None, gen())
    assert torch.allclose(x_new[mask.expand_as(x).bool()], torch.tensor(0.5))
    assert torch.equal(x_new[~mask.expand_as(x).bool()], x[~mask.expand_as(x).bool()])
    tl = mask[:, 0, 0, 0].bool()
    br = mask[:, 0, 9, 11].bool()
    assert torch.all(tl ^ br) and 0 < tl.sum() < 50
    assert not mask[:, 0, 0, 11].any() and not mask[:, 0, 9, 0].any()


def test_corner_patch_two_coins_are_uniform_over_corners():
    n = 4000
    _, mask = CornerPatch().apply(torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.long), gen(1))
    top = mask[:, 0, 0, :].any(1)
    left = mask[:, 0, :, 0].any(1)
    counts = [int((top & left).sum()), int((top & ~left).sum()), int((~top & left).sum()), int((~top & ~left).sum())]
    assert sum(counts) == n
    assert all(abs(c - n / 4) < 130 for c in counts), counts  # sd ≈ 27


def test_corner_patch_levels_for_many_classes_and_bad_labels():
    assert torch.allclose(CornerPatch().levels(), (255 - 25 * torch.arange(10.0)) / 255)
    levels = CornerPatch(num_classes=20).levels()
    assert levels[0] == 1 and torch.isclose(levels[-1], torch.tensor(30 / 255)) and torch.all(levels.diff() < 0)
    with pytest.raises(DataError, match="num_classes"):
        CornerPatch().apply(torch.zeros(1, 1, 8, 8), torch.tensor([10]), gen())
    with pytest.raises(DataError, match="does not fit"):
        CornerPatch(size=5).apply(torch.zeros(1, 1, 4, 4), None, gen())


# ---- fixed pixels, stripe --------------------------------------------------------------------------------------


def test_fixed_pixels_egem():
    a = parse_artifact("pixels:egem")
    assert a == FixedPixels() and a.target == 8 and not a.label_coloured
    x = torch.zeros(3, 1, 28, 28)
    x_new, mask = a.apply(x, None, gen())
    assert torch.equal(mask, changed(x, x_new))
    assert torch.nonzero(mask[0, 0]).tolist() == [[1, 2], [2, 1], [2, 2]]
    assert x_new[:, 0, 1, 2].eq(1).all() and x_new.sum() == 9
    rgb = torch.rand(2, 3, 5, 5)
    out, _ = FixedPixels(pixels=((0, 0),), value=0.25).apply(rgb, None, gen())
    assert torch.allclose(out[:, :, 0, 0], torch.tensor(0.25)) and torch.equal(out[:, :, 1:], rgb[:, :, 1:])
    with pytest.raises(DataError, match="outside"):
        FixedPixels(pixels=((9, 9),)).apply(torch.zeros(1, 1, 5, 5), None, gen())


@pytest.mark.parametrize("spec, cols", [("stripe@right", [26, 27]), ("stripe@left,width=3", [0, 1, 2]),
                                        ("stripe@5,width=1", [5]), ("stripe@center,width=4", [12, 13, 14, 15])])
def test_stripe(spec, cols):
    x = torch.zeros(2, 3, 28, 28)
    artifact = parse_artifact(spec)
    assert isinstance(artifact, Stripe) and artifact.target is None
    x_new, mask = artifact.apply(x, None, gen())
    assert torch.equal(mask, changed(x, x_new))
    assert torch.nonzero(mask[0, 0, 0]).flatten().tolist() == cols and mask[0, 0, :, cols[0]].all()
    assert torch.all(x_new[mask.expand_as(x).bool()] == 1)


# ---- image paste -----------------------------------------------------------------------------------------------


def test_image_paste_positions_and_mask(tag):
    x = torch.zeros(2, 3, 10, 12)
    x_new, mask = parse_artifact(f"image:{tag}@bottom-right").apply(x, None, gen())
    assert torch.equal(mask, changed(x, x_new))
    assert mask[0, 0, 7:, 9:].all() and mask.sum() == 2 * 9  # 3 rows × 3 opaque columns per image
    assert torch.all(x_new[:, 0, 7:, 9:] == 1) and not x_new[:, 1:].any()
    x_new, mask = parse_artifact(f"image:{tag}@2:3").apply(x, None, gen())
    assert torch.equal(mask, changed(x, x_new))
    assert torch.nonzero(mask[0, 0]).min(0).values.tolist() == [2, 4]  # column 3 is transparent
    _, mask = parse_artifact(f"image:{tag}@top-left,margin=1").apply(x, None, gen())
    assert mask[0, 0, 1:4, 2:5].all() and mask.sum() == 2 * 9
    _, mask = parse_artifact(f"image:{tag}@center").apply(x, None, gen())
    assert mask[0, 0, 3:6, 5:8].all() and mask.sum() == 2 * 9


def test_image_paste_alpha_channels_and_scale(tag):
    x = torch.full((1, 1, 10, 12), 0.5)
    x_new, mask = ImagePaste(tag, position="top-left", alpha=0.5).apply(x, None, gen())
    lum = 0.299  # pure red onto grey = its luminance
    assert torch.allclose(x_new[0, 0, 0, 1], torch.tensor(0.5 * 0.5 + 0.5 * lum))
    assert x_new[0, 0, 0, 0] == 0.5 and mask[0, 0, 0, 0] == 0 and mask[0, 0, 0, 1] == 1
    scaled = ImagePaste(tag, position="top-left", scale=0.5)
    _, mask = scaled.apply(torch.zeros(1, 3, 16, 16), None, gen())
    assert torch.nonzero(mask[0, 0]).max(0).values.tolist() == [5, 7]  # 8 wide, 6 high
    grey_tag = np.full((2, 2), 200, np.uint8)
    Image.fromarray(grey_tag).save("grey.png")
    x_new, mask = parse_artifact("image:grey.png@top-left").apply(torch.zeros(1, 3, 4, 4), None, gen())
    assert torch.allclose(x_new[0, :, :2, :2], torch.tensor(200 / 255)) and mask.sum() == 4


def test_image_paste_errors_name_the_file(tag, tmp_path):
    with pytest.raises(ArtifactSpecError, match="missing.png"):
        parse_artifact("image:missing.png@top")
    (tmp_path / "notimage.png").write_text("hello")
    with pytest.raises(ArtifactSpecError, match="notimage.png"):
        parse_artifact("image:notimage.png")
    with pytest.raises(DataError, match="tag.png"):
        parse_artifact(f"image:{tag}").apply(torch.zeros(1, 1, 2, 8), None, gen())
    with pytest.raises(DataError, match="tag.png"):
        parse_artifact(f"image:{tag}@9:9").apply(torch.zeros(1, 1, 10, 10), None, gen())


# ---- specs -----------------------------------------------------------------------------------------------------

SPECS = [
    "corner-patch", "corner-patch,size=4,corners=tl+br", "corner-patch,size=2,num_classes=20,fixed_level=0.25",
    "pixels:egem", "pixels:1:2/2:1/2:2,value=1,target=8", "pixels:0:0/3:4,value=0.5,target=none",
    "image:tag.png@bottom-right", "image:tag.png@3:20,alpha=0.5", "image:tag.png,scale=0.3,margin=2,target=1",
    "stripe@right,width=2", "stripe@7,value=0.1234567891,target=3",
]


@pytest.mark.parametrize("spec", SPECS)
def test_text_spec_round_trip(tag, spec):
    a = parse_artifact(spec)
    assert parse_artifact(str(a)) == a
    assert parse_artifact(a.to_dict()) == a
    assert str(parse_artifact(str(a))) == str(a)


def test_text_equals_yaml(tag, tmp_path):
    pairs = [
        ("corner-patch,corners=br+tl", {"kind": "corner-patch", "corners": ["tl", "br"]}),
        ("pixels:egem", {"kind": "pixels", "pixels": [[2, 2], [1, 2], [2, 1]]}),
        ("pixels:egem", {"kind": "pixels", "pixels": "egem", "target": 8}),
        ("image:tag.png@bottom-right,alpha=0.8", {"kind": "image", "path": "tag.png", "position": "bottom-right",
                                                 "alpha": 0.8}),
        ("image:tag.png@3:1", {"kind": "image", "path": "tag.png", "position": [3, 1]}),
        ("stripe@right,width=2", {"kind": "stripe", "column": "right", "width": 2}),
    ]
    for text, form in pairs:
        assert parse_artifact(text) == parse_artifact(form), text
        (tmp_path / "a.yaml").write_text(yaml.safe_dump(form))  # the cwd: relative paths stay as written
        assert parse_artifact("a.yaml") == parse_artifact(text), text
        assert parse_artifact(Path("a.yaml")) == parse_artifact(text), text


def test_yaml_image_path_is_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    Image.fromarray(np.full((2, 2), 255, np.uint8)).save(tmp_path / "cfg" / "logo.png")
    (tmp_path / "cfg" / "art.yml").write_text("kind: image\npath: logo.png\nposition: top\n")
    monkeypatch.chdir(tmp_path)
    a = parse_artifact("cfg/art.yml")
    assert a == parse_artifact("image:cfg/logo.png@top")


@pytest.mark.parametrize("spec", [
    "blob", "", "corner-patch,sizes=4", "corner-patch,size=x", "corner-patch,size=0", "corner-patch,corners=xy",
    "corner-patch:3", "pixels", "pixels:1-2", "pixels:egem,value=abc", "stripe@middle", "stripe@right,width",
    "image:tag.png@nowhere", "image:", "image:tag.png,alpha=2", {"size": 4}, {"kind": "nope"},
    {"kind": "stripe", "colour": 1}, "missing.yaml",
])
def test_bad_specs_raise(tag, spec):
    with pytest.raises(ArtifactSpecError):
        parse_artifact(spec)


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ArtifactSpecError) as err:
        parse_artifact("watermark@top")
    text = str(err.value)
    assert "watermark@top" in text and all(k in text for k in ("corner-patch", "pixels", "image", "stripe"))


# ---- poison ----------------------------------------------------------------------------------------------------


def toy(n=200, k=10, seed=0) -> Dataset:
    g = gen(seed)
    return Dataset(x=torch.rand(n, 1, 12, 12, generator=g) * 0.1, y=torch.randint(0, k, (n,), generator=g),
                   class_names=[str(i) for i in range(k)], name="toy", info={"source": "test"})


def patch_colour(d: Dataset) -> torch.Tensor:
    """The grey level of each item's corner patch (items must all be poisoned with a 4×4 patch)."""
    return d.x.flatten(1)[d.mask.flatten(1) > 0].view(len(d), -1)[:, 0]


def test_poison_exact_count_mask_and_info():
    d = toy(n=103)
    d.mask[5] = 1
    d.has_mask[5] = True
    p = poison(d, "corner-patch", 0.3, seed=4)
    hit = p.info["poisoned"]
    assert hit.dtype == torch.bool and int(hit.sum()) == round(0.3 * 103)
    assert torch.equal(p.has_mask, hit | d.has_mask)
    assert torch.equal(p.mask[~hit], d.mask[~hit]) and torch.all(p.mask[hit].sum((1, 2, 3)) == 16)
    assert torch.equal(p.x[~hit], d.x[~hit])
    assert torch.allclose(patch_colour(p.subset(hit)), (255 - 25 * p.y[hit].float()) / 255)
    assert p.info["artifact"] == "corner-patch" and p.info["source"] == "test"
    assert p.info["poison"] == {"level": 0.3, "labels": "correlated", "seed": 4}


def test_poison_level_zero_is_identity_and_bad_levels_fail():
    d = toy()
    p = poison(d, CornerPatch(), 0.0)
    assert torch.equal(p.x, d.x) and torch.equal(p.mask, d.mask) and not p.info["poisoned"].any()
    assert p.checksum() == d.checksum()
    for level in (-0.1, 1.5, float("nan")):
        with pytest.raises(DataError, match="level"):
            poison(d, CornerPatch(), level)
    with pytest.raises(DataError, match="labels"):
        poison(d, CornerPatch(), 0.5, labels="fixed")


def test_poison_is_deterministic_and_leaves_input_untouched():
    d = toy()
    before = (d.x.clone(), d.mask.clone(), d.has_mask.clone(), d.y.clone(), dict(d.info))
    a = poison(d, "corner-patch", 0.5, labels="random", seed=7)
    b = poison(d, "corner-patch", 0.5, labels="random", seed=7)
    c = poison(d, "corner-patch", 0.5, labels="random", seed=8)
    assert torch.equal(a.x, b.x) and torch.equal(a.mask, b.mask) and a.checksum() == b.checksum()
    assert a.checksum() != c.checksum()
    assert torch.equal(d.x, before[0]) and torch.equal(d.mask, before[1]) and torch.equal(d.has_mask, before[2])
    assert torch.equal(d.y, before[3]) and d.info == before[4] and "poisoned" not in d.info


def test_poison_random_colours_match_one_in_k():
    d = toy(n=5000)
    p = poison(d, "corner-patch", 1.0, labels="random", seed=0)
    colour_label = torch.round((255 - patch_colour(p) * 255) / 25).long()
    rate = float((colour_label == d.y).float().mean())
    assert 0.085 < rate < 0.115, rate
    assert torch.bincount(colour_label, minlength=10).min() > 400  # uniform over the 10 colours
    q = poison(d, "corner-patch", 1.0, labels="none", seed=0)
    assert torch.allclose(patch_colour(q), torch.tensor(0.5))


def test_poison_correlated_target_touches_only_that_class():
    d = toy(n=400)
    n8 = int((d.y == 8).sum())
    p = poison(d, "pixels:egem", 0.7, labels="correlated", seed=1)
    hit = p.info["poisoned"]
    assert int(hit.sum()) == round(0.7 * n8) and torch.all(d.y[hit] == 8)
    assert torch.all(p.x[hit][:, 0, 1, 2] == 1) and torch.equal(p.x[~hit], d.x[~hit])
    everywhere = poison(d, "pixels:egem", 0.5, labels="none", seed=1)  # target ignored
    assert int(everywhere.info["poisoned"].sum()) == 200 and (d.y[everywhere.info["poisoned"]] != 8).any()
