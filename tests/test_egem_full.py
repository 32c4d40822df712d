"""egem-full (modelfix.repair.egem_full): the per-weight rule of EGEM (paper Eq. 4) with GI or LRP-ε statistics."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.data.dataset import Dataset
from modelfix.data.scenarios import load_scenario
from modelfix.errors import ModelfixError, UnsupportedModel
from modelfix.repair.egem import EgemConfig, fit_egem
from modelfix.repair.egem_full import (
    EXPERIMENTAL,
    find_consumers,
    fit_egem_full,
    full_multipliers,
    full_stats,
    probe_consumers,
)
from modelfix.repair.patches import patch_entries
from modelfix.repair.refinement import refinement_split
from modelfix.zoo import Classifier, build_model, default_input_spec


def _tiny() -> Classifier:
    """Flatten → fc1 (3→4) → ReLU → fc2 (4→2), on 1×1×3 inputs normalised with mean 0.5, std 2."""
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc1", nn.Linear(3, 4)), ("relu", nn.ReLU()),
                                     ("fc2", nn.Linear(4, 2))]))
    return Classifier(net, InputSpec(1, 1, 3, (0.5,), (2.0,))).eval()


def _tiny_data() -> Dataset:
    x = torch.rand(5, 1, 1, 3, generator=torch.Generator().manual_seed(1)) * 4 - 2
    return Dataset(x=x, y=torch.tensor([0, 1, 1, 0, 1]), class_names=["a", "b"])


def _egem_cnn() -> Classifier:
    torch.manual_seed(0)
    model = build_model(ModelCard(arch="egem-cnn", num_classes=10, input=default_input_spec("egem-cnn"))).eval()
    with torch.no_grad():  # logits O(1) instead of ~0.05 (PyTorch's init), so ε-rule stabilisers are negligible
        for p in model.parameters():
            p.mul_(3.0)
    return model


def _hooks(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]


# ---- statistics --------------------------------------------------------------------------------------------------


def test_gi_statistics_match_a_hand_computation():
    model, data = _tiny(), _tiny_data()
    counts = torch.tensor([1, 2, 0, 3, 1])
    stats = full_stats(model, data, counts, ["fc1", "fc2"], "gi", batch_size=2, progress=False)

    W1, b1 = model.net.fc1.weight.detach().double(), model.net.fc1.bias.detach().double()
    W2 = model.net.fc2.weight.detach().double()
    z0 = ((data.x.double() - 0.5) / 2.0).flatten(1)  # fc1 sees the normalised input
    h = z0 @ W1.T + b1
    a1 = h.clamp(min=0)
    w = counts.double()
    # fc2 is the output layer: d_j = ∂y/∂z_j = [j = y]
    d2 = F.one_hot(data.y, 2).double()
    # fc1: y = W2[y] · relu(h) + b, so ∂y/∂h_j = W2[y, j]·[h_j > 0]
    d1 = W2[data.y] * (h > 0).double()
    for name, a, d in [("fc1", z0, d1), ("fc2", a1, d2)]:
        AD, D = stats[name]
        assert AD.dtype == D.dtype == torch.float64
        expected_AD = torch.einsum("n,ni,nj->ij", w, a**2, d**2)
        expected_D = torch.einsum("n,nj->j", w, d**2)
        torch.testing.assert_close(AD, expected_AD, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(D, expected_D, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("explainer", ["gi", "lrp-eps"])
def test_counts_weight_like_explicit_duplicates(explainer):
    model = _egem_cnn()
    generator = torch.Generator().manual_seed(2)
    data = Dataset(x=torch.rand(6, 1, 28, 28, generator=generator), y=torch.randint(0, 10, (6,), generator=generator))
    counts = torch.tensor([2, 0, 1, 3, 1, 2])
    consumers = ["conv2", "fc2"]
    # batch size 1: each item's float32 forward/backward is then the same computation in both runs, and only the
    # float64 accumulation order differs
    weighted = full_stats(model, data, counts, consumers, explainer, batch_size=1, progress=False)
    duplicated = data.subset(torch.repeat_interleave(torch.arange(6), counts))
    plain = full_stats(model, duplicated, torch.ones(len(duplicated), dtype=torch.long), consumers, explainer,
                       batch_size=1, progress=False)
    for name in consumers:
        for got, want in zip(weighted[name], plain[name]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # other batch sizes only move float32 rounding (GI ~1e-7; LRP-ε amplifies it through 1/z̃ where z̃ ≈ 0)
    batched = full_stats(model, data, counts, consumers, explainer, batch_size=4, progress=False)
    for name in consumers:
        for got, want in zip(batched[name], plain[name]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    AD, D = weighted["conv2"]
    assert AD.shape == (8, 16) and D.shape == (16,)  # conv: channels in × channels out (spatial sums)
    assert _hooks(model) == []


def test_multipliers_formula():
    AD = torch.tensor([[2.0, 0.0, 0.0], [1.0, 3.0, 0.0]], dtype=torch.float64)
    D = torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64)
    m = full_multipliers(AD, D, 0.5)
    # m = AD / (AD + λ D_j); AD = 0 → 0, including the 0/0 of a column no explanation reaches
    expected = torch.tensor([[2 / (2 + 2), 0.0, 0.0], [1 / (1 + 2), 3 / (3 + 1), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(m, expected, rtol=0, atol=1e-15)
    assert torch.equal(full_multipliers(AD, D, 0.0), (AD > 0).double())  # λ = 0 keeps every used weight


# ---- the explainers' d ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("explainer", ["gi", "lrp-eps"])
def test_d_is_what_the_explainer_multiplies_by_a_times_w(explainer):
    """Notes §1.4: R_i = a_i Σ_j w_ij d_j at a consumer, where R_i is the explainer's value at the consumer input:
    the ε rule's relevance (verified there with max |diff| = 0), or for GI a_i·∂y/∂a_i."""
    model = _egem_cnn()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 3, 7, 9])
    with probe_consumers(model, ["conv2", "fc1", "fc2"], explainer, input_grad=True) as run:
        signals = run(x, y)
    for name in ["fc1", "fc2"]:  # Linear: (d @ W)_i = Σ_j w_ji d_j
        a, d, grad = signals[name]
        R = grad if explainer == "lrp-eps" else a * grad
        predicted = a * (d @ model.net.get_submodule(name).weight.detach())
        assert R.abs().max() > 1e-2
        torch.testing.assert_close(predicted, R, rtol=1e-5, atol=1e-5)
    a, d, grad = signals["conv2"]  # conv: the transposed convolution of d, times a
    a_ = a.clone().requires_grad_(True)
    (back,) = torch.autograd.grad(F.conv2d(a_, model.net.conv2.weight.detach()), a_, d)
    R = grad if explainer == "lrp-eps" else a * grad
    torch.testing.assert_close(a * back, R, rtol=1e-5, atol=1e-5)
    # the output layer: GI's d is the one-hot; LRP-ε's is logit/(logit − b + ε) on the true class, zero elsewhere
    d_out = signals["fc2"].d
    assert torch.equal(d_out != 0, F.one_hot(y, 10).bool())
    if explainer == "gi":
        assert torch.equal(d_out, F.one_hot(y, 10).float())
    else:  # relevance starts at the logit's value (not at 1), divided by the logit without its bias
        with torch.no_grad():
            logit = model(x).gather(1, y[:, None]).squeeze(1)
        z_tilde = logit - model.net.fc2.bias.detach()[y]
        torch.testing.assert_close(d_out.gather(1, y[:, None]).squeeze(1), logit / (z_tilde + 1e-6 * z_tilde.sign()))
    assert _hooks(model) == []


