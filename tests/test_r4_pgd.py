"""Rand-R4, Adv-R4, Smooth-RRR (modelfix.repair.guidance.r4) and PGD-Ex with the masked-box PGD (pgd_ex.py).

Every penalty's parameter gradient is checked against central finite differences in float64 (the R4 repo's baselines
fail exactly this, methods_guided_finetunes.md §7 item 4). Random perturbations come from a freshly seeded generator
on every call, so the penalty is a deterministic function of θ. The PGD penalties are checked twice: at a fixed
adversarial point, and end to end; the latter is valid because PGD starts at x (no random draw) and its iterate moves
by sign steps and box clamps, so x* is piecewise constant in θ and a ±1e-5 step in θ does not move it (Danskin).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck import F64, assert_fd_gradient, value

from modelfix.card import InputSpec
from modelfix.errors import ModelfixError
from modelfix.repair.guidance.pgd_ex import PGDEx, per_example_loss, pgd_in_box
from modelfix.repair.guidance.r4 import R4Adv, R4Rand, SmoothRRR, masked_gradient_norms, masked_uniform
from modelfix.repair.guidance.rrr import pixel_mask
from modelfix.repair.methods import get_method, make_objective
from modelfix.training import TaskObjective, TrainConfig, task_loss
from modelfix.zoo import Classifier


def tiny_model(seed: int = 0) -> Classifier:
    """1×8×8 → conv 3 → Softplus → pool → conv 2 → Tanh → pool → linear 3: smooth activations keep second-order
    finite differences away from kinks; std ≠ 1 tests the network-input convention."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 3, 3, padding=1), act1=nn.Softplus(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(3, 2, 3, padding=1), act2=nn.Tanh(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=nn.Linear(8, 3)))
    return Classifier(net, InputSpec(1, 8, 8, (0.2,), (0.5,))).double().eval()


def tiny_batch(seed: int = 1) -> dict:
    """4 items: 0 and 3 masked, 1 has_mask False with a NONZERO mask (ignored), 2 an all-zero mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(4, 1, 8, 8, dtype=F64)
    mask[0, :, :2, :3] = 1
    mask[1, :, 4:, 4:] = 1
    mask[3, :, 5:8, 6:8] = 1
    return {"x": torch.rand(4, 1, 8, 8, generator=g, dtype=F64), "y": torch.tensor([0, 1, 2, 1]), "mask": mask,
            "has_mask": torch.tensor([True, False, True, True]), "group": torch.tensor([0, 1, 2, 1]),
            "index": torch.arange(4)}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def masked_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, N×H×W mask) of the items that have a mask (0 and 3)."""
    mask = pixel_mask(batch, F64)
    keep = mask.flatten(1).any(dim=1)
    return batch["x"][keep], batch["y"][keep], mask[keep]


# ---------------------------------------------------------------------------------------------------------------
# finite-difference checks of every penalty


@pytest.mark.parametrize("make", [lambda: R4Rand(eps=0.3, samples=3, generator=seeded()),
                                  lambda: SmoothRRR(eps=0.2, samples=3, generator=seeded())])
def test_sampled_penalties_match_finite_differences(make):
    model, batch = tiny_model(), tiny_batch()
    assert_fd_gradient(model, lambda m: make().penalty(m, batch))  # a fresh seeded objective: same δ every call


def test_adv_r4_penalty_matches_finite_differences_at_a_fixed_point_and_end_to_end():
    model, batch = tiny_model(), tiny_batch()
    x, y, mask = masked_rows(batch)
    adv = R4Adv(eps=0.3, steps=4)
    x_adv = adv.adversarial(model, x, y, mask)
    assert not torch.equal(x_adv, x)
    assert_fd_gradient(model, lambda m: masked_gradient_norms(m, x_adv, y, mask).sum())
    assert_fd_gradient(model, lambda m: adv.penalty(m, batch))
    assert value(adv.penalty(model, batch)) == pytest.approx(value(masked_gradient_norms(model, x_adv, y, mask).sum())
                                                             / 4, rel=1e-12)


