"""Artifact-reliance metrics: hand-computed 4×4 cases, a per-item loop reference, and the per-level runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modelfix.data import Dataset, parse_artifact, poison
from modelfix.errors import ModelfixError
from modelfix.evaluate import evaluate, predict
from modelfix.explain.reliance import (pointing_game, relevance_mass, reliance, reliance_by_level,
                                       top_quartile_overlap)


def block(rows, cols, h=4, w=4):
    """A h×w 0/1 mask with ones on rows × cols."""
    m = torch.zeros(h, w)
    m[rows, cols] = 1
    return m


TL = block(slice(0, 2), slice(0, 2))
BR = block(slice(2, 4), slice(2, 4))


# ---- metrics on hand-made maps ---------------------------------------------------------------------------------


def test_relevance_mass_by_hand():
    a = torch.tensor([[4., 0, 0, 0], [0, -2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # |R| total 8, 6 in TL
    maps = torch.stack([a, a, torch.zeros(4, 4), a])
    masks = torch.stack([TL, BR, TL, torch.zeros(4, 4)])
    expected = torch.tensor([6 / 8, 2 / 8, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(relevance_mass(maps, masks), expected, atol=1e-12)
    # N×1×H×W masks (the Dataset's layout) give the same
    assert torch.allclose(relevance_mass(maps, masks[:, None]), expected, atol=1e-12)
    assert not relevance_mass(torch.zeros(3, 4, 4), torch.ones(3, 4, 4)).isnan().any()


def test_top_quartile_overlap_by_hand():
    distinct = torch.tensor([[9., 8, 0, 0], [7, 0, 0, 0], [0, 0, -6, 0], [0, 0, 0, 5]])  # top 4: 9, 8, 7, |-6|
    ties = torch.ones(4, 4)  # all tied: the top 4 are row 0 (row-major order)
    sparse = torch.zeros(4, 4)
    sparse[0, 3], sparse[3, 0] = 1.0, 2.0  # only two pixels carry relevance
    cases = [
        (distinct, TL, 3 / 4, 3 / 4),
        (ties, block(0, slice(2, 4)), 1.0, 2 / 4),
        (ties, BR, 0.0, 0.0),
        (sparse, TL, 0.0, 0.0),  # zero pixels never enter the top set (else (0,0), (0,1) would count)
        (sparse, block(0, 3), 1.0, 1 / 2),
        (torch.zeros(4, 4), TL, 0.0, 0.0),  # all-zero map: nothing on the artifact
        (distinct, torch.zeros(4, 4), math.nan, 0.0),  # empty mask: recall undefined
    ]
    maps = torch.stack([c[0] for c in cases])
    masks = torch.stack([c[1] for c in cases])
    recall, precision = top_quartile_overlap(maps, masks)
    expected_recall = torch.tensor([c[2] for c in cases], dtype=torch.float64)
    expected_precision = torch.tensor([c[3] for c in cases], dtype=torch.float64)
    assert torch.allclose(recall, expected_recall, atol=1e-12, equal_nan=True)
    assert torch.allclose(precision, expected_precision, atol=1e-12)
    assert recall[-1].isnan() and not recall[:-1].isnan().any()


def test_top_fraction_size_is_ceil_without_float_noise():
    # 0.1 · 30 is 3.0000000000000004 in floats: k must be 3, not 4
    maps = torch.arange(30.0).reshape(1, 5, 6)
    recall, precision = top_quartile_overlap(maps, torch.ones(1, 5, 6), fraction=0.1)
    assert recall.item() == pytest.approx(3 / 30) and precision.item() == 1.0
    recall, _ = top_quartile_overlap(maps, torch.ones(1, 5, 6), fraction=0.11)  # 3.3 → 4
    assert recall.item() == pytest.approx(4 / 30)
    with pytest.raises(ValueError):
        top_quartile_overlap(maps, torch.ones(1, 5, 6), fraction=0.0)


def test_pointing_game_by_hand():
    peak_in = torch.zeros(4, 4)
    peak_in[1, 1] = -10.0  # the largest |R| is negative
    peak_in[3, 3] = 5.0
    peak_out = peak_in.clone()
    peak_out[3, 3] = 11.0
    tie = torch.zeros(4, 4)
    tie[0, 0] = tie[3, 3] = 3.0  # tied maxima, one on the mask: a hit, as in Quantus
    maps = torch.stack([peak_in, peak_out, tie, tie, torch.zeros(4, 4)])
    masks = torch.stack([TL, TL, BR, block(0, 3), TL])
    assert pointing_game(maps, masks).tolist() == [True, False, True, False, False]


def test_metrics_match_a_per_item_loop():
    gen = torch.Generator().manual_seed(3)
    n, h, w = 40, 6, 7
    maps = torch.randint(-3, 4, (n, h, w), generator=gen).float()  # many ties and zeros
    maps[:5] = 0.0
    masks = (torch.rand(n, h, w, generator=gen) < 0.3).float()
    masks[5:9] = 0.0
    k = math.ceil(0.25 * h * w)
    mass, recall, precision, point = [], [], [], []
    for a, m in zip(maps.abs().reshape(n, -1).tolist(), masks.reshape(n, -1).tolist()):
        total = sum(a)
        mass.append(sum(v for v, inside in zip(a, m) if inside) / total if total else 0.0)
        order = sorted(range(len(a)), key=lambda i: -a[i])[:k]  # Python's sort is stable: ties by index
        top = [i for i in order if a[i] > 0]
        hits = sum(1 for i in top if m[i])
        recall.append(hits / sum(m) if sum(m) else math.nan)
        precision.append(hits / len(top) if top else 0.0)
        point.append(max(a) > 0 and any(m[i] for i in range(len(a)) if a[i] == max(a)))
    got_recall, got_precision = top_quartile_overlap(maps, masks)
    assert torch.allclose(relevance_mass(maps, masks), torch.tensor(mass, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got_recall, torch.tensor(recall, dtype=torch.float64), atol=1e-12, equal_nan=True)
    assert torch.allclose(got_precision, torch.tensor(precision, dtype=torch.float64), atol=1e-12)
    assert pointing_game(maps, masks).tolist() == point


# ---- over a dataset --------------------------------------------------------------------------------------------


def tiny_data(n=12, seed=0) -> Dataset:
    """1×8×8 images in [0, 0.4] (below any corner-patch grey level), two classes."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.4 * torch.rand(n, 1, 8, 8, generator=gen)
    return Dataset(x=x, y=torch.arange(n) % 2, class_names=["a", "b"], name="tiny")


