"""Guided fine-tune objectives (modelfix.repair.guidance): TAP, RRR, RBR, ERM+L2.

Every penalty's parameter gradient is checked against central finite differences in float64 (the R4 baselines'
failure, methods_guided_finetunes.md §7 item 4), the TAP mask downscaling against the worked example of §1.2, RRR
against closed forms on a linear net, RBR's influence term against finite differences of Σ_p ∂CE/∂θ_p.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from gradcheck import F64, assert_fd_gradient, value

from modelfix.card import InputSpec, ModelCard
from modelfix.errors import ModelfixError
from modelfix.repair.guidance import (RBR, RRR, TAP, L2Objective, default_tap_layers, downscale_masks, eval_mode,
                                      influence_input_gradient, input_gradient, l2_penalty, network_input,
                                      tap_penalty)
from modelfix.repair.guidance.rrr import mode_invariant
from modelfix.training import TaskObjective
from modelfix.zoo import Classifier, build_model, build_net, default_input_spec

def tiny_model(seed: int = 0) -> Classifier:
    """1×8×8 → conv 3 → Softplus → pool (4×4) → conv 2 → Tanh → pool (2×2) → linear 3; smooth activations so finite
    differences of second- and third-order terms stay away from kinks. std ≠ 1 tests the network-input convention."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 3, 3, padding=1), act1=nn.Softplus(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(3, 2, 3, padding=1), act2=nn.Tanh(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=nn.Linear(8, 3)))
    return Classifier(net, InputSpec(1, 8, 8, (0.2,), (0.5,)))