def test_pgd_ex_penalty_matches_finite_differences_at_a_fixed_point_and_end_to_end():
    model, batch = tiny_model(), tiny_batch()
    x, y, mask = masked_rows(batch)
    pgd = PGDEx(eps=0.3, steps=5)
    x_adv = pgd.adversarial(model, x, y, mask)
    assert_fd_gradient(model, lambda m: pgd.penalty_at(m, x_adv, y, 4))
    assert_fd_gradient(model, lambda m: pgd.penalty(m, batch))


# ---------------------------------------------------------------------------------------------------------------
# the penalties' definitions


def test_masked_gradient_norms_closed_form_on_a_linear_net():
    """f(x) = W z + b, z = (x − μ)/σ: ∂CE/∂z = Wᵀ(p − e_y), so J = Σ (M ⊙ Wᵀ(p − e_y))² (gradient w.r.t. z, not x);
    the same value, and a gradient in x, when x requires grad (the PGD path)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4)).double()
    model = Classifier(net, InputSpec(2, 3, 3, (0.3, 0.1), (0.5, 2.0))).double()
    x = torch.rand(3, 2, 3, 3, dtype=F64)
    y = torch.tensor([0, 3, 1])
    mask = (torch.rand(3, 3, 3, dtype=F64) > 0.5).to(F64)
    p = F.softmax(model(x), dim=1)
    g = ((p - F.one_hot(y, 4).to(F64)) @ net[1].weight).view(3, 2, 3, 3)
    expected = (mask[:, None] * g).pow(2).flatten(1).sum(dim=1)
    assert torch.allclose(masked_gradient_norms(model, x, y, mask), expected, rtol=1e-12, atol=0)
    xg = x.clone().requires_grad_(True)
    norms = masked_gradient_norms(model, xg, y, mask)
    assert torch.allclose(norms, expected, rtol=1e-12, atol=0)
    (dx,) = torch.autograd.grad(norms.sum(), xg)
    assert float(dx.abs().max()) > 0 and xg.grad is None


def test_masked_uniform_is_two_sided_masked_and_seeded():
    x = torch.zeros(2, 1, 4, 4, dtype=F64)
    mask = torch.zeros(2, 1, 4, 4, dtype=F64)
    mask[:, :, :2] = 1
    deltas = masked_uniform(x, mask, 0.3, 500, seeded(5))
    assert deltas.shape == (500, 2, 1, 4, 4)
    assert torch.equal(deltas, masked_uniform(x, mask, 0.3, 500, seeded(5)))
    assert bool((deltas * (1 - mask) == 0).all()) and float(deltas.abs().max()) <= 0.3
    inside = deltas[:, :, :, :2]
    assert float(inside.min()) < -0.29 and float(inside.max()) > 0.29 and abs(float(inside.mean())) < 0.01


def test_rand_r4_and_smooth_rrr_closed_forms_on_a_linear_net():
    """f(x) = W z + b, z = (x − μ)/σ, so ∂CE/∂z at a copy x + δ_s is Wᵀ(p_s − e_y), p_s = softmax(W z_s + b).
    Rand-R4 = Σ_b max_s Σ (M ⊙ Wᵀ(p_s − e_y))² / N with δ masked; Smooth-RRR (R4 App. C: the norm of the MEAN
    gradient) = Σ_b Σ (M ⊙ Wᵀ(mean_s p_s − e_y))² / N with δ on every pixel. The draws are re-typed here:
    u = rand((n, *x.shape)) from the seeded generator, δ = (2u − 1)·ε·support."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4)).double()
    model = Classifier(net, InputSpec(2, 3, 3, (0.3, 0.1), (0.5, 2.0))).double().eval()
    x = torch.rand(3, 2, 3, 3, dtype=F64, generator=seeded(11))
    y = torch.tensor([0, 3, 1])
    mask = torch.zeros(3, 3, 3, dtype=F64)
    mask[0, :2, :2] = 1
    mask[1, 1:, :] = 1
    mask[2, 0, :] = 1
    batch = {"x": x, "y": y, "mask": mask[:, None], "has_mask": torch.ones(3, dtype=torch.bool), "group": y,
             "index": torch.arange(3)}
    W, b = net[1].weight.detach(), net[1].bias.detach()
    mu, sd = model.mean, model.std  # the spec's values as the model stores them (float32 0.3, 0.1 widened)
    onehot = F.one_hot(y, 4).to(F64)

    def probs(xs):  # softmax of the linear logits, N×4
        logits = ((xs - mu) / sd).flatten(1) @ W.T + b
        e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        return e / e.sum(dim=1, keepdim=True)

    def masked_sq(p):  # Σ over pixels of (M ⊙ Wᵀ(p − e_y))² per item
        g = ((p - onehot) @ W).view(3, 2, 3, 3)
        return (mask[:, None] * g).pow(2).flatten(1).sum(dim=1)

    u = torch.rand((3, 3, 2, 3, 3), generator=seeded(7), dtype=F64)
    rand_deltas = (2 * u - 1) * 0.3 * mask[:, None]
    expected_rand = float(torch.stack([masked_sq(probs(x + d)) for d in rand_deltas]).amax(dim=0).sum()) / 3
    u = torch.rand((3, 3, 2, 3, 3), generator=seeded(7), dtype=F64)
    smooth_deltas = (2 * u - 1) * 0.2
    mean_p = torch.stack([probs(x + d) for d in smooth_deltas]).mean(dim=0)
    expected_smooth = float(masked_sq(mean_p).sum()) / 3
    per_copy_mean = float(torch.stack([masked_sq(probs(x + d)) for d in smooth_deltas]).mean(dim=0).sum()) / 3
    assert expected_smooth < per_copy_mean * 0.999  # the two readings differ here (Jensen), so the test can tell
    assert value(R4Rand(eps=0.3, samples=3, generator=seeded(7)).penalty(model, batch)) == pytest.approx(
        expected_rand, rel=1e-10)
    assert value(SmoothRRR(eps=0.2, samples=3, generator=seeded(7)).penalty(model, batch)) == pytest.approx(
        expected_smooth, rel=1e-10)
    clean = float(masked_sq(probs(x)).sum()) / 3
    assert expected_rand != pytest.approx(clean, rel=1e-6)


