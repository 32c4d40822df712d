"""Interval bounds (modelfix.repair.intervals): soundness by sampling, exactness at ε = 0, a hand-computed box,
nesting in ε, differentiability in θ, and clear refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gradcheck import F64, assert_fd_gradient
from torch import nn

from modelfix.card import InputSpec
from modelfix.errors import UnsupportedModel
from modelfix.repair.intervals import (
    Residual,
    ce_gradient_bounds,
    input_gradient_bounds,
    interval_forward,
    masked_box,
)
from modelfix.zoo import Classifier

SLACK = 1e-9
C, H, W, K = 2, 8, 8, 5


def _randomise_bn(net: nn.Module, gen: torch.Generator) -> None:
    """Random running statistics and affine parameters, some γ negative."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=F64) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=gen, dtype=F64) + 0.5)
                m.weight.copy_(torch.randn(n, generator=gen, dtype=F64))
                m.weight[0] = -abs(float(m.weight[0])) - 0.2
                m.bias.copy_(torch.randn(n, generator=gen, dtype=F64) * 0.3)


def make_net(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        net = nn.Sequential(
            nn.Flatten(), nn.Linear(C * H * W, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(12, K),
        )
    elif kind == "conv":  # 8x8 -> 8x8 -> pool 4x4 -> stride-2 conv 2x2 (output_padding 1) -> overlapping pool
        net = nn.Sequential(
            nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=1, padding=1),
            nn.Sequential(nn.AvgPool2d(1), nn.Identity()), nn.Flatten(), nn.Linear(24, 8), nn.BatchNorm1d(8),
            nn.ReLU(), nn.Linear(8, K),
        )
    elif kind == "pre-pool":  # max-pool straight after a conv (no ReLU zeros feeding it), adaptive avg pool
        net = nn.Sequential(
            nn.Conv2d(C, 3, 3), nn.MaxPool2d(3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(12, K),
        )
    elif kind == "residual":
        net = nn.Sequential(
            nn.Conv2d(C, 4, 3, padding=1), nn.ReLU(),
            Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding="same"))),
            nn.ReLU(),
            Residual(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()), shortcut=nn.Conv2d(4, 6, 1, 2)),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, K),
        )
    else:
        raise AssertionError(kind)
    net = net.to(F64)
    _randomise_bn(net, torch.Generator().manual_seed(seed + 7))
    spec = InputSpec(C, H, W, (0.2, 0.5), (0.5, 0.25))
    return Classifier(net, spec).to(F64).eval()


def make_batch(seed: int, n: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, C, H, W, generator=gen, dtype=F64)
    y = torch.randint(0, K, (n,), generator=gen)
    mask = (torch.rand(n, 1, H, W, generator=gen, dtype=F64) < 0.4).to(F64)
    return x, y, mask


def true_logits_and_gradients(model, x, y):
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return logits.detach(), grad


def box_samples(x, mask, eps, per_image: int, gen):
    """(S·N) points in the box x ± eps·M: the two extreme corners, random vertices, then uniform interior points."""
    n = x.shape[0]
    m = mask.expand_as(x)
    signs = [torch.full_like(x, -1.0), torch.full_like(x, 1.0)]
    vertices = per_image // 2
    signs += [torch.randint(0, 2, x.shape, generator=gen).to(F64) * 2 - 1 for _ in range(vertices - 2)]
    signs += [torch.rand(x.shape, generator=gen, dtype=F64) * 2 - 1 for _ in range(per_image - vertices)]
    pts = torch.cat([x + eps * m * s for s in signs])
    return pts, n