def tiny_batch(dtype=torch.float32, seed: int = 1) -> dict:
    """4 items: 0 and 3 masked (different patches), 1 has_mask False with a NONZERO mask (must be ignored), 2 has an
    all-zero mask."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(4, 1, 8, 8)
    mask[0, :, :2, :3] = 1
    mask[1, :, 4:, 4:] = 1
    mask[3, :, 5:8, 6:8] = 1
    return {"x": torch.rand(4, 1, 8, 8, generator=g).to(dtype), "y": torch.tensor([0, 1, 2, 1]),
            "mask": mask.to(dtype), "has_mask": torch.tensor([True, False, True, True]),
            "group": torch.tensor([0, 1, 2, 1]), "index": torch.arange(4)}


# ---------------------------------------------------------------------------------------------------------------
# finite-difference checks of every penalty


@pytest.mark.parametrize("norm", ["squared", "l1"])
def test_tap_penalty_gradient_matches_finite_differences(norm):
    model, batch = tiny_model().double().eval(), tiny_batch(F64)
    tap = TAP(layers=["pool1", "pool2"], norm=norm)
    assert_fd_gradient(model, lambda m: tap.terms(m, batch)[1])


@pytest.mark.parametrize("target", ["log-prob-sum", "loss", "logit-sum"])
def test_rrr_penalty_gradient_matches_finite_differences(target):
    model, batch = tiny_model().double().eval(), tiny_batch(F64)
    rrr = RRR(target=target)
    assert_fd_gradient(model, lambda m: rrr.penalty(m, batch))


@pytest.mark.parametrize("target", ["log-prob-sum", "loss", "logit-sum"])
def test_rrr_shared_forward_pass_gradient_matches_finite_differences(target):
    model, batch = tiny_model().double().eval(), tiny_batch(F64)
    rrr = RRR(target=target)
    assert mode_invariant(model)
    assert_fd_gradient(model, lambda m: rrr.terms(m, batch)[1])


def _grads(model, scalar):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, list(model.parameters()))])


@pytest.mark.parametrize("target", ["log-prob-sum", "loss", "logit-sum"])
def test_rrr_shared_forward_pass_is_exactly_the_two_pass_penalty(target):
    """On a mode-invariant model the training pass serves the input gradient: same values, same gradients."""
    model, batch = tiny_model().double().train(), tiny_batch(F64)
    rrr = RRR(lam=0.7, target=target)
    task, shared = rrr.terms(model, batch)
    two_pass = rrr.penalty(model, batch)
    assert value(shared) == pytest.approx(value(two_pass), rel=1e-12)
    assert torch.allclose(_grads(model, task + 0.7 * shared), _grads(model, rrr.loss_fn(model(batch["x"]), batch["y"]) + 0.7 * two_pass), rtol=1e-10, atol=1e-14)


def test_rbr_shared_forward_pass_is_exactly_the_two_pass_penalty(monkeypatch):
    import modelfix.repair.guidance.rbr as rbr_module

    model, batch = tiny_model().double().train(), tiny_batch(F64)
    rbr = RBR(lam=3.0)
    task, shared = rbr.terms(model, batch)
    monkeypatch.setattr(rbr_module, "mode_invariant", lambda m: False)
    task2, two_pass = rbr.terms(model, batch)
    assert value(shared) > 0 and value(shared) == pytest.approx(value(two_pass), rel=1e-12)
    assert torch.allclose(_grads(model, task + shared), _grads(model, task2 + two_pass), rtol=1e-10, atol=1e-14)


def test_mode_invariant_only_for_modules_whose_forward_ignores_the_mode():
    assert mode_invariant(tiny_model())
    for extra in (nn.BatchNorm2d(2), nn.Dropout(0.1), nn.InstanceNorm2d(2, track_running_stats=True)):
        assert not mode_invariant(nn.Sequential(nn.Conv2d(1, 2, 3), extra))

    class Custom(nn.Module):  # not from torch.nn or modelfix: its forward might read self.training
        def forward(self, x):
            return x

    assert not mode_invariant(nn.Sequential(nn.Conv2d(1, 2, 3), Custom()))


def test_rbr_penalty_gradient_matches_finite_differences():
    model, batch = tiny_model().double().eval(), tiny_batch(F64)
    rbr = RBR()
    assert_fd_gradient(model, lambda m: rbr.terms(m, batch)[1])


def test_l2_penalty_gradient_is_theta_and_matches_finite_differences():
    model = tiny_model().double()
    params = list(model.parameters())
    grads = torch.autograd.grad(l2_penalty(model), params)
    for p, g in zip(params, grads):
        assert torch.equal(g, p.detach())
    squares = float(parameters_to_vector(params).detach().pow(2).sum())
    assert float(l2_penalty(model).detach()) == pytest.approx(0.5 * squares, rel=1e-12)
    assert_fd_gradient(model, l2_penalty)


def test_l2_penalty_skips_frozen_parameters():
    model = tiny_model().double()
    model.net.fc.weight.requires_grad_(False)
    expected = 0.5 * sum(float(p.detach().pow(2).sum()) for p in model.parameters() if p.requires_grad)
    assert float(l2_penalty(model).detach()) == pytest.approx(expected, rel=1e-12)


def test_rbr_influence_term_matches_finite_differences_of_the_parameter_gradient_sum():
    """IF = ∂/∂z Σ_p ∂CE/∂θ_p. TAP's reference (z marked after the forward pass) keeps only the first-layer weight
    path and fails this check; the full term passes it."""
    model = tiny_model().double().eval()
    batch = tiny_batch(F64)
    net, params, y = model.net, list(model.parameters()), batch["y"]
    _, z = network_input(model, batch["x"])
    influence = influence_input_gradient(F.cross_entropy(net(z), y), z, params)

    def scalar(zz: torch.Tensor) -> float:
        return float(sum(g.sum() for g in torch.autograd.grad(F.cross_entropy(net(zz), y), params)))

    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    h = 1e-5
    fd = (scalar(z.detach() + h * v) - scalar(z.detach() - h * v)) / (2 * h)
    full = float((influence.detach() * v).sum())
    assert abs(full - fd) <= 1e-5 * abs(fd)

    late = z.detach().clone()  # TAP's order: forward first, requires_grad afterwards
    ce = F.cross_entropy(net(late), y)
    late.requires_grad_(True)
    total = sum(g.sum() for g in torch.autograd.grad(ce, params, create_graph=True))
    partial = float((torch.autograd.grad(total, late)[0].detach() * v).sum())
    assert abs(partial - fd) > 0.1 * abs(fd)


def test_rbr_penalty_uses_the_full_influence_term():
    """L_RBR = Σ (M·g·IF)² with IF at the masked pixels from finite differences of Σ_p ∂CE/∂θ_p (so the objective
    marks z before its forward pass, unlike TAP's reference)."""
    model, batch = tiny_model().double().eval(), tiny_batch(F64)
    net, params, y = model.net, list(model.parameters()), batch["y"]
    z0 = ((batch["x"] - model.mean) / model.std).detach()

    def scalar(zz: torch.Tensor) -> float:
        return float(sum(g.sum() for g in torch.autograd.grad(F.cross_entropy(net(zz), y), params)))

    mask = batch["mask"][:, 0] * batch["has_mask"].to(F64).view(-1, 1, 1)
    g = input_gradient(model, batch["x"], target="log-prob-sum").sum(1).detach()
    expected, h = 0.0, 1e-5
    for b, i, j in mask.nonzero().tolist():
        e = torch.zeros_like(z0)
        e[b, 0, i, j] = h
        influence = (scalar(z0 + e) - scalar(z0 - e)) / (2 * h)
        expected += float(mask[b, i, j] * g[b, i, j] * influence) ** 2
    assert value(RBR().terms(model, batch)[1]) == pytest.approx(expected, rel=1e-6)


def test_input_gradients_are_taken_with_respect_to_the_network_input():
    """∂/∂z = std·∂/∂x per channel."""
    model, batch = tiny_model().double().eval(), tiny_batch(F64)
    x = batch["x"].clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(F.log_softmax(model(x), 1).sum(), x)
    gz = input_gradient(model, batch["x"], target="log-prob-sum")
    torch.testing.assert_close(gz, gx * 0.5, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# RRR closed forms on a linear net


def linear_model(k: int = 3) -> Classifier:
    """2×4×4 input, logits = W·flatten(z) + b with per-channel mean/std ≠ (0, 1)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(32, k))
    return Classifier(net, InputSpec(2, 4, 4, (0.1, 0.3), (0.5, 2.0))).double().eval()


@pytest.mark.parametrize("target", ["log-prob-sum", "loss", "logit-sum"])
def test_rrr_penalty_equals_closed_form_on_a_linear_net(target):
    model = linear_model()
    W, b = model.net[1].weight.detach(), model.net[1].bias.detach()
    x = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.tensor([2, 0, 1])
    mask = torch.zeros(3, 1, 4, 4, dtype=F64)
    mask[0, 0, 0, :3] = 1  # 3 pixels
    mask[2, 0, 1:3, 1:3] = 1  # 4 pixels; item 1 has none
    batch = {"x": x, "y": y, "mask": mask, "has_mask": torch.tensor([True, True, True])}

    z = (x - model.mean) / model.std
    p = torch.softmax(z.reshape(3, -1) @ W.T + b, 1)
    if target == "logit-sum":
        grad = W.sum(0).expand(3, -1)
    elif target == "log-prob-sum":
        grad = W.sum(0) - 3 * p @ W  # Σ_k (W_k − Σ_j p_j W_j)
    else:
        grad = p @ W - W[y]  # ∂(−log p_y)/∂z
    g = grad.reshape(3, 2, 4, 4).sum(1)  # channel sum
    m = mask[:, 0]
    count = m.sum((1, 2))
    expected = sum(float((16 / count[i]) ** 2 * (m[i] * g[i]).pow(2).sum()) for i in (0, 2)) / 3
    assert value(RRR(target=target).penalty(model, batch)) == pytest.approx(expected, rel=1e-12)


def test_rrr_penalty_is_invariant_to_the_mask_scale_and_label_free_targets_ignore_y():
    """M̃ = M·D/|M| makes a soft mask c·M penalise exactly like M; log-prob-sum and logit-sum do not look at y."""
    model, batch = tiny_model().double().eval(), tiny_batch(F64)
    for target in ("log-prob-sum", "logit-sum", "loss"):
        rrr = RRR(target=target)
        base = value(rrr.penalty(model, batch))
        scaled = value(rrr.penalty(model, {**batch, "mask": 0.25 * batch["mask"]}))
        assert scaled == pytest.approx(base, rel=1e-12)
        relabelled = value(rrr.penalty(model, {**batch, "y": (batch["y"] + 1) % 3}))
        if target == "loss":
            assert abs(relabelled - base) > 1e-6 * base
        else:
            assert relabelled == pytest.approx(base, rel=1e-12)


def test_input_gradient_runs_in_eval_mode_and_restores_each_flag():
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3), bn=nn.BatchNorm2d(2), bn2=nn.BatchNorm2d(2),
                                    act=nn.Softplus(), flatten=nn.Flatten(), fc=nn.Linear(72, 3)))
    model = Classifier(net, InputSpec(1, 8, 8, (0.0,), (1.0,))).double()
    with torch.no_grad():
        net.bn.running_mean.fill_(0.3)
        net.bn.running_var.fill_(2.0)
    model.train()
    net.bn2.eval()  # a BatchNorm frozen by TrainConfig.freeze_bn
    x = tiny_batch(F64)["x"]
    grad = input_gradient(model, x)
    assert model.training and net.bn.training and net.conv.training and not net.bn2.training

    eval_copy = Classifier(net, model.input_spec).double().eval()
    z = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.log_softmax(eval_copy.net(z), 1).sum(), z)
    model.train()
    net.bn2.eval()
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
    z = x.clone().requires_grad_(True)
    (train_grad,) = torch.autograd.grad(F.log_softmax(net(z), 1).sum(), z)  # batch statistics: different
    assert not torch.allclose(grad, train_grad, rtol=1e-3)

    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert net.bn.training and not net.bn2.training


# ---------------------------------------------------------------------------------------------------------------
# items without a mask, and all-empty batches


def test_items_without_a_mask_add_exactly_zero():
    """Dropping the mask of item 1 (has_mask False) or item 2 (all zero) changes nothing; a batch where only item
    0 has a mask gives item 0's own penalty divided by N (batch mean) for TAP and RRR."""
    model, batch = tiny_model().double().eval(), tiny_batch(F64)
    only0 = {**batch, "mask": batch["mask"] * torch.tensor([1.0, 0, 0, 0], dtype=F64).view(-1, 1, 1, 1)}
    single = {k: v[:1] for k, v in batch.items()}
    for objective in (TAP(layers="pool1,pool2"), TAP(layers="pool1,pool2", norm="l1"), RRR(), RRR(target="loss"),
                      RRR(target="logit-sum")):
        penalty = lambda b: value(objective.terms(model, b)[1])  # noqa: E731
        cleared = {**batch, "mask": batch["mask"] * torch.tensor([1.0, 0, 1, 1], dtype=F64).view(-1, 1, 1, 1)}
        assert penalty(batch) == penalty(cleared)
        assert penalty(only0) == pytest.approx(penalty(single) / 4, rel=1e-12)
    rbr = RBR()
    cleared = {**batch, "mask": batch["mask"] * torch.tensor([1.0, 0, 1, 1], dtype=F64).view(-1, 1, 1, 1)}
    assert value(rbr.terms(model, batch)[1]) == value(rbr.terms(model, cleared)[1]) > 0


@pytest.mark.parametrize("make", [lambda: TAP(layers=["pool1", "pool2"]), lambda: TAP(layers=["pool1"], norm="l1"),
                                  lambda: RRR(), lambda: RRR(target="loss"), lambda: RRR(target="logit-sum"),
                                  lambda: RBR()])
def test_empty_masks_change_nothing(make):
    """With no mask anywhere the penalty is exactly 0, the loss equals the task loss and so do the gradients."""
    model, batch = tiny_model().double().train(), tiny_batch(F64)
    empty = {**batch, "has_mask": torch.tensor([False, False, True, False]),
             "mask": batch["mask"] * torch.tensor([1.0, 1, 0, 1], dtype=F64).view(-1, 1, 1, 1)}
    objective = make()
    loss, parts = objective(model, empty)
    assert parts["penalty"] == 0.0 and torch.isfinite(loss)
    reference, _ = TaskObjective()(model, empty)
    assert value(loss) == value(reference)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference, params)):
        assert torch.equal(a, b)


