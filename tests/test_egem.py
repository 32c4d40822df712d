"""EGEM / PCA-EGEM (modelfix.repair.egem): schedule, factors, λ search, weighted statistics, patches, selection."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.data.dataset import Dataset
from modelfix.errors import ModelfixError, UnsupportedModel
from modelfix.repair import egem
from modelfix.repair.egem import (
    ALPHA_GRID,
    EgemConfig,
    LayerStats,
    build_refinement,
    collect_stats,
    egem_factors,
    fit_egem,
    pca_factors,
    search_lambda,
    tau_schedule,
)
from modelfix.repair.patches import PCAffine, PCASumRatio, patch_entries
from modelfix.repair.points import Point
from modelfix.repair.refinement import RefinementSplit, refinement_split
from modelfix.zoo import Classifier, build_model, default_input_spec


# ---- refinement points: the real module, or (until modelfix/repair/points.py exists) a stand-in for these tests ------


@dataclasses.dataclass(frozen=True)
class _StubPoint:
    name: str
    index: int
    shape: tuple

    @property
    def kind(self) -> str:
        return "conv" if len(self.shape) == 3 else "dense"


def _stub_find_points(model, layers=None):
    """Dry run; default points are the ReLUs (what points.py gives the papers' small nets), else names/globs."""
    names = [n for n, _ in model.net.named_modules() if n]
    if layers is None:
        chosen = [n for n, m in model.net.named_modules() if isinstance(m, nn.ReLU)]
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    order, shapes, handles = [], {}, []
    for name in chosen:
        def hook(module, args, out, name=name):
            order.append(name)
            shapes[name] = tuple(out.shape[1:])
        handles.append(model.net.get_submodule(name).register_forward_hook(hook))
    try:
        spec = model.input_spec
        with torch.no_grad():
            model(torch.zeros(1, spec.channels, spec.height, spec.width))
    finally:
        for h in handles:
            h.remove()
    return [_StubPoint(n, i, shapes[n]) for i, n in enumerate(order)]


@pytest.fixture()
def points_module(monkeypatch):
    try:
        import modelfix.repair.points as module
    except ImportError:
        module = types.ModuleType("modelfix.repair.points")
        module.Point, module.find_points = _StubPoint, _stub_find_points
        monkeypatch.setitem(sys.modules, "modelfix.repair.points", module)
    return module


def _point(points_module, name, index, shape):
    return points_module.Point(name=name, index=index, shape=tuple(shape))


# ---- tiny models and data --------------------------------------------------------------------------------------------


def _classifier(layers, channels=1, size=3) -> Classifier:
    return Classifier(nn.Sequential(OrderedDict(layers)), InputSpec(channels, size, size, (0.0,), (1.0,))).eval()


def _dyadic(shape, seed: int) -> torch.Tensor:
    """Small multiples of 1/4: sums of their products are exact in float32, so activations do not depend on how
    the samples are batched and float64 references can be compared at 1e-10."""
    return torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(seed)).float() / 4


def _conv_dense_net() -> Classifier:
    """conv1 (1→2, 2×2) → relu1 → flatten → fc1 (8→3) → relu2, on 3×3 inputs; dyadic weights."""
    model = _classifier([("conv1", nn.Conv2d(1, 2, 2)), ("relu1", nn.ReLU()), ("flatten", nn.Flatten()),
                         ("fc1", nn.Linear(8, 3)), ("relu2", nn.ReLU())])
    with torch.no_grad():
        for i, p in enumerate(model.net.parameters()):
            p.copy_(_dyadic(p.shape, i))
    return model


def _data(x: torch.Tensor, k: int = 2) -> Dataset:
    return Dataset(x=x, y=torch.arange(len(x)) % k)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


# ---- schedule and factors --------------------------------------------------------------------------------------------


