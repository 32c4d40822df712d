"""Cert-R4 and IBP-Ex on the interval module: finite-difference gradients, bounds that dominate sampled values."""

import pytest
import torch
import torch.nn.functional as F
from gradcheck import F64, assert_fd_gradient
from torch import nn

from modelfix.card import InputSpec
from modelfix.errors import ModelfixError, UnsupportedModel
from modelfix.repair.guidance.certified import CertR4, IBPEx, worst_case_logits
from modelfix.repair.intervals import input_gradient_bounds
from modelfix.repair.methods import make_objective
from modelfix.zoo import Classifier


def relu_net(seed=0, conv=False):
    torch.manual_seed(seed)
    layers = ([nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 3)] if conv
              else [nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 3)])
    return Classifier(nn.Sequential(*layers), InputSpec(1, 8, 8, (0.2,), (0.5,))).double()


def batch(seed=1, masked=(True, True, False, True)):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(4, 1, 8, 8, dtype=F64)
    mask[:, :, :3, :3] = 1
    return {"x": torch.rand(4, 1, 8, 8, generator=g, dtype=F64), "y": torch.tensor([0, 1, 2, 1]), "mask": mask,
            "has_mask": torch.tensor(masked), "group": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)}


@pytest.mark.parametrize("conv", [False, True])
def test_cert_r4_penalty_gradient_matches_finite_differences(conv):
    model, b = relu_net(conv=conv), batch()
    cert = CertR4(eps=0.3)
    assert_fd_gradient(model, lambda m: cert.penalty(m, b))


@pytest.mark.parametrize("rrr", [0.0, 0.5])
def test_ibp_ex_penalty_gradient_matches_finite_differences(rrr):
    model, b = relu_net(conv=True), batch()
    ibp = IBPEx(alpha=0.3, eps=0.2, rrr=rrr)
    assert_fd_gradient(model, lambda m: ibp.penalty(m, b))


def test_cert_r4_bounds_contain_every_sampled_gradient_element_and_collapse_at_tiny_eps():
    """Element by element: G_l ≤ ∂CE_b/∂x'_bi ≤ G_u at every pixel of every item for points x' sampled in the box,
    so M·(|G_l| + |G_u|) ≥ M·|g| per element; the penalty is Σ M(|G_l| + |G_u|)/(B·D) of those bounds; and as ε → 0
    the bounds close on the gradient at x (a loose or misplaced bound fails here)."""
    model, b = relu_net(conv=True), batch(masked=(True,) * 4)
    eps = 0.3
    g_lower, g_upper = input_gradient_bounds(model, b["x"], b["y"], b["mask"], eps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = (b["x"] + eps * b["mask"] * (2 * torch.rand(b["x"].shape, generator=gen, dtype=F64) - 1)).requires_grad_()
        losses = F.cross_entropy(model(x), b["y"], reduction="sum")  # per-example gradients: the sum's gradient
        (g,) = torch.autograd.grad(losses, x)
        assert bool((g_lower <= g + 1e-12).all()) and bool((g <= g_upper + 1e-12).all())
    # The penalty bounds the gradient w.r.t. the network input z = (x − 0.2)/0.5: std 0.5 × the pixel bounds.
    expected = 0.5 * float((b["mask"] * (g_lower.abs() + g_upper.abs())).sum().detach()) / b["x"].numel()
    assert float(CertR4(eps=eps).penalty(model, b).detach()) == pytest.approx(expected, rel=1e-12)
    x = b["x"].clone().requires_grad_()
    (g0,) = torch.autograd.grad(F.cross_entropy(model(x), b["y"], reduction="sum"), x)
    lo, hi = input_gradient_bounds(model, b["x"], b["y"], b["mask"], 1e-9)
    torch.testing.assert_close(lo, g0, rtol=0, atol=1e-6)
    torch.testing.assert_close(hi, g0, rtol=0, atol=1e-6)
    assert float((g_upper - g_lower).max().detach()) > 1e-3  # at ε = 0.3 the box is not degenerate


def test_cert_r4_penalty_is_taken_on_the_normalised_input_of_a_linear_net():
    """A linear net f(x) = W (x − μ)/σ + b with σ = 0.5, at ε → 0 (the box closes on x): the bounds are the gradient
    itself, ∂CE/∂z = (softmax(W z + b) − e_y)ᵀ W with z = (x − μ)/σ, so the penalty is
    Σ_b Σ_i M_bi · 2 |Σ_k (p_bk − e_{y_b,k}) W_ki| / (B·D). The pixel gradient would be 1/σ = 2 times that."""
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), InputSpec(1, 8, 8, (0.2,), (0.5,))).double()
    b = batch(masked=(True, True, False, True))
    w, bias = model.net[1].weight.detach(), model.net[1].bias.detach()
    z = (b["x"].flatten(1) - 0.2) / 0.5
    logits = z @ w.T + bias
    p = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    onehot = torch.zeros(4, 3, dtype=F64)
    onehot[torch.arange(4), b["y"]] = 1
    grad_z = (p - onehot) @ w  # 4 × 64
    m = b["mask"].flatten(1) * torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=F64)[:, None]  # item 2 has no mask
    expected = float((m * 2 * grad_z.abs()).sum()) / b["x"].numel()
    assert expected > 0
    got = float(CertR4(eps=1e-9).penalty(model, b).detach())
    assert got == pytest.approx(expected, rel=1e-6)
    assert got != pytest.approx(2 * expected, rel=0.1)  # the pixel-gradient version


