"""`modelfix discover`: clustering, the suspicion score, the export and the command's errors (docs/discover.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run
from modelfix.discover import (THRESHOLD, discover, heatmap_features, score_clusters, spectral_clusters,
                               top_region)


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
