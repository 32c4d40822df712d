"""RGEM / Ridge last-layer refits (modelfix/repair/lastlayer.py): the closed form against numpy's normal equations,
weights as duplication, scale freedom, RGEM's identity limit and shrinkage, selection, refusals, end to end."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.data.dataset import Dataset
from modelfix.errors import ModelfixError, UnsupportedModel
from modelfix.repair.lastlayer import (
    LAMBDA_GRID,
    RefitConfig,
    fit_refit,
    penultimate_features,
    ridge_moments,
    ridge_solve,
)
from modelfix.repair.refinement import RefinementSplit, refinement_split, weighted_accuracy
from modelfix.zoo import Classifier, build_model, default_input_spec

A5 = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0], [-2.0, 1.5], [0.0, 0.25]])
T5 = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5], [-1.0, 3.0]])
W5 = np.array([1.0, 2.0, 1.0, 3.0, 1.0])


def numpy_augmented(a: np.ndarray, t: np.ndarray, w: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Normal equations of [A, 1] with penalty diag(λ_abs, …, λ_abs, 0), λ_abs = lam · mean_j E_w[a_j²]."""
    n, d = a.shape
    aug = np.hstack([a, np.ones((n, 1))])
    lam_abs = lam * float((w[:, None] * a**2).sum() / w.sum() / d)
    penalty = np.diag([lam_abs] * d + [0.0])
    gram = aug.T @ (w[:, None] * aug) / w.sum()
    solution = np.linalg.solve(gram + penalty, aug.T @ (w[:, None] * t) / w.sum())
    return solution[:d].T, solution[d]


def tensors(*arrays):
    return [torch.tensor(a, dtype=torch.float64) for a in arrays]


# ---- ridge_solve ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1e-3, 0.7, 5.0])
def test_ridge_solve_matches_augmented_normal_equations(lam):
    weight, bias = ridge_solve(*tensors(A5, T5, W5), lam)
    ref_w, ref_b = numpy_augmented(A5, T5, W5, lam)
    assert weight.dtype == torch.float64 and weight.shape == (2, 2) and bias.shape == (2,)
    np.testing.assert_allclose(weight.numpy(), ref_w, rtol=0, atol=1e-10)
    np.testing.assert_allclose(bias.numpy(), ref_b, rtol=0, atol=1e-10)


def test_bias_is_unpenalised():
    weight, bias = ridge_solve(*tensors(A5, T5, W5), 1e12)
    assert weight.abs().max() < 1e-9
    np.testing.assert_allclose(bias.numpy(), (W5[:, None] * T5).sum(0) / W5.sum(), rtol=0, atol=1e-9)


def test_weights_equal_duplication():
    counts = np.array([1, 3, 2, 1, 4])
    weighted = ridge_solve(*tensors(A5, T5), torch.tensor(counts), 0.3)
    duplicated = ridge_solve(*tensors(np.repeat(A5, counts, 0), np.repeat(T5, counts, 0)),
                             torch.ones(int(counts.sum())), 0.3)
    for got, want in zip(weighted, duplicated):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_penalty_is_relative_to_the_feature_scale():
    a, t, w = tensors(A5, T5, W5)
    w1, b1 = ridge_solve(a, t, w, 0.5)
    w2, b2 = ridge_solve(1000.0 * a, t, w, 0.5)
    torch.testing.assert_close(w2 * 1000.0, w1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b2, b1, rtol=1e-10, atol=1e-12)
    assert ridge_moments(a, t, w).second_moment == pytest.approx(float((W5[:, None] * A5**2).sum() / W5.sum() / 2))


def test_singular_covariance_is_solved():
    # a dead feature (all zero) and a duplicated one: Cov is singular, λ > 0 still gives a finite, unique answer
    a = np.hstack([A5, np.zeros((5, 1)), A5[:, :1]])
    weight, bias = ridge_solve(*tensors(a, T5, W5), 1e-3)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert weight[:, 2].abs().max() == 0  # the dead feature gets no weight
    torch.testing.assert_close(weight[:, 0], weight[:, 3], rtol=0, atol=1e-12)  # duplicates share the weight


