"""`modelfix discover`: clustering, the suspicion score, the export and the command's errors (docs/discover.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run
from modelfix.discover import (THRESHOLD, discover, heatmap_features, score_clusters, spectral_clusters,
                               top_region)
from modelfix.discover.score import spread


def _blob_maps(centres, n_each: int, size: int = 16, radius: int = 2, seed: int = 0, noise: float = 0.02
               ) -> tuple[torch.Tensor, np.ndarray]:
    """n_each maps per centre: a square of relevance around the centre plus a little positive noise."""
    gen = torch.Generator().manual_seed(seed)
    maps, truth = [], []
    for k, (r, c) in enumerate(centres):
        for _ in range(n_each):
            m = noise * torch.rand(size, size, generator=gen)
            bump = 1 + 0.2 * torch.rand(2 * radius, 2 * radius, generator=gen)
            m[r - radius:r + radius, c - radius:c + radius] += bump
            maps.append(m)
            truth.append(k)
    return torch.stack(maps), np.array(truth)


def test_clustering_recovers_planted_clusters():
    maps, truth = _blob_maps([(4, 4), (4, 12), (12, 8)], n_each=20)
    labels, values, _ = spectral_clusters(heatmap_features(maps, 8), neighbors=5, max_clusters=6)
    assert labels.max() + 1 == 3  # the eigengap finds three
    for k in range(3):  # each planted group is exactly one cluster
        assert len(set(labels[truth == k].tolist())) == 1
    assert len({labels[truth == k][0] for k in range(3)}) == 3
    assert values[:3].max() < 1e-8 < values[3]  # three components: three zero eigenvalues


def test_score_ranks_planted_compact_off_object_cluster_first():
    # class under test: two "object" clusters (relevance spread over a 6×6 centre, shifted) and one compact corner
    # cluster; the other classes look at the centre as well
    obj_a, _ = _blob_maps([(8, 7)], 15, radius=3, seed=1, noise=0)
    obj_b, _ = _blob_maps([(8, 9)], 15, radius=3, seed=2, noise=0)
    corner = torch.zeros(10, 16, 16)
    corner[:, 0:2, 0:2] = 1.0  # all relevance in a 2×2 corner: exactly 1 cell of 8×8 after pooling
    features = heatmap_features(torch.cat([obj_a, obj_b, corner]), 8)
    labels = np.array([0] * 15 + [1] * 15 + [2] * 10)
    others = heatmap_features(_blob_maps([(8, 8)], 20, radius=3, seed=3, noise=0)[0], 8)
    scores = score_clusters(features, labels, others)
    ranked = sorted(range(3), key=lambda k: -scores[k].score)
    assert ranked[0] == 2
    # by hand: the corner's mass is one cell of 64 → region 1 cell, compactness 63/64; every member puts all of its
    # relevance there (consistency 1); nobody else does (distinctiveness 1)
    assert scores[2].score == pytest.approx(63 / 64)
    assert scores[2].score >= THRESHOLD > max(scores[0].score, scores[1].score)


def test_top_region_is_the_fewest_cells_holding_the_share():
    m = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert top_region(m, 0.5).tolist() == [False, True, False, True]  # 0.4 + 0.3 ≥ 0.5, 0.4 alone is not
    assert top_region(m, 0.7).tolist() == [False, True, False, True]  # exactly 0.7 counts


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """egem-cnn trained as `modelfix demo` trains it: it takes the tag on the training 8s as a shortcut."""
    from modelfix.checkpoint import save_model
    from modelfix.demo import load_setup, train_shortcut

    torch.set_num_threads(1)
    setup = load_setup()
    model, card, _ = train_shortcut(setup)
    path = tmp_path_factory.mktemp("discover") / "tagged.safetensors"
    save_model(model, card, path)
    return path, model, setup.train


def test_explaining_leaves_the_model_bit_identical(tagged):
    _, model, data = tagged
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    result = discover(model, data, classes=["8"], max_items=60, embedding="spectral", progress=False)
    assert result.classes[0].cls == 8 and len(result.classes[0].items) == 60
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]


def test_discover_finds_the_tag_and_the_exported_masks_sit_on_each_members_tag(tagged, tmp_path):
    from modelfix.data import load_data, parse_artifact, save_folder
    from modelfix.feedback import read_neuron_feedback, read_sample_feedback

    path, _, train = tagged
    # a folder of 8s and 3s in a shuffled order: masks must find their images by file, not by position
    pick = torch.nonzero((train.y == 8) | (train.y == 3)).flatten()
    pick = pick[torch.randperm(len(pick), generator=torch.Generator().manual_seed(1))][:240]
    subset = train.subset(pick)
    folder = save_folder(subset, tmp_path / "data")
    out = tmp_path / "out"
    result = run("discover", path, "--data", folder, "--classes", "8,3", "--embedding", "spectral",
                 "--export", "suspicious", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads((out / "clusters.json").read_text())
    assert {c["class"] for c in doc["candidates"]} == {8}  # only the tag's clusters are suspicious
    eights = next(k for k in doc["classes"] if k["class"] == 8)
    flagged = {c["cluster"] for c in doc["candidates"]}
    members = sorted(i for c in eights["clusters"] if c["id"] in flagged for i in c["members"])
    first = next(c for c in eights["clusters"] if c["id"] == doc["candidates"][0]["cluster"])["members"]
    truth = subset.info["poisoned"]
    assert truth[members].double().mean() >= 0.9  # purity against the planted tags

    loaded = load_data(folder, mask_dir=out / "export" / "masks", class_names=[str(i) for i in range(10)])
    assert torch.nonzero(loaded.has_mask).flatten().tolist() == sorted(members)
    for i in members:  # each member's mask lies on its own tag (the tag's footprint in the original data)
        mine, true = loaded.mask[i, 0] > 0, subset.mask[i, 0] > 0
        if truth[i]:
            assert (mine & true).sum() / (mine | true).sum() >= 0.5
    bundle = load_data(folder, mask_dir=out / "export" / "masks.npz", class_names=[str(i) for i in range(10)])
    assert torch.equal(bundle.mask, loaded.mask)

    export = json.loads((out / "export" / "export.json").read_text())
    artifact = parse_artifact(export["artifact"])
    _, pasted = artifact.apply(subset.x[:1])
    assert torch.equal(pasted[0, 0] > 0, loaded.mask[first[0], 0] > 0)
    verdicts = read_sample_feedback(out / "export" / "feedback" / "samples.csv").for_data(loaded)
    assert [i for i, v in enumerate(verdicts) if v == "no"] == sorted(members)
    neurons = read_neuron_feedback(out / "export" / "feedback" / "neurons.csv", 200, "relu3")
    assert neurons.prune == export["neurons_no"] and neurons.prune
    clean = load_data(out / "export" / "clean.npz")
    assert len(clean) == len(subset) - len(members)
    assert "<svg" in (out / "index.html").read_text()


def test_bad_input_is_one_line(tagged, tmp_path):
    from modelfix.data import save_bundle

    path, _, train = tagged
    only = tmp_path / "only.npz"
    save_bundle(train.subset(torch.nonzero((train.y == 8) | (train.y == 3)).flatten()[:80]), only)
    out = tmp_path / "out"
    assert_one_line_error(run("discover", path, "--data", only, "--classes", "5", "-o", out),
                          "--classes", "class 5 has no items")
    assert_one_line_error(run("discover", path, "--data", only, "--max-items", "2", "-o", out), "--max-items")
    assert_one_line_error(run("discover", path, "--data", only, "--export", "eight", "-o", out), "--export")
    assert_one_line_error(run("discover", path, "--data", only, "--classes", "8", "--max-items", "40",
                              "--embedding", "spectral", "--export", "8:99", "-o", out),
                          "--export", "no cluster 99")
    assert not out.exists()


# ---- |relevance| features, the two references, spread, non-user contrast, the moving-artifact group -----------


def test_features_are_absolute_relevance():
    # 2×2 map pooled to 2×2 (no pooling): |−3|, |1|, 0, 0 scaled to sum 1
    maps = torch.tensor([[[-3.0, 1.0], [0.0, 0.0]]])
    assert heatmap_features(maps, 2)[0].tolist() == [0.75, 0.25, 0.0, 0.0]


def _corner_features(n: int, corner: int, share: float) -> torch.Tensor:
    """n rows of a 4×4 grid (cells 0–15): `share` of the mass in cell `corner`, the rest split evenly between cells 6
    and 9 (the middle, "the object"; neither is next to cell 0 or 15)."""
    rows = torch.zeros(n, 16, dtype=torch.float64)
    rows[:, corner] = share
    rows[:, [6, 9]] = (1 - share) / 2
    return rows


def test_an_artifact_every_class_uses_is_found_against_the_class_s_other_clusters():
    # DecoyMNIST-like: the class's items split by the corner of their patch (cell 0 or 15); every other class uses
    # both corners as well, and more strongly. Against the other classes the corner is not distinctive; against the
    # class's other cluster it is.
    features = torch.cat([_corner_features(6, 0, 0.2), _corner_features(6, 15, 0.2)])
    labels = np.array([0] * 6 + [1] * 6)
    others = torch.cat([_corner_features(5, 0, 0.4), _corner_features(5, 15, 0.4)])
    scores = score_clusters(features, labels, others)
    # By hand, cluster 0 against the other cluster: reference = 0.2 at cell 15, 0.4 at cells 6 and 9; spread (3×3
    # maximum) at cell 0 sees cells 0, 1, 4, 5 → 0, at 6 and 9 → 0.4. Excess: cell 0 0.2, cells 6 and 9 0 → region
    # {0}, compactness 15/16, consistency 1 (each member puts 0.2 ≥ 0.1 there), distinctiveness 1 − 0 / 0.2 = 1.
    # Against the other classes: reference = 0.2 at cells 0 and 15, 0.3 at 6 and 9; spread at cell 0 = 0.2 → no
    # excess there; cells 6 and 9 0.4 − 0.3 = 0.1 each → region {6} (tie: lower index), mass 0.4, distinctiveness
    # 1 − 0.3 / 0.4 = 0.25 → 15/16 × 0.25. The higher score counts. Cluster 1 likewise (cell 15 sees 10, 11, 14, 15).
    assert scores[0].score == pytest.approx(15 / 16) and scores[0].reference == "other clusters"
    assert scores[0].region.nonzero().flatten().tolist() == [0]
    assert scores[1].score == pytest.approx(15 / 16) and scores[1].region.nonzero().flatten().tolist() == [15]


def test_a_stroke_shifted_by_one_cell_is_not_distinctive():
    # two clusters of the same object, shifted by one column (4×4 grid): without the spread the column each owns
    # alone would be a compact, consistent, exclusive region
    a = torch.zeros(5, 16, dtype=torch.float64)
    a[:, [5, 9]] = 0.5
    b = torch.zeros(5, 16, dtype=torch.float64)
    b[:, [6, 10]] = 0.5
    scores = score_clusters(torch.cat([a, b]), np.array([0] * 5 + [1] * 5))
    # reference of cluster 0 = cluster 1's map (0.5 at 6 and 10); spread: cells 5 and 9 are next to 6 or 10 → 0.5;
    # excess 0 everywhere → score 0 (and the same for cluster 1)
    assert scores[0].score == 0.0 and scores[1].score == 0.0
    assert spread(torch.tensor([0.0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])).reshape(4, 4).tolist() == \
        [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]


def _synthetic_result():
    """Two classes on 8×8 images, a 2×2 patch in the top-left or bottom-right corner of every item: class 0's patch
    is dark (0.1), class 1's bright (1.0); every item's relevance sits on its patch (1) and on a centre object
    (4 × 1 at rows 3–4, columns 3–4, present in every image at 0.5). Class 0's clusters: 0 = top-left (items 0–3),
    1 = bottom-right (items 4–7); class 1 (items 8–15) alternates corners and is one cluster."""
    from modelfix.data.dataset import Dataset
    from modelfix.discover.core import ClassClusters, Cluster, DiscoverResult

    x = torch.zeros(16, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 0.5
    maps = torch.zeros(16, 8, 8)
    maps[:, 3:5, 3:5] = 0.25
    top = [0, 1, 2, 3, 8, 10, 12, 14]
    for i in range(16):
        level = 0.1 if i < 8 else 1.0
        rows, cols = (slice(0, 2), slice(0, 2)) if i in top else (slice(6, 8), slice(6, 8))
        x[i, :, rows, cols] = level
        maps[i, rows, cols] = 0.25
    y = torch.tensor([0] * 8 + [1] * 8)
    data = Dataset(x=x, y=y, class_names=["a", "b"])
    features = heatmap_features(maps, 4)
    labels0 = np.array([0] * 4 + [1] * 4)
    scores0 = score_clusters(features[:8], labels0, features[8:])
    scores1 = score_clusters(features[8:], np.zeros(8, dtype=np.int64), features[:8])
    entry0 = ClassClusters(0, "a", torch.arange(8), maps[:8], features[:8], labels0, np.zeros(2), np.zeros((8, 2)),
                           [Cluster(0, [0, 1, 2, 3], scores0[0]), Cluster(1, [4, 5, 6, 7], scores0[1])])
    entry1 = ClassClusters(1, "b", torch.arange(8, 16), maps[8:], features[8:], np.zeros(8, dtype=np.int64),
                           np.zeros(1), np.zeros((8, 2)), [Cluster(0, list(range(8, 16)), scores1[0])])
    return data, DiscoverResult([entry0, entry1], {}, {})


def test_a_dark_patch_is_cut_against_the_items_that_do_not_look_there():
    from modelfix.discover import cluster_region

    data, result = _synthetic_result()
    entry = result.for_class(0)
    region, rest = cluster_region(entry, entry.cluster(0), data, result)
    # non-users of the top-left region: class 0's bottom-right items 4–7 and class 1's bottom-right items 9, 11, 13,
    # 15 (class 1's top-left items put half of their relevance there: users)
    assert rest.tolist() == [4, 5, 6, 7, 9, 11, 13, 15]
    # members' mean image − non-users' mean: 0.1 on the patch, 0 elsewhere (the object is the same in both) → the
    # region is exactly the dark 2×2 patch. Against all other items the corner's mean would be 0.5 (class 1's
    # top-left half): |0.1 − 0.5| there, also 0 elsewhere; the contrast with non-users is the one that is 0 where no
    # one looks
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(region, expected)


def test_the_group_of_a_moving_artifact_is_measured_with_each_member_s_own_region():
    from modelfix.bench.discover import group_metrics
    from modelfix.data.dataset import Dataset
    from modelfix.discover.core import ClassClusters, Cluster
    from modelfix.discover.score import ClusterScore

    # class 0, items 0–5 on 4×4 images; cluster 0 (items 0, 1, 2) exported with the top-left 2×2, cluster 1
    # (items 3, 4) with the bottom-right 2×2; item 5 is in neither. Truth: 0, 1, 5 carry a top-left patch, 3 and 4 a
    # bottom-right one, 2 none.
    tl = torch.zeros(4, 4)
    tl[:2, :2] = 1
    br = torch.zeros(4, 4)
    br[2:, 2:] = 1
    true = torch.stack([tl, tl, torch.zeros(4, 4), br, br, tl])[:, None]
    data = Dataset(x=torch.zeros(6, 1, 4, 4), y=torch.zeros(6, dtype=torch.long), class_names=["a"], mask=true,
                   has_mask=true.flatten(1).any(1))
    exported = torch.stack([tl, tl, tl, br, br, torch.zeros(4, 4)])[:, None]
    score = ClusterScore(0.9, 1, 1, 1, torch.zeros(4, dtype=torch.bool))
    entry = ClassClusters(0, "a", torch.arange(6), torch.zeros(6, 4, 4), torch.zeros(6, 4), np.zeros(6),
                          np.zeros(2), np.zeros((6, 2)), [])
    m = group_metrics(entry, [Cluster(0, [0, 1, 2], score), Cluster(1, [3, 4], score)], data, exported)
    # purity: 4 of the 5 members carry the artifact in their own region (item 2 carries none)
    # recall: carriers in top-left ∪ bottom-right: 0, 1, 3, 4, 5 → members 4 of 5
    # IoU: exported 5 × 4 = 20 pixels, true on members 4 × 4 = 16, all inside the exported ones → 16 / 20
    # top purity: cluster 0 alone, 2 of 3
    assert [m["purity"], m["recall"], m["iou"], m["top_purity"]] == pytest.approx([0.8, 0.8, 0.8, 2 / 3])
    assert m["size"] == 5 and m["clusters"] == [0, 1]


def test_stamped_fashion_scenario():
    import os
    from pathlib import Path

    from modelfix.data import SCENARIOS, load_scenario, parse_artifact

    root = Path(os.environ.get("MODELFIX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files not found (MODELFIX_DATA/FashionMNIST/raw)")
    artifact = parse_artifact(SCENARIOS["stamped-fashion"].artifact)
    assert artifact.target == 6 and len(artifact.pixels) == 9  # a 5×5 plus sign: 5 + 5 − 1 pixels
    train = load_scenario("stamped-fashion", "train", data_root=root)
    assert len(train) == 60_000 and train.class_names[6] == "shirt"
    stamped = train.info["poisoned"]
    shirts = train.y == 6
    assert not bool(stamped[~shirts].any()) and int(stamped.sum()) == round(0.7 * 6000)  # 6,000 shirts in train
    plus = torch.zeros(28, 28, dtype=torch.bool)
    plus[1:6, 3] = True
    plus[3, 1:6] = True
    assert bool((train.x[stamped][:, 0][:, plus] == 1).all()) and torch.equal(train.mask[stamped][0, 0] > 0, plus)
    clean = load_scenario("stamped-fashion", "clean", data_root=root)
    assert len(clean) == 60_000 - 4200 and not bool(clean.has_mask.any())
    test = load_scenario("stamped-fashion", "test", data_root=root)
    assert len(test) == 10_000 and not bool(test.has_mask.any())