def test_objectives_report_task_and_penalty_and_weight_the_penalty():
    model, batch = tiny_model().double().eval(), tiny_batch(F64)
    for objective, weight in ((TAP(lam=0.5, layers="pool2"), 0.5), (RRR(lam=2.0), 2.0), (RBR(lam=3.0), 3.0),
                              (L2Objective(l2=0.1), 0.1)):
        loss, parts = objective(model, batch)
        assert set(parts) >= {"task", "penalty"} and parts["penalty"] > 0
        assert value(loss) == pytest.approx(parts["task"] + weight * parts["penalty"], rel=1e-12)
        assert objective.describe()["name"] == objective.name and objective.describe()["paper"]


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ModelfixError, match="norm"):
        TAP(norm="l2")
    with pytest.raises(ModelfixError, match="target"):
        RRR(target="logits")
    with pytest.raises(ModelfixError, match="lam"):
        RBR(lam=-1)
    with pytest.raises(ModelfixError, match="l2"):
        L2Objective(l2=float("nan"))


# ---------------------------------------------------------------------------------------------------------------
# TAP: mask downscaling, penalty closed form, layers


def test_downscale_masks_reproduces_the_worked_example_on_tap_cnn():
    """28 → 14 → 6 with a top-left 4×4 patch (methods_guided_finetunes.md §1.2)."""
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :4, :4] = 1
    first, second = downscale_masks(mask, [14, 6])
    assert first.shape == (1, 1, 14, 14) and second.shape == (1, 1, 6, 6)
    row = torch.tensor([1.0, 1.0, 0.5] + [0.0] * 11)
    assert torch.equal(first[0, 0], row[:, None] * row[None, :])  # rows/cols 0–1 = 1, 2 = .5, corner .25
    assert float(first.sum()) == 6.25
    expected = torch.zeros(6, 6)
    expected[:2, :2] = torch.tensor([[1.0, 0.75], [0.75, 0.5625]])
    assert torch.equal(second[0, 0], expected)
    assert float(second.sum()) == 3.0625

    model = build_model(ModelCard(arch="tap-cnn", num_classes=10, input=default_input_spec("tap-cnn")))
    _, maps = TAP().activations(model.eval(), torch.zeros(1, 1, 28, 28))
    assert [tuple(a.shape[-2:]) for a in maps] == [(14, 14), (6, 6)]