NETS = ["mlp", "conv", "pre-pool", "residual"]


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_bounds_contain_sampled_logits_and_gradients(kind, seed):
    model = make_net(kind, seed)
    x, y, mask = make_batch(seed)
    eps = 0.3 if seed == 0 else 0.05
    box = masked_box(x, mask, eps)
    z_lower, z_upper, _ = interval_forward(model, box.lower, box.upper)
    g_lower, g_upper = input_gradient_bounds(model, x, y, mask, eps)
    for t in (z_lower, z_upper, g_lower, g_upper):
        assert torch.isfinite(t).all()
    pts, n = box_samples(x, mask, eps, 200, torch.Generator().manual_seed(seed + 100))
    logits, grads = true_logits_and_gradients(model, pts, y.repeat(pts.shape[0] // n))
    reps = pts.shape[0] // n
    assert (logits >= z_lower.repeat(reps, 1) - SLACK).all() and (logits <= z_upper.repeat(reps, 1) + SLACK).all()
    assert (grads >= g_lower.repeat(reps, 1, 1, 1) - SLACK).all()
    assert (grads <= g_upper.repeat(reps, 1, 1, 1) + SLACK).all()
    # unmasked pixels never move, but their gradient still varies: the bounds must not be zero-width there
    assert (g_upper - g_lower).max() > 0


@pytest.mark.parametrize("kind", NETS)
def test_zero_width_box_gives_the_exact_logits_and_gradient(kind):
    model = make_net(kind, 3)
    x, y, mask = make_batch(3)
    z_lower, z_upper, _ = interval_forward(model, x, x)
    g_lower, g_upper = input_gradient_bounds(model, x, y, mask, 0.0)
    logits, grad = true_logits_and_gradients(model, x, y)
    for got, want in ((z_lower, logits), (z_upper, logits), (g_lower, grad), (g_upper, grad)):
        assert torch.allclose(got, want, rtol=0, atol=1e-9), float((got - want).abs().max())


@pytest.mark.parametrize("kind", NETS)
def test_bounds_are_nested_in_eps(kind):
    model = make_net(kind, 4)
    x, y, mask = make_batch(4)
    small = input_gradient_bounds(model, x, y, mask, 0.05)
    large = input_gradient_bounds(model, x, y, mask, 0.3)
    assert (large[0] <= small[0] + SLACK).all() and (small[1] <= large[1] + SLACK).all()
    assert (large[1] - large[0]).sum() > (small[1] - small[0]).sum()


def test_hand_computed_box_and_normalisation():
    # z = (x − 0.5)/0.25; logits = [[1, −2], [0, 3]] z + [0.5, 0]; x ∈ [0.25, 1.0] (x = 0.625 ± 0.375)
    lin = nn.Linear(1, 2).to(F64)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0], [-3.0]], dtype=F64))
        lin.bias.copy_(torch.tensor([0.5, 0.0], dtype=F64))
    model = Classifier(nn.Sequential(nn.Flatten(), lin), InputSpec(1, 1, 1, (0.5,), (0.25,))).to(F64)
    x = torch.full((1, 1, 1, 1), 0.625, dtype=F64)
    box = masked_box(x, torch.ones(1, 1, 1), 0.375)
    assert float(box.lower) == 0.25 and float(box.upper) == 1.0
    zl, zu, trace = interval_forward(model, box.lower, box.upper)
    # z ∈ [−1, 2]: logit0 = 2z + 0.5 ∈ [−1.5, 4.5]; logit1 = −3z ∈ [−6, 3]
    assert torch.allclose(zl, torch.tensor([[-1.5, -6.0]], dtype=F64))
    assert torch.allclose(zu, torch.tensor([[4.5, 3.0]], dtype=F64))
    assert [s.kind for s in trace] == ["normalise", "flatten", "linear"]
    # CE-gradient bounds, y = 0: p0 ∈ [σ(−1.5 − 3), σ(4.5 + 6)], p1 ∈ [σ(−6 − 4.5), σ(3 + 1.5)]
    gl, gu = ce_gradient_bounds(zl, zu, torch.tensor([0]))
    s = torch.sigmoid
    assert torch.allclose(gl, torch.tensor([[s(torch.tensor(-4.5)) - 1, s(torch.tensor(-10.5))]], dtype=F64))
    assert torch.allclose(gu, torch.tensor([[s(torch.tensor(10.5)) - 1, s(torch.tensor(4.5))]], dtype=F64))