def test_intercept_free_solve():
    weight, bias = ridge_solve(*tensors(A5, T5, W5), 0.2, intercept=False)
    lam_abs = 0.2 * float((W5[:, None] * A5**2).sum() / W5.sum() / 2)
    gram = A5.T @ (W5[:, None] * A5) / W5.sum()
    ref = np.linalg.solve(gram + lam_abs * np.eye(2), A5.T @ (W5[:, None] * T5) / W5.sum()).T
    np.testing.assert_allclose(weight.numpy(), ref, rtol=0, atol=1e-10)
    assert bias.abs().max() == 0


def test_ridge_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(10)
    a = centres[y] + 0.3 * torch.randn(30, 2, generator=gen, dtype=torch.float64)
    weight, bias = ridge_solve(a, nn.functional.one_hot(y, 3).double(), torch.ones(30), LAMBDA_GRID[0])
    assert torch.equal((a @ weight.T + bias).argmax(1), y)


# ---- models and splits ----------------------------------------------------------------------------------------------


def tiny_model(tail: list[tuple[str, nn.Module]] | None = None, seed: int = 0) -> Classifier:
    """1×2×2 input → fc1 (4 → 5) → tanh → fc2 (5 → 3) [→ tail]; tanh keeps the feature covariance full rank."""
    torch.manual_seed(seed)
    layers = [("flatten", nn.Flatten()), ("fc1", nn.Linear(4, 5)), ("act", nn.Tanh()), ("fc2", nn.Linear(5, 3))]
    spec = InputSpec(channels=1, height=2, width=2, mean=(0.0,), std=(1.0,))
    return Classifier(nn.Sequential(OrderedDict(layers + (tail or []))), spec).eval()