def test_adversarial_points_are_at_least_as_bad_as_x():
    """Adv-R4's x* has J ≥ J(x) per item (strictly somewhere); PGD-Ex's x* has CE ≥ CE(x) (strictly somewhere)."""
    model, batch = tiny_model(), tiny_batch()
    x, y, mask = masked_rows(batch)
    adv = R4Adv(eps=0.3, steps=5).adversarial(model, x, y, mask)
    before, after = masked_gradient_norms(model, x, y, mask).detach(), masked_gradient_norms(model, adv, y, mask)
    assert bool((after >= before).all()) and bool((after > before * 1.01).any())
    adv = PGDEx(eps=0.3, steps=5).adversarial(model, x, y, mask)
    before, after = per_example_loss(model(x), y), per_example_loss(model(adv), y)
    assert bool((after >= before).all()) and bool((after > before + 1e-3).any())


def test_per_example_loss_means_to_the_task_loss():
    logits, y = torch.randn(5, 3, dtype=F64), torch.tensor([0, 2, 1, 1, 0])
    for loss in ("ce", "bce"):
        assert float(per_example_loss(logits, y, loss).mean()) == pytest.approx(float(task_loss(loss)(logits, y)),
                                                                                 rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# pgd_in_box


def test_pgd_in_box_stays_in_the_box_and_never_loses_to_its_start():
    model, batch = tiny_model(), tiny_batch()
    x, y, mask = batch["x"], batch["y"], batch["mask"]  # N×1×H×W
    objective = lambda point: per_example_loss(model(point), y)  # noqa: E731
    for random_start in (False, True):
        out = pgd_in_box(objective, x, mask, 0.25, 6, step_size=0.1, generator=seeded(3), random_start=random_start)
        assert bool(((out - x).abs() <= 0.25 * mask + 1e-15).all())
        assert torch.equal(out[mask.expand_as(x) == 0], x[mask.expand_as(x) == 0])  # unmasked pixels exactly x
        assert not out.requires_grad
        if not random_start:
            assert bool((objective(out) >= objective(x)).all())
    assert all(p.grad is None for p in model.parameters())


def test_pgd_in_box_reaches_the_corner_of_a_linear_objective():
    """J_b(x') = Σ w ⊙ x': sign ascent ends at x + ε·M·sign(w), J rises by ε Σ M|w| (strictly)."""
    g = seeded(4)
    x = torch.rand(2, 1, 3, 3, generator=g, dtype=F64)
    w = torch.randn(1, 1, 3, 3, generator=g, dtype=F64)
    mask = torch.zeros(2, 1, 3, 3, dtype=F64)
    mask[0, :, :2] = 1
    mask[1, :, :, 1:] = 1
    out = pgd_in_box(lambda p: (w * p).flatten(1).sum(1), x, mask, 0.2, steps=4)  # step ε/4: four steps to the corner
    assert torch.allclose(out, x + 0.2 * mask * w.sign(), rtol=0, atol=1e-15)
    gain = (w * (out - x)).flatten(1).sum(1)
    assert torch.allclose(gain, 0.2 * (mask * w.abs()).flatten(1).sum(1), rtol=1e-12) and bool((gain > 0).all())


def test_pgd_in_box_keeps_the_start_when_every_step_overshoots():
    """J = −‖x' − (x + 0.1·M)‖²: steps of 0.75 jump past the maximum and back; the start (J = −0.01·|M|) is better
    than every later iterate, and it is returned instead of the last one."""
    x = torch.zeros(1, 1, 2, 2, dtype=F64)
    mask = torch.tensor([[[[1.0, 0], [1, 1]]]], dtype=F64)
    objective = lambda p: -(p - (x + 0.1 * mask)).pow(2).flatten(1).sum(1)  # noqa: E731
    out = pgd_in_box(objective, x, mask, 1.0, steps=3, step_size=0.75)
    assert torch.equal(out, x)


# ---------------------------------------------------------------------------------------------------------------
# masks, weights, errors, registry

OBJECTIVES = [lambda: R4Rand(lam=2.0, eps=0.3, samples=2, generator=seeded()),
              lambda: SmoothRRR(lam=2.0, eps=0.2, samples=2, generator=seeded()),
              lambda: R4Adv(lam=2.0, eps=0.3, steps=2), lambda: PGDEx(lam=2.0, eps=0.3, steps=2)]


@pytest.mark.parametrize("make", OBJECTIVES)
def test_items_without_a_mask_add_exactly_zero(make):
    """Clearing item 1's ignored mask changes nothing; a batch where only item 0 has a mask gives item 0's own
    penalty divided by N = 4; loss = task + λ·penalty."""
    model, batch = tiny_model(), tiny_batch()
    penalty = lambda b: value(make().terms(model, b)[1])  # noqa: E731
    cleared = {**batch, "mask": batch["mask"] * torch.tensor([1.0, 0, 1, 1], dtype=F64).view(-1, 1, 1, 1)}
    only0 = {**batch, "mask": batch["mask"] * torch.tensor([1.0, 0, 0, 0], dtype=F64).view(-1, 1, 1, 1)}
    single = {k: v[:1] for k, v in batch.items()}
    assert penalty(batch) == penalty(cleared) > 0
    assert penalty(only0) == pytest.approx(penalty(single) / 4, rel=1e-12)
    loss, parts = make()(model, batch)
    assert value(loss) == pytest.approx(parts["task"] + 2.0 * parts["penalty"], rel=1e-12)


@pytest.mark.parametrize("make", OBJECTIVES)
def test_empty_masks_train_exactly_like_erm(make):
    model, batch = tiny_model().train(), tiny_batch()
    empty = {**batch, "has_mask": torch.tensor([False, False, True, False]),
             "mask": batch["mask"] * torch.tensor([1.0, 1, 0, 1], dtype=F64).view(-1, 1, 1, 1)}
    loss, parts = make()(model, empty)
    reference, _ = TaskObjective()(model, empty)
    assert parts["penalty"] == 0.0 and value(loss) == value(reference)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference, params)):
        assert torch.equal(a, b)