def test_masked_box_clipping_and_mask_shapes():
    x = torch.tensor([[[[0.1, 0.9]], [[0.5, 0.5]]]], dtype=F64)  # 1×2×1×2
    mask = torch.tensor([[[1.0, 0.0]]], dtype=F64)  # N×H×W, broadcast over channels
    box = masked_box(x, mask, 0.3)
    assert torch.allclose(box.lower, torch.tensor([[[[-0.2, 0.9]], [[0.2, 0.5]]]], dtype=F64))
    clipped = masked_box(x, mask, 0.3, value_range=(0.0, 1.0))
    assert torch.allclose(clipped.lower, torch.tensor([[[[0.0, 0.9]], [[0.2, 0.5]]]], dtype=F64))
    assert torch.allclose(clipped.upper, torch.tensor([[[[0.4, 0.9]], [[0.8, 0.5]]]], dtype=F64))


@pytest.mark.parametrize("kind", NETS)
def test_bounds_are_differentiable_in_every_parameter(kind):
    model = make_net(kind, 5)
    x, y, mask = make_batch(5)

    def widths(m):
        box = masked_box(x, mask, 0.3)
        zl, zu, _ = interval_forward(m, box.lower, box.upper)
        gl, gu = input_gradient_bounds(m, x, y, mask, 0.3)
        return (zu - zl).sum() + (gu - gl).sum()

    params = dict(model.named_parameters())
    grads = torch.autograd.grad(widths(model), list(params.values()))
    for (name, _), g in zip(params.items(), grads):
        assert torch.isfinite(g).all() and g.abs().max() > 0, name
    assert_fd_gradient(model, widths, directions=2, h=1e-6, rtol=1e-5)


def _sparse_corner_mask(n: int) -> torch.Tensor:
    """Each item masks a 2×2 corner of its own (few active pixels in the batch, as with DecoyMNIST's patches)."""
    mask = torch.zeros(n, 1, H, W, dtype=F64)
    for i in range(n):
        r, c = [(0, 0), (0, W - 2), (H - 2, 0)][i % 3]
        mask[i, :, r:r + 2, c:c + 2] = 1
    return mask


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_bounds_at_selected_columns_are_the_full_bounds_gathered(kind):
    # The Cert-R4 shortcut (`columns`): an MLP takes its last backward product with the selected weight columns
    # only, a conv net gathers; both must give exactly the full bounds' entries and the same θ-gradients.
    model = make_net(kind, 5)
    x, y, _ = make_batch(5, n=4)
    mask = _sparse_corner_mask(4)
    columns = mask.expand_as(x).flatten(1).amax(0).nonzero().squeeze(1)
    assert 0 < columns.numel() < x[0].numel() // 2
    weights = torch.rand(4, columns.numel(), generator=torch.Generator().manual_seed(9), dtype=F64)
    params = [p for p in model.parameters()]

    def run(selected):
        gl, gu = input_gradient_bounds(model, x, y, mask, 0.2, columns=columns if selected else None)
        if not selected:
            gl, gu = gl.flatten(1)[:, columns], gu.flatten(1)[:, columns]
        total = (weights * (gl.abs() + gu.abs())).sum()
        return gl, gu, torch.autograd.grad(total, params, allow_unused=True)

    full, picked = run(False), run(True)
    for a, b in zip(full[:2], picked[:2]):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12)
    for a, b in zip(full[2], picked[2]):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=0, atol=1e-12))