def test_downscale_masks_non_square_falls_back_to_nearest_resize():
    mask = torch.zeros(1, 1, 8, 6)
    mask[..., :2, :2] = 1
    (exact,) = downscale_masks(mask, [(4, 3)])  # k = 2 gives 4×3 directly
    assert exact.shape == (1, 1, 4, 3) and float(exact[0, 0, 0, 0]) == 1.0 and float(exact[0, 0, 1, 1]) == 0.25
    (fallback,) = downscale_masks(mask, [(4, 2)])
    assert fallback.shape == (1, 1, 4, 2)


def test_downscale_masks_takes_k_from_the_width_as_taps_code():
    """8×16 mask, ones in rows 0–3, cols 0–3; target (2, 8). Width: k = 16 // 8 = 2; the 3×3 dilation makes rows and
    cols 0–4 ones; 2×2 averages give a 4×8 map with row factors (1, 1, .5, 0) and col factors (1, 1, .5, 0, …); r = 8 /
    (16/2) = 1; 4×8 ≠ 2×8, so a nearest resize keeps rows 0 and 2. (From the height, k = 4 would give rows (1, .25)
    and cols (1, 1, .25, .25, 0, …) instead.)"""
    mask = torch.zeros(1, 1, 8, 16)
    mask[..., :4, :4] = 1
    (out,) = downscale_masks(mask, [(2, 8)])
    expected = torch.tensor([[1, 1, .5, 0, 0, 0, 0, 0], [.5, .5, .25, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-7)


def test_tap_penalty_closed_form_with_layer_and_batch_means():
    """8×8 mask with a top-left 2×2 patch; maps 4×4 (3 channels of 1) and 2×2 (1 channel of 2).
    Masks: [[1,.5],[.5,.25]] then [[1,.25],[.25,.0625]] (progressive)."""
    mask = torch.zeros(2, 1, 8, 8, dtype=F64)
    mask[0, :, :2, :2] = 1  # item 1: no mask, still counts in the batch mean
    maps = [torch.ones(2, 3, 4, 4, dtype=F64), torch.full((2, 1, 2, 2), 2.0, dtype=F64)]
    squared = (9 * (1 + 0.25 + 0.25 + 0.0625) + 4 * (1 + 0.0625 + 0.0625 + 0.00390625)) / 2 / 2
    l1 = (3 * (1 + 0.5 + 0.5 + 0.25) + 2 * (1 + 0.25 + 0.25 + 0.0625)) / 2 / 2
    assert value(tap_penalty(maps, mask, "squared")) == squared
    assert value(tap_penalty(maps, mask, "l1")) == l1
    maps[1] = -maps[1]  # a pre-ReLU map (DenseNet's norm5): L1 takes |·|
    assert value(tap_penalty(maps, mask, "l1")) == l1


def test_default_tap_layers_per_family():
    def net(arch, size=32):
        spec = dataclasses.replace(default_input_spec(arch), height=size, width=size)
        with torch.device("meta"):  # names and types only: no weight initialisation (VGG's is slow)
            return build_net(arch, 10, spec.channels, (spec.height, spec.width))

    assert default_tap_layers(build_net("tap-cnn", 10, 1, (28, 28))) == ["pool1", "pool2"]
    assert default_tap_layers(net("egem-cnn", 28)) == ["pool1", "pool2"]
    assert default_tap_layers(net("derma-cnn", 64)) == ["relu1", "relu2", "relu3", "relu4"]  # no pools: activations
    with pytest.raises(ModelfixError, match="layers"):
        default_tap_layers(net("mlp", 28))
    assert default_tap_layers(net("resnet18")) == ["layer1", "layer2", "layer3", "layer4"]
    vgg = net("vgg11")
    names = default_tap_layers(vgg)
    assert names == ["features.2", "features.5", "features.10", "features.15", "features.20"]
    assert all(isinstance(vgg.get_submodule(n), nn.MaxPool2d) for n in names)
    assert default_tap_layers(net("vgg11_bn"))[0] == "features.3"  # BN shifts the indices
    dense = net("densenet121")
    names = default_tap_layers(dense)
    assert names == ["features.transition1", "features.transition2", "features.transition3", "features.norm5"]
    modules = dict(dense.named_modules())
    assert all(n in modules for n in names)


def test_tap_on_resnet18_hooks_the_four_stages():
    spec = dataclasses.replace(default_input_spec("resnet18"), height=32, width=32)
    model = build_model(ModelCard(arch="resnet18", num_classes=4, input=spec))
    tap = TAP(model=model)
    x = torch.rand(2, 3, 32, 32)
    _, maps = tap.activations(model.eval(), x)
    assert [a.shape[-1] for a in maps] == [8, 4, 2, 1]
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, :8, :8] = 1
    batch = {"x": x, "y": torch.tensor([0, 1]), "mask": mask, "has_mask": torch.tensor([True, True])}
    loss, parts = tap(model.train(), batch)
    assert torch.isfinite(loss) and parts["penalty"] > 0


class _InplaceAfterHook(nn.Module):
    """conv → bn, then an in-place ReLU on the bn output inside forward (as DenseNet does after norm5)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(128, 3)

    def forward(self, z):
        out = self.bn(self.conv(z))
        F.relu(out, inplace=True)
        return self.fc(out.flatten(1))


def test_tap_penalises_the_hooked_output_before_later_inplace_ops():
    torch.manual_seed(0)
    model = Classifier(_InplaceAfterHook(), InputSpec(1, 8, 8, (0.0,), (1.0,))).double().eval()
    batch = tiny_batch(F64)
    pre_relu = model.net.bn(model.net.conv(batch["x"])).detach()
    assert float(pre_relu.min()) < 0
    mask = batch["mask"] * batch["has_mask"].to(F64).view(-1, 1, 1, 1)
    expected = value(tap_penalty([pre_relu], mask, "l1"))
    assert value(TAP(layers="bn", norm="l1").terms(model, batch)[1]) == pytest.approx(expected, rel=1e-12)


def test_tap_layer_errors_and_no_leaked_hooks():
    model = tiny_model()
    batch = tiny_batch()
    with pytest.raises(ModelfixError, match="'pool3'.*pool1"):
        TAP(layers=["pool3"], model=model)
    with pytest.raises(ModelfixError, match="'pool3'"):
        TAP(layers=["pool3"])(model, batch)
    with pytest.raises(ModelfixError, match=r"layer 'fc' is not spatial \(output 4×3\); TAP needs conv feature maps"):
        TAP(layers=["pool1", "fc"])(model, batch)
    shared = nn.Softplus()
    twice = Classifier(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), shared, nn.Conv2d(2, 2, 3, padding=1), shared,
                                     nn.Flatten(), nn.Linear(128, 3)), InputSpec(1, 8, 8, (0.0,), (1.0,)))
    with pytest.raises(ModelfixError, match="ran 2 times"):
        TAP(layers=["1"])(twice, batch)
    for m in list(model.modules()) + list(twice.modules()):
        assert not m._forward_hooks


def test_rbr_refuses_train_mode_batchnorm_in_one_line():
    from modelfix.card import InputSpec
    from modelfix.errors import UnsupportedModel
    from modelfix.repair.guidance import RBR
    from modelfix.zoo import Classifier

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(32, 2))
    model = Classifier(net, InputSpec(1, 4, 4, (0.0,), (1.0,))).train()
    mask = torch.zeros(3, 1, 4, 4)
    mask[:, :, 0, 0] = 1
    batch = {"x": torch.rand(3, 1, 4, 4), "y": torch.tensor([0, 1, 0]), "mask": mask,
             "has_mask": torch.ones(3, dtype=torch.bool)}
    with pytest.raises(UnsupportedModel, match="BatchNorm"):
        RBR()(model, batch)
    net[1].eval()  # frozen batch norm works
    loss, _ = RBR()(model, batch)
    assert torch.isfinite(loss)