def test_gradients_are_taken_in_eval_mode_and_flags_restored():
    """With dropout in training mode the seeded penalties are still deterministic (eval-mode gradients and PGD), and
    every module's flag is as before."""
    model = tiny_model()
    model.net.fc = nn.Sequential(nn.Dropout(0.5), model.net.fc)
    model.train()
    batch = tiny_batch()
    for make in OBJECTIVES[:3]:
        assert value(make().penalty(model, batch)) == value(make().penalty(model, batch))
    x, y, mask = masked_rows(batch)
    pgd = PGDEx(eps=0.3, steps=3)
    assert torch.equal(pgd.adversarial(model, x, y, mask), pgd.adversarial(model, x, y, mask))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), "x"])
def test_non_positive_eps_is_refused(bad):
    for make in (R4Rand, SmoothRRR, R4Adv, PGDEx):
        with pytest.raises(ModelfixError, match="--eps must be > 0"):
            make(eps=bad)
    with pytest.raises(ModelfixError, match="--eps must be > 0"):
        pgd_in_box(lambda p: p.flatten(1).sum(1), torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), bad, 1)


def test_bad_counts_weights_and_steps_are_refused():
    for kwargs, match in (({"samples": 0}, "--samples"), ({"samples": 1.5}, "--samples"), ({"lam": -1}, "lam")):
        for make in (R4Rand, SmoothRRR):
            with pytest.raises(ModelfixError, match=match):
                make(**kwargs)
    assert R4Rand(samples=10.0).samples == 10 and isinstance(R4Rand(samples=10.0).samples, int)  # from a JSON card
    for make in (R4Adv, PGDEx):
        with pytest.raises(ModelfixError, match="--steps"):
            make(steps=0)
        with pytest.raises(ModelfixError, match="--step-size"):
            make(step_size=-0.1)
        with pytest.raises(ModelfixError, match="lam"):
            make(lam=float("nan"))