def test_tau_schedule_values():
    assert tau_schedule(0.1, 3) == pytest.approx([1.0, 0.55, 0.1])
    assert tau_schedule(0.1, 3, "inverse-triangular") == pytest.approx([0.1, 0.55, 1.0])
    assert tau_schedule(0.1, 3, "flat") == pytest.approx([0.1, 0.1, 0.1])
    for kind in egem.SCHEDULES:
        assert tau_schedule(0.3, 1, kind) == [0.3]
    with pytest.raises(ModelfixError, match="schedule"):
        tau_schedule(0.1, 3, "linear")


def test_egem_factors_by_hand():
    s2 = torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)
    assert egem_factors(s2, 1.0).tolist() == pytest.approx([0.8, 0.5, 0.0])
    assert egem_factors(s2, 4.0).tolist() == pytest.approx([0.5, 0.2, 0.0])
    assert egem_factors(s2, 0.0).tolist() == [1.0, 1.0, 1.0]  # λ = 0 is the identity, dead units included


def test_pca_factors_by_hand_and_zero_variance():
    ev = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    assert pca_factors(ev, 1.0).tolist() == pytest.approx([0.0, 0.5, 0.75])
    # float noise below tol·max counts as no variance: factor 0 however small λ is
    noisy = torch.tensor([1e-14, -1e-13, 2.0], dtype=torch.float64)
    assert pca_factors(noisy, 1e-20).tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert pca_factors(ev, 0.0).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("tau", [0.9, 0.5, 0.1, 1e-3, 1e-5])
def test_search_lambda_hits_target(scale, tau):
    s2 = scale * torch.logspace(-3, 3, 500, dtype=torch.float64)
    mean = lambda lam: float(egem_factors(s2, lam).mean())
    lam, achieved = search_lambda(mean, tau, float(s2.max()))
    assert achieved <= tau
    assert tau - achieved <= 1e-4
    assert achieved == mean(lam)
    # λ scales with the activations: the same relative spread gives the same λ / scale
    lam_ref, _ = search_lambda(lambda l: float(egem_factors(s2 / scale, l).mean()), tau, float((s2 / scale).max()))
    assert lam / scale == pytest.approx(lam_ref, rel=1e-6)


def test_search_lambda_finds_the_hand_solved_lambda_and_counts_dead_units():
    """Second moments (1, 4): mean c = [1/(1+λ) + 4/(4+λ)]/2 = 0.5 ⇔ 8 + 5λ = 4 + 5λ + λ² ⇔ λ = 2. With two dead
    units added (EGEM's mean runs over all units, dead ones at 0) the same λ gives 0.25."""
    assert search_lambda(lambda lam: 1.0, 1.0, 5.0) == (0.0, 1.0)
    s2 = torch.tensor([1.0, 4.0], dtype=torch.float64)
    lam, achieved = search_lambda(lambda l: float(egem_factors(s2, l).mean()), 0.5, 4.0)
    assert lam == pytest.approx(2.0, rel=1e-6) and 0.5 - 1e-6 < achieved <= 0.5
    s2 = torch.tensor([0.0, 1.0, 0.0, 4.0], dtype=torch.float64)
    lam, achieved = search_lambda(lambda l: float(egem_factors(s2, l).mean()), 0.25, 4.0)
    assert lam == pytest.approx(2.0, rel=1e-6) and 0.25 - 1e-6 < achieved <= 0.25


def test_pca_egem_tau_averages_over_directions_with_variance_only():
    """Covariance diag(0, 4, 0, 1) (as from 3 unique samples in 4 dims): two directions carry no variance. τ = 0.5
    must be reached on the other two: [4/(4+λ) + 1/(1+λ)]/2 = 0.5 ⇔ λ = 2, factors 2/3 and 1/3, null directions 0,
    so the map is diag(0, 2/3, 0, 1/3). Averaging over all four directions the mean could never exceed 0.5."""
    stats = {"fc": LayerStats(name="fc", kind="dense", n=3.0, second_moment=torch.ones(4, dtype=torch.float64),
                              mean=torch.zeros(4, dtype=torch.float64),
                              cov=torch.diag(torch.tensor([0.0, 4.0, 0.0, 1.0], dtype=torch.float64)),
                              pca_mode="dense", unique=3)}
    (layer,) = build_refinement(stats, [Point("fc", 1, (4,))], 0.5, "flat", "pca-egem")
    assert layer["lambda"] == pytest.approx(2.0, rel=1e-6)
    assert layer["mean_factor"] == pytest.approx(0.5, abs=1e-6) and layer["mean_factor"] <= 0.5
    expected = torch.diag(torch.tensor([0.0, 2 / 3, 0.0, 1 / 3]))
    torch.testing.assert_close(layer["patch"].matrix, expected, rtol=1e-5, atol=1e-6)