def detect(x, targets):
    """A stub explainer whose map is exactly the pasted patch (the only pixels above 0.5)."""
    return (x[:, 0] > 0.5).float()


def identity(x, targets):
    return x[:, 0]


ARTIFACT = "corner-patch,size=2,num_classes=2"


def test_reliance_uses_masked_items_and_reduces_channels():
    data = tiny_data()
    masks = torch.zeros(12, 1, 8, 8)
    masks[:, :, :3, :3] = 1
    has = torch.tensor([True, False] * 6)
    data = data.with_(mask=masks, has_mask=has)
    seen = []

    def explainer(x, targets):
        seen.append(targets.clone())
        return torch.stack([x[:, 0], -x[:, 0]], 1)  # 2 channels: Σ_c|R_c| = 2|x|, same shares as x

    result = reliance(data, explainer, batch_size=4)
    sub = data.subset(has)
    recall, precision = top_quartile_overlap(sub.x[:, 0], sub.mask)
    assert result["n"] == 6
    assert result["relevance_mass"] == pytest.approx(float(relevance_mass(sub.x[:, 0], sub.mask).mean()), abs=1e-12)
    assert result["top_quartile_recall"] == pytest.approx(float(recall.mean()), abs=1e-12)
    assert result["top_quartile_precision"] == pytest.approx(float(precision.mean()), abs=1e-12)
    assert result["pointing_game"] == pytest.approx(float(pointing_game(sub.x[:, 0], sub.mask).double().mean()))
    assert set(result["definitions"]) >= {"relevance_mass", "top_quartile_recall", "top_quartile_precision",
                                          "pointing_game"}
    assert torch.equal(torch.cat(seen), sub.y)  # "true" explains the labels
    whole = reliance(data, identity, batch_size=64)  # one batch, one channel: the same numbers
    for key in ("n", "relevance_mass", "top_quartile_recall", "top_quartile_precision", "pointing_game"):
        assert whole[key] == pytest.approx(result[key], abs=1e-12)

    seen.clear()
    reliance(data, explainer, targets="pred", predict_fn=lambda x: torch.ones(len(x), dtype=torch.long))
    assert torch.equal(torch.cat(seen), torch.ones(6, dtype=torch.long))


def test_reliance_without_masks_is_one_line_error():
    with pytest.raises(ModelfixError) as info:
        reliance(tiny_data(), identity)
    assert str(info.value).startswith("--explain needs artifact masks") and "\n" not in str(info.value)