def tiny_split(model: nn.Module, n: int = 60, seed: int = 1, per_class: int = 10) -> RefinementSplit:
    """Random inputs labelled by the model itself, so every sample is correctly predicted (val_orig = 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    data = Dataset(x=x, y=y, class_names=["a", "b", "c"])
    assert int(data.class_counts().min()) >= 2
    return refinement_split(model, data, samples_per_class=per_class, seed=seed)


def test_penultimate_features_are_the_last_linear_input():
    model = tiny_model()
    split = tiny_split(model)
    features = penultimate_features(model, split.fit, batch_size=7, progress=False)
    assert features.dtype == torch.float64 and features.shape == (len(split.fit), 5)
    with torch.no_grad():
        expected = torch.tanh(model.net.fc1(split.fit.x.flatten(1))).double()
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert not model.net.fc2._forward_pre_hooks and not model.net.fc2._forward_hooks


def test_rgem_tiny_lambda_reproduces_the_original_layer():
    model = tiny_model()
    split = tiny_split(model)
    features = penultimate_features(model, split.fit, progress=False)
    assert torch.linalg.matrix_rank(features - features.mean(0)) == 5  # full-rank covariance
    refit, trace = fit_refit(model, split, RefitConfig(method="rgem", lam=1e-10), progress=False)
    torch.testing.assert_close(refit.net.fc2.weight, model.net.fc2.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(refit.net.fc2.bias, model.net.fc2.bias, rtol=0, atol=1e-6)
    assert trace["selected_by"] == "given" and trace["selection"] == [] and trace["lambda"] == 1e-10
    assert trace["val_acc"] == trace["val_orig"] == 1.0


def test_rgem_large_lambda_shrinks_the_weights():
    model = tiny_model()
    split = tiny_split(model)
    lam = 1e3
    refit, trace = fit_refit(model, split, RefitConfig(method="rgem", lam=lam), progress=False)
    w_old, w_new = model.net.fc2.weight.double(), refit.net.fc2.weight.double()
    # W_newᵀ = (Cov + λ_abs I)⁻¹ Cov W_oldᵀ: every direction shrinks by σ²/(σ²+λ_abs) ≤ d/(d+λ) (σ² ≤ trace ≤ d·m2)
    assert torch.linalg.norm(w_new) <= 5 / (5 + lam) * torch.linalg.norm(w_old) * (1 + 1e-5)
    assert torch.linalg.norm(w_new) < 0.01 * torch.linalg.norm(w_old)
    # unpenalised bias keeps the mean logit: b_new = b_old + (W_old − W_new) μ
    features = penultimate_features(model, split.fit, progress=False)
    counts = split.fit_counts.double()
    mu = counts @ features / counts.sum()
    expected = model.net.fc2.bias.double() + (w_old - w_new) @ mu
    torch.testing.assert_close(refit.net.fc2.bias.double(), expected, rtol=0, atol=1e-5)
    assert trace["lambda_abs"] == pytest.approx(lam * float((counts @ features.square()).sum() / counts.sum()) / 5)


def test_selection_picks_the_strongest_lambda_within_slack():
    model = tiny_model()
    split = tiny_split(model)
    grid = (1e8, 1e-8)  # given out of order: scanned weakest first
    # at 1e8 W ≈ 0 and every prediction is argmax of the mean logit: 1/3 of the (class-balanced) validation set
    refit, trace = fit_refit(model, split, RefitConfig(method="rgem", grid=grid, slack=0.05), progress=False)
    assert [row["lambda"] for row in trace["selection"]] == [1e-8, 1e8]
    assert trace["selection"][0]["val_acc"] == 1.0 and trace["selection"][0]["passed"]
    assert trace["selection"][1]["val_acc"] == pytest.approx(1 / 3) and not trace["selection"][1]["passed"]
    assert trace["lambda"] == 1e-8 and trace["selected_by"] == "slack"
    # a slack that lets 1/3 pass picks the strongest
    refit, trace = fit_refit(model, split, RefitConfig(method="rgem", grid=grid, slack=0.7), progress=False)
    assert trace["lambda"] == 1e8 and all(row["passed"] for row in trace["selection"])
    assert trace["val_acc"] == pytest.approx(1 / 3)
    assert weighted_accuracy(refit, split.val, split.val_counts) == pytest.approx(trace["val_acc"])
    # absolute mode: the bar is 1 − 0.7 = 0.3 as well
    _, trace = fit_refit(model, split, RefitConfig(method="rgem", grid=grid, slack=0.6, slack_mode="absolute"),
                         progress=False)
    assert trace["lambda"] == 1e-8


def test_selection_table_matches_real_forward_passes():
    model = tiny_model()
    split = tiny_split(model)
    _, trace = fit_refit(model, split, RefitConfig(method="ridge"), progress=False)
    assert [row["lambda"] for row in trace["selection"]] == list(LAMBDA_GRID)
    for row in trace["selection"]:
        given, _ = fit_refit(model, split, RefitConfig(method="ridge", lam=row["lambda"]), progress=False)
        assert weighted_accuracy(given, split.val, split.val_counts) == pytest.approx(row["val_acc"])
    passed = [row["lambda"] for row in trace["selection"] if row["passed"]]
    assert trace["lambda"] == (max(passed) if passed else LAMBDA_GRID[0])


def test_ridge_reaches_full_train_accuracy_on_separable_features():
    # the features are the raw 2-d inputs (flatten → fc): three well-separated clusters
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    y = torch.arange(3).repeat_interleave(12)
    x = (centres[y] + 0.3 * torch.randn(36, 2, generator=gen)).reshape(36, 1, 1, 2)
    spec = InputSpec(channels=1, height=1, width=2, mean=(0.0,), std=(1.0,))
    model = Classifier(nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc", nn.Linear(2, 3))])), spec).eval()
    split = RefinementSplit(Dataset(x=x, y=y), torch.ones(36, dtype=torch.long), Dataset(x=x[:6], y=y[:6]),
                            torch.ones(6, dtype=torch.long))
    refit, trace = fit_refit(model, split, RefitConfig(method="ridge", lam=1e-4), progress=False)
    assert weighted_accuracy(refit, split.fit, split.fit_counts) == 1.0


def test_callers_model_is_unchanged():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    split = tiny_split(model)
    refit, _ = fit_refit(model, split, RefitConfig(method="ridge", lam=1.0), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.equal(refit.net.fc2.weight, model.net.fc2.weight)
    assert torch.equal(refit.net.fc1.weight, model.net.fc1.weight)
    assert not model.net.fc2._forward_pre_hooks and not refit.net.fc2._forward_hooks


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan")])
def test_bad_lambda_is_refused(lam):
    model = tiny_model()
    with pytest.raises(ModelfixError, match="--lambda"):
        fit_refit(model, tiny_split(model), RefitConfig(lam=lam), progress=False)


def test_bad_options_are_refused():
    model = tiny_model()
    split = tiny_split(model)
    with pytest.raises(ModelfixError, match="--method"):
        fit_refit(model, split, RefitConfig(method="lasso"), progress=False)
    with pytest.raises(ModelfixError, match="--slack"):
        fit_refit(model, split, RefitConfig(slack=2.0), progress=False)
    with pytest.raises(ModelfixError, match="grid"):
        fit_refit(model, split, RefitConfig(grid=(1.0, -1.0)), progress=False)


def test_model_without_linear_is_unsupported():
    spec = InputSpec(channels=1, height=2, width=2, mean=(0.0,), std=(1.0,))
    model = Classifier(nn.Sequential(nn.Conv2d(1, 3, 2), nn.Flatten()), spec).eval()
    split = RefinementSplit(Dataset(x=torch.rand(4, 1, 2, 2), y=torch.tensor([0, 1, 2, 0])), torch.ones(4),
                            Dataset(x=torch.rand(3, 1, 2, 2), y=torch.tensor([0, 1, 2])), torch.ones(3))
    with pytest.raises(UnsupportedModel, match="no nn.Linear"):
        fit_refit(model, split, RefitConfig(), progress=False)


@pytest.mark.parametrize("tail", [nn.ReLU(), nn.ReLU(inplace=True), nn.Softmax(dim=1)], ids=["relu", "relu-inplace",
                                                                                             "softmax"])
def test_linear_that_is_not_the_last_operation_is_unsupported(tail):
    model = tiny_model([("tail", tail)])
    split = tiny_split(tiny_model())  # the same weights without the tail label it
    with pytest.raises(UnsupportedModel, match="not the model's final operation"):
        fit_refit(model, split, RefitConfig(lam=1.0), progress=False)


def test_bias_free_last_layer_is_refit_without_intercept():
    model = tiny_model()
    model.net.fc2 = nn.Linear(5, 3, bias=False)
    refit, _ = fit_refit(model, tiny_split(model), RefitConfig(method="rgem", lam=1e-10), progress=False)
    assert refit.net.fc2.bias is None
    torch.testing.assert_close(refit.net.fc2.weight, model.net.fc2.weight, rtol=0, atol=1e-6)


def test_identity_after_the_linear_is_fine():
    model = tiny_model([("out", nn.Identity())])
    refit, trace = fit_refit(model, tiny_split(model), RefitConfig(lam=1e-10), progress=False)
    assert trace["layer"] == "fc2"
    torch.testing.assert_close(refit.net.fc2.weight, model.net.fc2.weight, rtol=0, atol=1e-6)


# ---- end to end ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_and_split():
    from modelfix.data import load_data
    from modelfix.training import TrainConfig, train

    data = load_data("decoy-digits:train")
    data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:600])
    card = ModelCard(arch="mlp", num_classes=10, input=default_input_spec("mlp"), arch_kwargs={"hidden": 64})
    torch.manual_seed(0)
    model = build_model(card)
    train(model, data, TrainConfig(optimizer="adam", lr=1e-3, epochs=2, batch_size=64, seed=0), progress=False)
    model.eval()
    return model, refinement_split(model, data, samples_per_class=30, seed=0)


@pytest.mark.parametrize("method", ["rgem", "ridge"])
def test_end_to_end_on_the_mlp(mlp_and_split, method):
    model, split = mlp_and_split
    before = copy.deepcopy(model.state_dict())
    refit, trace = fit_refit(model, split, RefitConfig(method=method), progress=False)
    changed = [k for k, v in refit.net.state_dict().items() if not torch.equal(v, before["net." + k])]
    assert changed and set(changed) <= {"fc2.weight", "fc2.bias"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert trace["method"] == method and trace["layer"] == "fc2" and trace["selected_by"] == "slack"
    assert trace["val_orig"] == weighted_accuracy(model, split.val, split.val_counts) == 1.0
    assert trace["val_acc"] >= 0.95 * trace["val_orig"] or trace["lambda"] == LAMBDA_GRID[0]
    assert trace["val_acc"] == pytest.approx(weighted_accuracy(refit, split.val, split.val_counts))
    assert [row["lambda"] for row in trace["selection"]] == list(LAMBDA_GRID)
    assert trace["samples"] == split.summary and set(trace["timing"]) == {"features_s", "selection_s", "total_s"}
    if method == "rgem":  # the original logits are reachable: the weakest λ always passes
        assert trace["selection"][0]["passed"]