def test_relu_backward_is_the_four_product_min_max():
    # `_relu_backward` replaces min/max over {gl·d_l, gl·d_u, gu·d_l, gu·d_u} by 0/1-mask products; units on, off
    # and undecided over the box must give the same interval and the same gradients.
    from modelfix.repair.intervals import _relu_backward

    gen = torch.Generator().manual_seed(4)
    pre_lower = torch.randn(6, 50, generator=gen, dtype=F64)
    pre_upper = pre_lower + torch.rand(6, 50, generator=gen, dtype=F64) * 2
    assert ((pre_lower > 0).any() and (pre_upper <= 0).any() and ((pre_lower <= 0) & (pre_upper > 0)).any())
    gl = torch.randn(6, 50, generator=gen, dtype=F64).requires_grad_(True)
    gu = (gl.detach() + torch.rand(6, 50, generator=gen, dtype=F64)).requires_grad_(True)
    dl, du = (pre_lower > 0).to(F64), (pre_upper > 0).to(F64)
    products = torch.stack([gl * dl, gl * du, gu * dl, gu * du])
    reference = products.amin(0), products.amax(0)
    got = _relu_backward(gl, gu, pre_lower, pre_upper)
    probe = torch.randn(2, 6, 50, generator=gen, dtype=F64)
    for ref, new in zip(reference, got):
        assert torch.equal(ref, new)
    grads_ref = torch.autograd.grad(sum((t * p).sum() for t, p in zip(reference, probe)), (gl, gu))
    grads_new = torch.autograd.grad(sum((t * p).sum() for t, p in zip(got, probe)), (gl, gu))
    for a, b in zip(grads_ref, grads_new):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_sparse_input_radius_gives_the_dense_interval_and_gradient():
    # The first Linear layer multiplies the input radius by |W| over the active columns only; deeper radii (which
    # carry θ-gradients) keep the dense product.
    from modelfix.repair.intervals import _sparse_radius_linear

    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(7, 40, generator=gen, dtype=F64).requires_grad_(True)
    r = torch.zeros(5, 40, dtype=F64)
    r[:, [3, 17, 18]] = torch.rand(5, 3, generator=gen, dtype=F64)
    sparse = _sparse_radius_linear(r, weight)
    dense = F.linear(r, weight.abs())
    assert torch.allclose(sparse, dense, rtol=0, atol=1e-14)
    probe = torch.randn(5, 7, generator=gen, dtype=F64)
    (g_sparse,) = torch.autograd.grad((sparse * probe).sum(), weight)
    (g_dense,) = torch.autograd.grad((dense * probe).sum(), weight)
    assert torch.allclose(g_sparse, g_dense, rtol=0, atol=1e-14)
    # a radius that depends on θ goes the dense way, so its gradient reaches every column
    r_grad = r.clone().requires_grad_(True)
    (g_r,) = torch.autograd.grad((_sparse_radius_linear(r_grad, weight) * probe).sum(), r_grad)
    assert torch.allclose(g_r, probe @ weight.detach().abs(), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "layer, type_name", [(nn.GELU(), "GELU"), (nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect"), "Conv2d")]
)
def test_unsupported_layer_is_named(layer, type_name):
    net = nn.Sequential(nn.Sequential(nn.Identity(), layer), nn.Flatten(), nn.Linear(C * H * W, K)).to(F64)
    model = Classifier(net, InputSpec(C, H, W, (0.0,), (1.0,))).to(F64)
    x, y, mask = make_batch(0)
    with pytest.raises(UnsupportedModel) as err:
        input_gradient_bounds(model, x, y, mask, 0.1)
    msg = str(err.value)
    assert "'net.0.1'" in msg and type_name in msg and "supported:" in msg and "\n" not in msg


def test_lstm_is_refused():
    with pytest.raises(UnsupportedModel, match=r"'0'.*LSTM"):
        interval_forward(nn.Sequential(nn.LSTM(4, 4)), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))


@pytest.mark.parametrize("arch", ["mlp", "crayon-mlp", "tap-cnn", "egem-cnn", "egem-cnn-ref"])
def test_zoo_small_nets_are_supported_and_exact_at_zero_eps(arch):
    from modelfix.card import ModelCard
    from modelfix.zoo import build_model, default_input_spec

    torch.manual_seed(0)
    model = build_model(ModelCard(arch=arch, num_classes=10, input=default_input_spec(arch))).to(F64).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 28, 28, generator=gen, dtype=F64)
    y = torch.tensor([3, 7])
    mask = torch.zeros(2, 1, 28, 28, dtype=F64)
    mask[:, :, :4, :4] = 1
    logits, grad = true_logits_and_gradients(model, x, y)
    g_lower, g_upper = input_gradient_bounds(model, x, y, mask, 0.0)
    assert torch.allclose(g_lower, grad, rtol=0, atol=1e-9) and torch.allclose(g_upper, grad, rtol=0, atol=1e-9)
    # a few corners of a masked box stay inside the bounds
    g_lower, g_upper = input_gradient_bounds(model, x, y, mask, 0.3)
    pts, n = box_samples(x, mask, 0.3, 6, gen)
    _, grads = true_logits_and_gradients(model, pts, y.repeat(pts.shape[0] // n))
    reps = pts.shape[0] // n
    assert (grads >= g_lower.repeat(reps, 1, 1, 1) - SLACK).all()
    assert (grads <= g_upper.repeat(reps, 1, 1, 1) + SLACK).all()


def tiny_torchvision(arch: str) -> nn.Module:
    """Small instances of torchvision's own classes (ResNet with BasicBlock or Bottleneck, VGG with BatchNorm):
    the stock widths take seconds to build and bound in float64."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    from torchvision.models.vgg import VGG, make_layers

    torch.manual_seed(0)
    if arch == "vgg":
        features = make_layers([4, "M", 8, "M"], batch_norm=True)
        with torch.device("meta"):  # the stock 25088×4096 classifier is replaced before use
            net = VGG(features, num_classes=K, init_weights=False)
        net.features = features
        net.features[0] = nn.Conv2d(C, 4, 3, padding=1)
        net.classifier = nn.Sequential(nn.Linear(8 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, K))
    else:
        net = ResNet(BasicBlock if arch == "resnet-basic" else Bottleneck, [1, 1, 1, 1], num_classes=K)
        net.conv1 = nn.Conv2d(C, 64, 7, 2, 3, bias=False)
    net = net.to(F64)
    _randomise_bn(net, torch.Generator().manual_seed(5))
    return Classifier(net, InputSpec(C, H, W, (0.2, 0.5), (0.5, 0.25))).to(F64).eval()


@pytest.mark.parametrize("arch", ["resnet-basic", "resnet-bottleneck", "vgg"])
def test_torchvision_resnet_and_vgg_are_bounded_soundly_and_exactly_at_zero_eps(arch):
    """torchvision's ResNet (BasicBlock; Bottleneck, whose one ReLU module runs three times) and VGG go through
    `_torchvision_view`: exact at ε = 0, sampled logits and gradients inside the bounds of a masked box."""
    model = tiny_torchvision(arch)
    x, y, mask = make_batch(2, n=2)
    logits, grad = true_logits_and_gradients(model, x, y)
    z_lower, z_upper, _ = interval_forward(model, x, x)
    g_lower, g_upper = input_gradient_bounds(model, x, y, mask, 0.0)
    for got, want in ((z_lower, logits), (z_upper, logits), (g_lower, grad), (g_upper, grad)):
        assert torch.allclose(got, want, rtol=0, atol=1e-9), float((got - want).abs().max())
    eps = 0.05
    box = masked_box(x, mask, eps)
    z_lower, z_upper, _ = interval_forward(model, box.lower, box.upper)
    g_lower, g_upper = input_gradient_bounds(model, x, y, mask, eps)
    pts, n = box_samples(x, mask, eps, 6, torch.Generator().manual_seed(3))
    reps = pts.shape[0] // n
    logits, grads = true_logits_and_gradients(model, pts, y.repeat(reps))
    assert (logits >= z_lower.repeat(reps, 1) - SLACK).all() and (logits <= z_upper.repeat(reps, 1) + SLACK).all()
    assert (grads >= g_lower.repeat(reps, 1, 1, 1) - SLACK).all()
    assert (grads <= g_upper.repeat(reps, 1, 1, 1) + SLACK).all()
    assert (g_upper - g_lower).max() > 0


def test_a_module_listed_twice_in_a_sequential_is_applied_twice():
    lin = nn.Linear(3, 3).to(F64)
    net = nn.Sequential()
    net.add_module("a", lin)
    net.add_module("b", lin)  # the same object: named_children() would yield it once
    x = torch.rand(2, 3, dtype=F64)
    lower, upper, _ = interval_forward(net, x, x)
    assert torch.allclose(lower, lin(lin(x)), atol=1e-12) and torch.allclose(upper, lin(lin(x)), atol=1e-12)


def test_an_unknown_torchvision_block_is_refused_by_name():
    import dataclasses

    from modelfix.card import ModelCard
    from modelfix.zoo import build_model, default_input_spec

    spec = dataclasses.replace(default_input_spec("densenet121"), height=32, width=32)
    model = build_model(ModelCard(arch="densenet121", num_classes=3, input=spec))
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(UnsupportedModel, match=r"module 'net' of type torchvision\.models\.densenet\.DenseNet"):
        interval_forward(model, x, x)