def test_step_size_defaults():
    assert R4Adv(eps=0.4).step_size == pytest.approx(0.1)  # ε/4 (§7 item 8)
    assert PGDEx(eps=0.7, steps=7).step_size == pytest.approx(0.1)  # ε/T (Heo)
    assert R4Adv(eps=0.4, step_size=0.05).step_size == 0.05


@pytest.mark.parametrize("name, cls, defaults", [
    ("r4-rand", R4Rand, {"lam": 15.0, "eps": 0.5, "samples": 10}),
    ("r4-adv", R4Adv, {"lam": 14.0, "eps": 0.5, "steps": 10, "step_size": None}),
    ("smooth-rrr", SmoothRRR, {"lam": 10.0, "eps": 0.1, "samples": 7}),
    ("pgd-ex", PGDEx, {"lam": 1.0, "eps": 0.5, "steps": 7, "step_size": None}),
])
def test_registry_entries_build_via_make_objective(name, cls, defaults):
    method = get_method(name)
    assert method.kind == "finetune" and method.needs_masks and method.weight == "lam"
    assert method.hyperparameters == defaults
    TrainConfig(**method.train_defaults)
    model = tiny_model().float().train()
    objective = make_objective(name, model, loss="bce", lam=0.5, eps=0.2)
    assert isinstance(objective, cls) and objective.lam == 0.5 and objective.eps == 0.2 and objective.loss == "bce"
    assert objective.describe()["name"] == name and objective.describe()["paper"]
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in tiny_batch().items()}
    loss, parts = objective(model, batch)
    assert torch.isfinite(loss) and parts["penalty"] > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