def test_ibp_ex_rrr_term_differentiates_the_normalised_input():
    """A linear net f(x) = W (x − μ)/σ + b: ∂(Σ_k f_k)/∂z = Σ_k W_k (z the network input), the same for every item,
    so the term is λ_rrr·Σ_b Σ_i M_bi |Σ_k W_ki|. With σ = 0.5 the pixel gradient would be twice that."""
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), InputSpec(1, 8, 8, (0.2,), (0.5,))).double()
    b = batch(masked=(True, True, False, True))
    column_sums = model.net[1].weight.detach().sum(dim=0)  # Σ_k W_ki, 64
    per_item = (b["mask"][:, 0].flatten(1) * column_sums.abs()).sum(dim=1)
    expected_rrr = 0.7 * float(per_item[[0, 1, 3]].sum())  # item 2 has no mask: its M counts as 0
    with_rrr = float(IBPEx(alpha=0.3, eps=0.2, rrr=0.7).penalty(model, b).detach())
    without = float(IBPEx(alpha=0.3, eps=0.2, rrr=0.0).penalty(model, b).detach())
    assert expected_rrr > 0
    assert with_rrr - without == pytest.approx(expected_rrr, rel=1e-10)


def test_worst_case_cross_entropy_dominates_sampled_cross_entropy():
    model, b = relu_net(), batch(masked=(True,) * 4)
    ibp = IBPEx(alpha=0.0, eps=0.25)
    worst = float(ibp.penalty(model, b).detach())
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = b["x"] + 0.25 * b["mask"] * (2 * torch.rand(b["x"].shape, generator=gen, dtype=F64) - 1)
        assert float(F.cross_entropy(model(x), b["y"]).detach()) <= worst + 1e-12


def test_worst_case_logits_pick_lower_at_the_label():
    lo, hi = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[5.0, 6.0, 7.0]])
    assert worst_case_logits(lo, hi, torch.tensor([1])).tolist() == [[5.0, 1.0, 7.0]]


def test_no_masks_no_penalty_and_bad_settings():
    model, b = relu_net(), batch(masked=(False,) * 4)
    assert float(CertR4().penalty(model, b)) == 0.0 and float(IBPEx().penalty(model, b)) == 0.0
    with pytest.raises(ModelfixError, match="--eps"):
        CertR4(eps=0)
    with pytest.raises(ModelfixError, match="--alpha"):
        IBPEx(alpha=1.5)
    gelu = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.GELU()), InputSpec(1, 8, 8, (0.0,), (1.0,)))
    with pytest.raises(UnsupportedModel, match="GELU"):
        CertR4().penalty(gelu.double(), batch(masked=(True,) * 4))


def test_registry_builds_the_interval_methods():
    model = relu_net()
    for name in ("r4-cert", "ibp-ex", "ibp-ex-rrr"):
        loss, parts = make_objective(name, model, eps=0.1)(model, batch())
        assert torch.isfinite(loss) and parts["penalty"] > 0


def test_ibp_ex_ramps_follow_heo_per_epoch_and_reach_the_log():
    from modelfix.data import Dataset
    from modelfix.training import TrainConfig, train

    ibp = IBPEx(alpha=0.8, eps=0.4, eps_start=0.1, ramp=True)
    assert (ibp.alpha, ibp.eps) == (0.8, 0.1)  # epoch 0 before any training (the finetune preflight)
    assert ibp.set_epoch(2, 4) == {"alpha": pytest.approx(0.8 - 0.5 * 0.8 * 0.5), "eps": pytest.approx(0.1 + 0.4 * 0.5)}
    constant = IBPEx(alpha=0.8, eps=0.4, eps_start=0.1)
    assert constant.set_epoch(3, 4) == {} and (constant.alpha, constant.eps) == (0.8, 0.4)
    b = batch()
    data = Dataset(x=b["x"].float(), y=b["y"], mask=b["mask"].float(), has_mask=b["has_mask"])
    model = relu_net().float()
    history = train(model, data, TrainConfig(epochs=3, batch_size=4), ibp, progress=False).history
    assert [h["alpha"] for h in history] == pytest.approx([0.8 - 0.4 * e / 3 for e in range(3)])
    assert [h["eps"] for h in history] == pytest.approx([0.1 + 0.4 * e / 3 for e in range(3)])
    with pytest.raises(ModelfixError, match="--eps-start"):
        IBPEx(eps_start=-1)