def test_unknown_explainer_is_one_clear_error():
    with pytest.raises(ModelfixError, match="unknown --explainer 'lrp'"):
        with probe_consumers(_tiny(), ["fc2"], "lrp"):
            pass


# ---- consumers -----------------------------------------------------------------------------------------------------


class _Twice(nn.Module):
    """A Linear applied twice per forward pass (weights shared between two uses)."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc0 = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.shared(self.shared(self.fc0(self.flatten(x)))))


def test_consumers_default_names_globs_and_errors():
    model = _egem_cnn()
    assert find_consumers(model) == ["conv2", "fc1", "fc2"]  # every Conv/Linear but the input layer
    assert find_consumers(model, "auto") == ["conv2", "fc1", "fc2"]
    assert find_consumers(model, "fc*") == ["fc1", "fc2"]
    assert find_consumers(model, "fc2, conv2") == ["conv2", "fc2"]  # execution order, whatever the order given
    assert find_consumers(model, ["conv1"]) == ["conv1"]  # named explicitly, the input layer is allowed
    with pytest.raises(ModelfixError, match="--layers 'fc9' matches no module") as error:
        find_consumers(model, "fc9")
    assert "\n" not in str(error.value)
    with pytest.raises(UnsupportedModel, match="cannot edit 'relu1'"):
        find_consumers(model, "relu1")
    with pytest.raises(UnsupportedModel, match="matches no Conv2d"):
        find_consumers(model, "pool*")
    twice = Classifier(_Twice(), InputSpec(1, 2, 2, (0.0,), (1.0,))).eval()
    assert find_consumers(twice) == ["head"]  # the shared layer is skipped by default
    with pytest.raises(UnsupportedModel, match="'shared': it runs 2 times"):
        find_consumers(twice, "shared")


# ---- fitting -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_scenario("decoy-digits", "train").subset(torch.arange(300))


def test_fit_edits_only_consumer_weights_and_adds_no_patch(digits):
    model = _egem_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    split = refinement_split(model, digits, samples_per_class=40, keep_incorrect=True)
    config = EgemConfig(method="egem-full", slack=1.0)  # every α passes: the strongest is chosen
    refined, trace = fit_egem_full(model, split, config, progress=False)

    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched
    assert patch_entries(refined) == [] and "patches" not in refined._modules
    assert _hooks(refined) == [] and not refined.training
    after = refined.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed and changed <= {"net.conv2.weight", "net.fc1.weight", "net.fc2.weight"}

    assert trace["method"] == "egem-full" and trace["explainer"] == "gi"
    assert trace["points"] == ["conv2", "fc1", "fc2"]
    assert trace["selected_by"] == "slack" and trace["alpha"] == min(config.grid)
    assert [row["alpha"] for row in trace["selection"]] == sorted(config.grid, reverse=True)
    assert all(row["passed"] for row in trace["selection"])
    assert trace["warnings"] == [EXPERIMENTAL] and "experimental" in EXPERIMENTAL
    assert {"statistics_s", "selection_s", "total_s"} <= set(trace["timing"])
    assert trace["samples"]["fit_unique"] == len(split.fit)
    layers = {row["name"]: row for row in trace["layers"]}
    assert [row["kind"] for row in trace["layers"]] == ["weights"] * 3
    assert layers["conv2"]["units"] == 8 * 16 and layers["fc1"]["units"] == 256 * 200
    assert layers["conv2"]["tau"] == 1.0 and "net.conv2.weight" not in changed  # triangular: first layer kept
    assert layers["fc2"]["mean_factor"] <= layers["fc2"]["tau"] + 1e-12

    # the edit is exactly W[j, i, …] ← m[i, j]·W[j, i, …] with the recorded λ (bias untouched)
    stats = full_stats(model, split.fit, split.fit_counts, ["fc1", "fc2"], progress=False)
    for name in ["fc1", "fc2"]:
        m = full_multipliers(*stats[name], layers[name]["lambda"])
        assert float(m.mean()) == pytest.approx(layers[name]["mean_factor"], rel=1e-9)
        assert layers[name]["pruned_units"] == int((m < 0.01).sum())
        expected = before[f"net.{name}.weight"] * m.T.float()
        torch.testing.assert_close(after[f"net.{name}.weight"], expected, rtol=1e-6, atol=0)


def test_fit_with_lrp_eps_and_a_given_alpha(digits):
    model = _egem_cnn()
    split = refinement_split(model, digits, samples_per_class=30, keep_incorrect=True)
    config = EgemConfig(method="egem-full", alpha=0.5, layers="fc*")
    config.explainer = "lrp-eps"
    refined, trace = fit_egem(model, split, config, progress=False)  # egem.py hands egem-full over
    assert trace["explainer"] == "lrp-eps" and trace["selected_by"] == "given" and trace["selection"] == []
    assert trace["points"] == ["fc1", "fc2"] and trace["alpha"] == 0.5
    assert [row["tau"] for row in trace["layers"]] == [1.0, 0.5]
    assert trace["layers"][1]["mean_factor"] == pytest.approx(0.5, abs=1e-6)
    assert torch.equal(refined.net.fc1.weight, model.net.fc1.weight)
    assert not torch.equal(refined.net.fc2.weight, model.net.fc2.weight)
    assert _hooks(refined) == [] and _hooks(model) == []
    assert 0.0 <= trace["val_acc"] <= 1.0