def test_reliance_by_level_level0_footprint_and_pasted_masks():
    data = tiny_data()
    rows = reliance_by_level(None, data, ARTIFACT, levels=(0.0, 1.0), labels=("correlated", "random"),
                             explainer=detect, seed=5)
    assert [(r["level"], r["labels"], r["region"], r["n"]) for r in rows] == [
        (0.0, None, "footprint", 12), (1.0, "correlated", "pasted", 12), (1.0, "random", "pasted", 12)]
    # clean images at level 0: the detector sees no patch
    assert (rows[0]["relevance_mass"], rows[0]["top_quartile_recall"], rows[0]["top_quartile_precision"],
            rows[0]["pointing_game"]) == (0.0, 0.0, 0.0, 0.0)
    # poisoned: the map is the mask itself → mass 1, recall 1, hit; precision 1: only the 4 patch pixels carry
    # relevance, so the top set (k = 16) holds just those 4 (zero pixels never enter it)
    for row in rows[1:]:
        assert row["relevance_mass"] == pytest.approx(1.0)
        assert row["top_quartile_recall"] == pytest.approx(1.0)
        assert row["top_quartile_precision"] == pytest.approx(1.0)
        assert row["pointing_game"] == 1.0

    # level 0 is measured on the clean x against where the patch would go: with labels "none" and "correlated"
    # the corner draws coincide, so the footprint is level-1 "correlated"'s pasted mask
    pasted = poison(data, ARTIFACT, 1.0, labels="correlated", seed=5)
    footprint = pasted.mask[:, 0]
    assert torch.equal(footprint, (pasted.x[:, 0] > 0.5).float()) and bool((footprint.sum((1, 2)) == 4).all())
    row0 = reliance_by_level(None, data, ARTIFACT, (0.0,), "random", identity, seed=5)[0]
    expected = [float((a * m).sum() / a.sum()) for a, m in zip(data.x[:, 0], footprint)]
    assert row0["relevance_mass"] == pytest.approx(sum(expected) / 12, abs=1e-6)

    def top_left(x, targets):
        maps = torch.zeros(len(x), 8, 8)
        maps[:, :2, :2] = 1.0
        return maps

    share_tl = float(footprint[:, :2, :2].amin((1, 2)).mean())  # items whose footprint is the top-left corner
    assert 0 < share_tl < 1
    row0 = reliance_by_level(None, data, ARTIFACT, (0.0,), "none", top_left, seed=5)[0]
    assert row0["relevance_mass"] == pytest.approx(share_tl) and row0["pointing_game"] == pytest.approx(share_tl)


def test_reliance_by_level_items_match_evaluate():
    data = tiny_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    levels, modes = (0.0, 0.5, 0.01), ("correlated", "random")
    seen = []

    def recording(x, targets):
        seen.append((x.clone(), targets.clone()))
        return detect(x, targets)

    rows = reliance_by_level(model, data, ARTIFACT, levels, modes, recording, seed=2, targets="pred", batch_size=4)
    scored = evaluate(model, data, parse_artifact(ARTIFACT), levels, modes, seed=2, progress=False)["levels"]
    assert [(r["level"], r["labels"]) for r in rows] == [(r["level"], r["labels"]) for r in scored]
    assert [r["n"] for r in rows] == [12] + [r["n_poisoned"] for r in scored[1:]] == [12, 6, 6, 0, 0]
    assert math.isnan(rows[3]["relevance_mass"]) and math.isnan(rows[4]["pointing_game"])

    # the level-0.5 random run explains exactly the items poison() pastes, with the model's predictions
    expected = poison(data, ARTIFACT, 0.5, labels="random", seed=2)
    expected_x = expected.x[expected.info["poisoned"]]
    assert len(seen) == 3 + 2 + 2  # batches of 4: level 0 (12 items), 0.5 correlated (6), 0.5 random (6)
    got = torch.cat([x for x, _ in seen[5:7]])
    assert torch.equal(got, expected_x)
    targets = torch.cat([t for _, t in seen[5:7]])
    assert torch.equal(targets, predict(model, expected_x)) and not targets.is_inference()


def test_reliance_by_level_without_artifact_uses_data_masks():
    data = tiny_data()
    masks = torch.zeros(12, 1, 8, 8)
    masks[:, :, 4:, 4:] = 1
    data = data.with_(mask=masks, has_mask=torch.arange(12) < 3)
    row = reliance_by_level(None, data, None, (0.0,), "random", identity)[0]
    assert row["region"] == "data masks" and row["n"] == 3
    with pytest.raises(ModelfixError, match="needs an artifact"):
        reliance_by_level(None, data, None, (0.0, 0.5), "random", identity)
    with pytest.raises(ModelfixError, match="--labels"):
        reliance_by_level(None, data, ARTIFACT, (0.5,), "bogus", identity)