# ---- statistics ------------------------------------------------------------------------------------------------------


def _hand_stats(model: Classifier, x: np.ndarray, counts: np.ndarray):
    """relu1 per-image channel sums and relu2 vectors computed with explicit loops from the weights."""
    w = model.net.conv1.weight.detach().double().numpy()
    b = model.net.conv1.bias.detach().double().numpy()
    n = len(x)
    maps = np.zeros((n, 2, 2, 2))
    for i in range(n):
        for c in range(2):
            for r in range(2):
                for q in range(2):
                    maps[i, c, r, q] = max(0.0, float((w[c, 0] * x[i, 0, r:r + 2, q:q + 2]).sum() + b[c]))
    fc_w = model.net.fc1.weight.detach().double().numpy()
    fc_b = model.net.fc1.bias.detach().double().numpy()
    dense = np.maximum(maps.reshape(n, -1) @ fc_w.T + fc_b, 0.0)
    sums = maps.sum(axis=(2, 3))
    return maps, sums, dense


def test_collect_stats_matches_hand_computation(points_module):
    model = _conv_dense_net()
    x = _dyadic((5, 1, 3, 3), 11)
    counts = torch.tensor([3, 1, 0, 2, 4])
    points = [_point(points_module, "relu1", 0, (2, 2, 2)), _point(points_module, "relu2", 1, (3,))]
    maps, sums, dense = _hand_stats(model, x.double().numpy(), counts.numpy())
    w = counts.double().numpy()

    stats = collect_stats(model, _data(x), counts, points, pca=True, conv_mode="sum", batch_size=2, progress=False)
    assert _no_hooks(model)
    conv, fc = stats["relu1"], stats["relu2"]
    assert conv.n == 10 and conv.kind == "conv" and conv.pca_mode == "sum" and fc.pca_mode == "dense"
    np.testing.assert_allclose(conv.second_moment.numpy(), (w[:, None] * sums**2).sum(0) / 10, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fc.second_moment.numpy(), (w[:, None] * dense**2).sum(0) / 10, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(conv.mean.numpy(), np.average(sums, axis=0, weights=w), rtol=1e-10, atol=1e-12)
    exact = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(conv.cov.numpy(), np.cov(sums.T, fweights=counts.numpy(), bias=True), **exact)
    np.testing.assert_allclose(fc.cov.numpy(), np.cov(dense.T, fweights=counts.numpy(), bias=True), **exact)
    assert conv.unique == 4  # the count-0 sample is not run

    # position mode: every spatial position of every image is a sample, weighted by its image's count
    position = collect_stats(model, _data(x), counts, points[:1], pca=True, conv_mode="position", progress=False)
    vectors = maps.transpose(0, 2, 3, 1).reshape(-1, 2)
    np.testing.assert_allclose(position["relu1"].cov.numpy(),
                               np.cov(vectors.T, fweights=np.repeat(counts.numpy(), 4), bias=True), **exact)
    np.testing.assert_allclose(position["relu1"].second_moment.numpy(), conv.second_moment.numpy(), rtol=1e-12)


@pytest.mark.parametrize("conv_mode", ["sum", "position"])
def test_counts_equal_explicit_duplication(points_module, conv_mode):
    model = _conv_dense_net()
    x = _dyadic((6, 1, 3, 3), 12)
    counts = torch.tensor([0, 1, 2, 3, 1, 5])
    points = [_point(points_module, "relu1", 0, (2, 2, 2)), _point(points_module, "relu2", 1, (3,))]
    weighted = collect_stats(model, _data(x), counts, points, pca=True, conv_mode=conv_mode, batch_size=4,
                             progress=False)
    duplicated = _data(x).subset(torch.repeat_interleave(torch.arange(6), counts))
    plain = collect_stats(model, duplicated, torch.ones(len(duplicated), dtype=torch.long), points, pca=True,
                          conv_mode=conv_mode, batch_size=5, progress=False)
    for name in ("relu1", "relu2"):
        assert weighted[name].n == plain[name].n == 12
        for field in ("second_moment", "mean", "cov"):
            torch.testing.assert_close(getattr(weighted[name], field), getattr(plain[name], field),
                                       rtol=1e-10, atol=1e-12)


def test_collect_stats_refuses_a_module_run_twice(points_module):
    relu = nn.ReLU()
    model = _classifier([("flatten", nn.Flatten()), ("act", relu), ("fc", nn.Linear(9, 9)), ("act2", relu)])
    with pytest.raises(UnsupportedModel, match="ran 2 times"):
        collect_stats(model, _data(torch.randn(3, 1, 3, 3)), torch.ones(3), [_point(points_module, "act", 0, (9,))],
                      pca=False, progress=False)
    assert _no_hooks(model)


# ---- PCA-EGEM patches ------------------------------------------------------------------------------------------------


def _dense_features(points_module, x: torch.Tensor, counts: torch.Tensor, name="fc"):
    torch.manual_seed(3)
    model = _classifier([("flatten", nn.Flatten()), ("fc", nn.Linear(9, 4))])
    point = _point(points_module, name, 0, (4,))
    stats = collect_stats(model, _data(x), counts, [point], pca=True, progress=False)
    with torch.no_grad():
        features = model.net(x).double().numpy()
    return model, point, stats, features


def test_pca_egem_patch_equals_hand_formula(points_module):
    x = torch.randn(30, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    counts = torch.randint(1, 4, (30,), generator=torch.Generator().manual_seed(5))
    _, point, stats, features = _dense_features(points_module, x, counts)
    [layer] = build_refinement(stats, [point], 0.3, "triangular", "pca-egem")
    assert layer["tau"] == 0.3 and abs(layer["mean_factor"] - 0.3) <= 1e-4 and layer["mean_factor"] <= 0.3
    assert isinstance(layer["patch"], PCAffine)

    w = counts.double().numpy()
    mean = np.average(features, axis=0, weights=w)
    values, vectors = np.linalg.eigh(np.cov(features.T, fweights=counts.numpy(), bias=True))
    c = values / (values + layer["lambda"])
    assert c.mean() == pytest.approx(layer["mean_factor"], abs=1e-9)
    a = np.random.default_rng(6).normal(size=(7, 4)) * 2
    expected = mean + (a - mean) @ (vectors @ np.diag(c) @ vectors.T).T
    got = layer["patch"](torch.tensor(a, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pca_sum_mode_patch_rescales_maps_by_refined_sums(points_module):
    model = _conv_dense_net()
    x = torch.randn(20, 1, 3, 3, generator=torch.Generator().manual_seed(7))
    point = _point(points_module, "relu1", 0, (2, 2, 2))
    stats = collect_stats(model, _data(x), torch.ones(20), [point], pca=True, conv_mode="sum", progress=False)
    [layer] = build_refinement(stats, [point], 0.5, "flat", "pca-egem")
    assert isinstance(layer["patch"], PCASumRatio)
    values, vectors = stats["relu1"].basis()
    c = values / (values + layer["lambda"])
    m = vectors @ torch.diag(c) @ vectors.T
    maps = torch.rand(3, 2, 2, 2, dtype=torch.float64) + 0.1
    s = maps.sum(dim=(2, 3))
    refined = stats["relu1"].mean + (s - stats["relu1"].mean) @ m.T
    expected = maps * (refined / s)[:, :, None, None]
    torch.testing.assert_close(layer["patch"](maps.float()).double(), expected, atol=1e-5, rtol=1e-5)


def test_zero_variance_directions_are_removed(points_module):
    # features span a 2-d affine subspace of the 4-d space: the other 2 directions must be projected out
    model = _classifier([("flatten", nn.Flatten()), ("feat", nn.Identity())], size=2)
    g = torch.Generator().manual_seed(8)
    basis = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    offset = torch.tensor([1.0, -2.0, 0.5, 3.0])
    coeffs = torch.randn(12, 2, generator=g)
    x = (offset + coeffs @ basis[:, :2].T).reshape(12, 1, 2, 2)
    point = _point(points_module, "feat", 0, (4,))
    stats = collect_stats(model, _data(x), torch.full((12,), 3), [point], pca=True, progress=False)
    values, _ = stats["feat"].basis()
    assert (pca_factors(values, 1e-9 * float(values.max())) == 0).sum() == 2
    [layer] = build_refinement(stats, [point], 0.9, "flat", "pca-egem")
    # rank 2 of 4: the 2 null directions are pruned, and τ = 0.9 is met on the 2 with variance (over all 4 the mean
    # could never exceed 0.5)
    assert layer["pruned_units"] == 2 and 0.9 - 1e-6 < layer["mean_factor"] <= 0.9
    off_span = basis[:, 2:] @ torch.tensor([[1.5], [-0.7]])
    mean = stats["feat"].mean.float()
    torch.testing.assert_close(layer["patch"]((mean + off_span.T)), mean[None], atol=1e-5, rtol=0)


# ---- fit_egem: selection, given α, the caller's model ----------------------------------------------------------------


def _tiny_split(k: int = 3, n: int = 12) -> tuple[Classifier, RefinementSplit]:
    torch.manual_seed(9)
    model = _classifier([("flatten", nn.Flatten()), ("fc1", nn.Linear(4, 5)), ("relu1", nn.ReLU()),
                         ("fc2", nn.Linear(5, k))], size=2)
    g = torch.Generator().manual_seed(10)
    fit = _data(torch.rand(n, 1, 2, 2, generator=g), k)
    val = _data(torch.rand(n // 2, 1, 2, 2, generator=g), k)
    split = RefinementSplit(fit, torch.full((n,), 2), val, torch.ones(n // 2, dtype=torch.long), {"fit_unique": n})
    return model, split


def _fake_accuracy(table):
    """weighted_accuracy stand-in: the original scores 1.0; a patched model scores table[alpha of its patch]."""
    calls = []

    def accuracy(model, data, counts, batch_size=256):
        entries = patch_entries(model)
        calls.append(entries)
        return 1.0 if not entries else table[entries[0]["alpha"]]

    return accuracy, calls


def test_selection_picks_strongest_alpha_within_slack(points_module, monkeypatch):
    # non-monotone on purpose: 0.2 fails, 0.1 passes again, everything stronger fails -> the last pass, 0.1
    table = {a: 1.0 for a in ALPHA_GRID} | {0.2: 0.90, 0.1: 0.96, 1e-2: 0.5, 1e-3: 0.5, 1e-4: 0.5, 1e-5: 0.94}
    accuracy, calls = _fake_accuracy(table)
    monkeypatch.setattr(egem, "weighted_accuracy", accuracy)
    grids = []  # the α scores come from one shared pass (`_grid_accuracies`): the table stands in for it

    def grid_accuracies(refined, split, grid, candidates, *args):
        grids.append(list(grid))
        return [table[a] for a in grid]

    monkeypatch.setattr(egem, "_grid_accuracies", grid_accuracies)
    model, split = _tiny_split()
    refined, trace = fit_egem(model, split, EgemConfig(layers=["relu1"], slack=0.05), progress=False)

    assert [row["alpha"] for row in trace["selection"]] == sorted(ALPHA_GRID, reverse=True)
    assert [row["passed"] for row in trace["selection"]] == [table[a] >= 0.95 for a in sorted(ALPHA_GRID, reverse=True)]
    assert trace["alpha"] == 0.1 and trace["val_acc"] == 0.96 and trace["selected_by"] == "slack"
    assert trace["val_orig"] == 1.0 and trace["points"] == ["relu1"]
    assert len(calls) == 1 and grids == [sorted(ALPHA_GRID, reverse=True)]  # val_orig, then the whole grid at once
    [entry] = patch_entries(refined)
    assert entry["target"] == "relu1" and entry["alpha"] == 0.1 and entry["method"] == "egem"
    assert entry["tau"] == 0.1 and abs(entry["mean_factor"] - 0.1) <= 1e-4
    assert set(trace["timing"]) == {"statistics_s", "selection_s", "total_s"}

    _, absolute = fit_egem(model, split, EgemConfig(layers=["relu1"], slack=0.05, slack_mode="absolute"),
                           progress=False)
    assert absolute["alpha"] == 0.1


def test_given_alpha_skips_selection(points_module, monkeypatch):
    accuracy, calls = _fake_accuracy({0.2: 0.7})
    monkeypatch.setattr(egem, "weighted_accuracy", accuracy)
    model, split = _tiny_split()
    refined, trace = fit_egem(model, split, EgemConfig(layers="relu1", alpha=0.2), progress=False)
    assert trace["selected_by"] == "given" and trace["selection"] == [] and trace["alpha"] == 0.2
    assert trace["val_acc"] == 0.7 and len(calls) == 2  # the original and the refined model, nothing else
    assert [e["alpha"] for e in patch_entries(refined)] == [0.2]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ModelfixError, match="alpha"):
            fit_egem(model, split, EgemConfig(layers="relu1", alpha=bad), progress=False)
    with pytest.raises(ModelfixError, match="slack"):
        fit_egem(model, split, EgemConfig(layers="relu1", slack=2.0), progress=False)
    with pytest.raises(ModelfixError, match="method"):
        fit_egem(model, split, EgemConfig(method="egem-lite"), progress=False)


@pytest.mark.parametrize("method", ["egem", "pca-egem"])
def test_input_model_is_unchanged(points_module, method):
    model, split = _tiny_split()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 2, 2)
    with torch.no_grad():
        out_before = model(x)
    refined, trace = fit_egem(model, split, EgemConfig(method=method, layers=["relu1"], alpha=0.01), progress=False)
    assert _no_hooks(model) and "patches" not in model._modules and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), out_before)
        assert not torch.allclose(refined(x), out_before)  # α = 0.01 on the only layer does change the outputs
    assert len(refined.net.relu1._forward_hooks) == 1


def test_pca_warns_when_too_few_unique_samples(points_module):
    model, split = _tiny_split(n=4)  # 4 unique fit samples for 5 dims
    _, trace = fit_egem(model, split, EgemConfig(method="pca-egem", layers=["relu1"], alpha=0.5), progress=False)
    assert trace["warnings"] == ["PCA-EGEM on 'relu1': only 4 unique samples for 5 dims; directions outside their "
                                 "span are removed and τ applies to the rest"]
    assert trace["layers"][0]["pca_mode"] == "dense"


@pytest.fixture(scope="module")
def digits_setup():
    """egem-cnn (random convs) with its last layer fitted by ridge on 600 decoy-digits images (about 85 % accuracy;
    seconds instead of a training run), the data, and a refinement split of correctly predicted samples."""
    from modelfix.data import load_data

    data = load_data("decoy-digits:train")
    torch.manual_seed(0)
    model = build_model(ModelCard(arch="egem-cnn", num_classes=10, input=default_input_spec("egem-cnn"))).eval()
    with torch.no_grad():
        features = model.net[:-1](data.x[:600]).double()
        features = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
        target = nn.functional.one_hot(data.y[:600], 10).double()
        eye = torch.eye(features.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(features.T @ features + 1e-2 * eye, features.T @ target)
        model.net.fc2.weight.copy_(w[:-1].T)
        model.net.fc2.bias.copy_(w[-1])
    split = refinement_split(model, data, samples_per_class=20)
    return model, data, split


@pytest.mark.parametrize("method", ["egem", "pca-egem"])
def test_fit_egem_end_to_end_on_decoy_digits(points_module, digits_setup, method):
    model, data, split = digits_setup
    refined, trace = fit_egem(model, split, EgemConfig(method=method), progress=False)

    defaults = [p.name for p in points_module.find_points(model)]
    assert trace["points"] == defaults and len(defaults) >= 2
    # triangular: the first point keeps τ = 1 (identity) unless the chosen α is 1; every other point is patched
    patched = [row["name"] for row in trace["layers"] if row["tau"] < 1]
    assert [e["target"] for e in patch_entries(refined)] == patched and patched
    assert trace["layers"][0]["tau"] == 1.0 and trace["layers"][-1]["tau"] == trace["alpha"]
    # correctly predicted samples only: val_orig is 1; accuracy falls for strong α, so the choice is interior and
    # is the strongest α within 5 % of it
    assert trace["val_orig"] == 1.0
    rows = trace["selection"]
    assert rows[0] == {"alpha": 1.0, "val_acc": 1.0, "passed": True} and not rows[-1]["passed"]
    chosen = [row["alpha"] for row in rows].index(trace["alpha"])
    assert rows[chosen]["val_acc"] >= 0.95 and not any(row["passed"] for row in rows[chosen + 1:])
    assert _no_hooks(model)
    with torch.no_grad():
        out = refined(data.x[:4])
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_alpha_selection_runs_the_prefix_once_and_equals_one_pass_per_alpha(points_module, digits_setup):
    """The α-independent layers before the first patched refinement point run once per validation batch, not once
    per α; every α's accuracy equals a full `weighted_accuracy` pass over the model with that α's patches (the previous
    implementation), so the selection is the same."""
    from modelfix.repair.patches import attach_patch, remove_patches
    from modelfix.repair.refinement import weighted_accuracy

    from modelfix.data import parse_artifact
    from modelfix.repair.counterfactual import counterfactual_set, score_model

    model, data, split = digits_setup
    cf = counterfactual_set(split.val, parse_artifact(data.info["artifact"]), seed=0)
    config = EgemConfig(layers="pool1,flatten,relu3", batch_size=16, counterfactual=cf)
    calls = []  # conv2 follows pool1, the first point, which the triangular schedule leaves alone for every α < 1
    handle = model.net.conv2.register_forward_hook(lambda *args: calls.append(1))
    try:
        refined, trace = fit_egem(model, split, config, progress=False)
    finally:
        handle.remove()
    batches = lambda n: -(-n // 16)  # noqa: E731
    # find_points' dry run, statistics over the fit part, the original's validation and counterfactual passes, then
    # one shared pass over each for the whole grid (it was one pass per α: 2 × 13 more here)
    assert len(calls) == 1 + batches(len(split.fit)) + 2 * batches(len(split.val)) + 2 * batches(len(cf))

    stats_model = copy.deepcopy(model).eval()
    points = list(points_module.find_points(stats_model, config.layers))
    stats = egem.collect_stats(stats_model, split.fit, split.fit_counts, points, False, "sum", 16, False)
    expected, expected_cf = [], []
    for row in trace["selection"]:
        layers = egem.build_refinement(stats, points, row["alpha"], "triangular", "egem")
        for layer in layers:
            if layer["patch"] is not None:
                attach_patch(stats_model, layer["name"], layer["patch"], {})
        expected.append(weighted_accuracy(stats_model, split.val, split.val_counts, 16))
        expected_cf.append(score_model(stats_model, cf, 16).worst)
        remove_patches(stats_model)
    assert [row["val_acc"] for row in trace["selection"]] == expected
    assert [row["cf_worst"] for row in trace["selection"]] == expected_cf and len(set(expected_cf)) > 2
    assert len(set(expected)) > 2  # the grid really changes the predictions
