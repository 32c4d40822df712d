"""Sound interval bound propagation (IBP) for logits and for the input gradient of the cross-entropy
(methods_guided_finetunes.md §2.3, §3.1, §7 items 5 and 7: the machinery behind Cert-R4 and IBP-Ex).

Forward (midpoint/radius, exact weights): for a box [l, u] with centre c = (l+u)/2 and radius r = (u−l)/2, an affine
layer gives c' = Wc + b, r' = |W| r; monotone layers (ReLU, max-pool, pools with non-negative weights) map the two
ends; the input normalisation z = (x − mean)/std maps them too because std > 0.

Backward: the CE gradient with respect to the logits is p − e_y; each p_k is increasing in z_k and decreasing in
z_j (j ≠ k), so the extremal-logit softmax bounds it (§2.3):
    p_l[k] = softmax(z_k = l_k, z_j = u_j)[k],   p_u[k] = softmax(z_k = u_k, z_j = l_j)[k].
That interval is pulled back layer by layer: affine layers by Wᵀc ± |W|ᵀr, ReLU by the derivative interval
[1[pre_l > 0], 1[pre_u > 0]] (4-product min/max), max-pool by conservative routing (see `_maxpool_backward`),
pools by their (non-negative) adjoint, the normalisation by 1/std. The result [G_l, G_u] contains
∇_{x'} CE(f(x'), y) for every x' in the box (sampling-tested); at ε = 0 it collapses to the true gradient.

Every bound is built from plain torch ops on the weights (no detach), so a penalty on it trains θ (§7 item 4).
The ReLU indicators and max-pool candidate sets are piecewise constant in θ and carry no gradient (as in R4).

The bounds describe the model's *eval-mode* function whatever the modules' flags: BatchNorm uses its running
statistics and Dropout is the identity (the convention of `guidance.rrr.input_gradient`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modelfix.errors import UnsupportedModel


class Residual(nn.Module):
    """A skip connection: `body(x) + shortcut(x)`, with the identity as the default shortcut. Interval bounds add."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))


SUPPORTED = (
    "Sequential, Residual, Linear, Conv2d, ReLU, Flatten, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, "
    "BatchNorm1d/2d (running statistics), Dropout, Identity, and torchvision's ResNet (BasicBlock, Bottleneck) and VGG"
)


def _torchvision_view(module: nn.Module) -> nn.Module | None:
    """torchvision's ResNet, its blocks and VGG written as the Sequential/Residual they compute, built from the
    *same* module objects (shared parameters, so bounds stay differentiable in the model's weights); None for any
    other module. Their `forward` methods call torch.flatten and add the skip in code, which a module walk cannot
    see."""
    if not any(c.__module__.startswith("torchvision") for c in type(module).__mro__):
        return None  # importing torchvision costs about 1.7 s; other nets never need it
    from collections import OrderedDict

    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    from torchvision.models.vgg import VGG

    def seq(**parts):
        return nn.Sequential(OrderedDict(parts))

    m = module
    if isinstance(m, BasicBlock):
        body = seq(conv1=m.conv1, bn1=m.bn1, relu1=m.relu, conv2=m.conv2, bn2=m.bn2)
        return seq(residual=Residual(body, m.downsample), relu=m.relu)
    if isinstance(m, Bottleneck):
        body = seq(conv1=m.conv1, bn1=m.bn1, relu1=m.relu, conv2=m.conv2, bn2=m.bn2, relu2=m.relu, conv3=m.conv3,
                   bn3=m.bn3)
        return seq(residual=Residual(body, m.downsample), relu=m.relu)
    if isinstance(m, ResNet):
        return seq(conv1=m.conv1, bn1=m.bn1, relu=m.relu, maxpool=m.maxpool, layer1=m.layer1, layer2=m.layer2,
                   layer3=m.layer3, layer4=m.layer4, avgpool=m.avgpool, flatten=nn.Flatten(), fc=m.fc)
    if isinstance(m, VGG):
        return seq(features=m.features, avgpool=m.avgpool, flatten=nn.Flatten(), classifier=m.classifier)
    return None


@dataclass
class Box:
    """An elementwise interval [lower, upper] (same shape)."""

    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def center(self) -> torch.Tensor:
        return (self.lower + self.upper) / 2

    @property
    def radius(self) -> torch.Tensor:
        return (self.upper - self.lower) / 2

    def contains(self, t: torch.Tensor, slack: float = 0.0) -> torch.Tensor:
        """Elementwise: is t inside the box (± slack)?"""
        return (t >= self.lower - slack) & (t <= self.upper + slack)


def masked_box(
    x: torch.Tensor, mask: torch.Tensor, eps: float, value_range: tuple[float, float] | None = None
) -> Box:
    """The pixel-space box x ± eps·M: masked pixels (M = 1) move by up to eps, the others stay fixed.

    `mask` is N×H×W, N×1×H×W (broadcast over channels) or shaped like x; fractional values scale the radius.
    R4's code does not clip the box to the data range (§2.3), so neither does the default; pass
    `value_range=(low, high)` to clamp both ends to it.
    """
    mask = mask.to(x.dtype)
    if mask.dim() == x.dim() - 1:
        mask = mask.unsqueeze(1)
    radius = eps * mask.expand_as(x)
    lower, upper = x - radius, x + radius
    if value_range is not None:
        lower, upper = lower.clamp(*value_range), upper.clamp(*value_range)
    return Box(lower, upper)


@dataclass
class Step:
    """One traced layer: its kind, the module, the interval of its *input* as far as the backward pass reads it
    (max-pool: the bounds; ReLU: whether they are > 0, bool; other layers: the shape alone, an expanded
    one-element tensor, so a trace does not keep every layer's bounds alive) and, for a Residual, the traces of
    its two branches and its input bounds."""

    kind: str
    name: str
    module: nn.Module | None
    lower: torch.Tensor
    upper: torch.Tensor
    branches: tuple[list[Step], list[Step]] | None = field(default=None)


def _split(model: nn.Module) -> tuple[nn.Module, torch.Tensor | None, torch.Tensor | None]:
    """(net, mean, std) of a `Classifier`; (model, None, None) for a plain network (same test as `network_input`)."""
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and hasattr(model, "mean") and hasattr(model, "std"):
        return net, model.mean, model.std
    return model, None, None


def _unsupported(name: str, module: nn.Module, why: str = "") -> UnsupportedModel:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    extra = f" ({why})" if why else ""
    return UnsupportedModel(
        f"interval bounds do not support module '{name or '<root>'}' of type {kind}{extra}; supported: {SUPPORTED}"
    )


def _conv_padding(name: str, conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's symmetric zero padding as two ints (string paddings converted), else UnsupportedModel."""
    if conv.padding_mode != "zeros":
        raise _unsupported(name, conv, f"padding_mode '{conv.padding_mode}'")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise _unsupported(name, conv, "asymmetric 'same' padding")
        return (total[0] // 2, total[1] // 2)
    return tuple(conv.padding)  # type: ignore[return-value]


def _bn_affine(name: str, bn: nn.modules.batchnorm._BatchNorm, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as scale·x + shift per channel, shaped to broadcast over `like` (N×C or N×C×H×W).
    scale = γ/sqrt(var + eps) may be negative; the callers use |scale| for radii."""
    if bn.running_mean is None or bn.running_var is None:
        raise _unsupported(name, bn, "no running statistics")
    scale = torch.rsqrt(bn.running_var.to(like.dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean.to(like.dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    shape = (1, -1) + (1,) * (like.dim() - 2)
    return scale.reshape(shape), shift.reshape(shape)


def _forward(module: nn.Module, name: str, lower: torch.Tensor, upper: torch.Tensor, trace: list[Step]):
    """Propagate [lower, upper] through `module`, appending one Step per leaf layer to `trace`."""
    view = _torchvision_view(module)
    if view is not None:
        return _forward(view, name, lower, upper, trace)
    if isinstance(module, nn.Sequential):
        # `_modules`, not `named_children()`: the latter skips a module object that appears twice (a shared ReLU).
        for child_name, child in module._modules.items():
            lower, upper = _forward(child, f"{name}.{child_name}" if name else child_name, lower, upper, trace)
        return lower, upper
    if isinstance(module, Residual):
        body: list[Step] = []
        short: list[Step] = []
        bl, bu = _forward(module.body, f"{name}.body", lower, upper, body)
        if module.shortcut is None:
            sl, su = lower, upper
        else:
            sl, su = _forward(module.shortcut, f"{name}.shortcut", lower, upper, short)
        trace.append(Step("residual", name, module, lower, upper, (body, short)))
        return bl + sl, bu + su
    if isinstance(module, nn.Linear):
        kind = "linear"
        c, r = (lower + upper) / 2, (upper - lower) / 2
        c, r = F.linear(c, module.weight, module.bias), _sparse_radius_linear(r, module.weight)
        out = (c - r, c + r)
    elif isinstance(module, nn.Conv2d):
        kind = "conv"
        pad = _conv_padding(name, module)
        c, r = _conv_layout((lower + upper) / 2), _conv_layout((upper - lower) / 2)
        args = (module.stride, pad, module.dilation, module.groups)
        c, r = F.conv2d(c, module.weight, module.bias, *args), F.conv2d(r, module.weight.abs(), None, *args)
        out = (c - r, c + r)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        kind = "bn"
        scale, shift = _bn_affine(name, module, lower)
        c, r = (lower + upper) / 2, (upper - lower) / 2
        c, r = scale * c + shift, scale.abs() * r
        out = (c - r, c + r)
    elif isinstance(module, nn.ReLU):
        # The backward pass needs only the signs of the pre-activation bounds: keeping them as bool instead of the
        # float bounds cuts Cert-R4's peak memory on a conv net (autograd does not keep those bounds).
        trace.append(Step("relu", name, module, lower > 0, upper > 0))
        return F.relu(lower), F.relu(upper)
    elif isinstance(module, nn.MaxPool2d):
        kind = "maxpool"
        if module.ceil_mode or module.return_indices:
            raise _unsupported(name, module, "ceil_mode / return_indices")
        lower, upper = _conv_layout(lower), _conv_layout(upper)
        out = (module(lower), module(upper))  # monotone in every input
    elif isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        kind = "avgpool"
        out = (module(lower), module(upper))  # linear with non-negative weights: monotone
    elif isinstance(module, nn.Flatten):
        kind = "flatten"
        out = (module(lower), module(upper))
    elif isinstance(module, (nn.Identity, nn.Dropout)):
        kind = "identity"  # Dropout is the identity in eval mode
        out = (lower, upper)
    else:
        raise _unsupported(name, module)
    if kind != "maxpool":  # the backward pass reads only the input's shape here: holding the bounds costs memory
        lower = upper = lower.new_empty((1,) * lower.dim()).expand(lower.shape)
    trace.append(Step(kind, name, module, lower, upper))
    return out


def _sparse_radius_linear(r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|W|·r using only the input features with a non-zero radius somewhere in the batch (exact: the others add 0).

    The pixel box x ± ε·M moves a few masked pixels, so on a first Linear layer (an MLP on flattened images) most
    columns of r are exactly 0 and this skips most of the product and of its weight gradient. It is used only
    when r carries no gradient (the input box): deeper radii depend on θ, and a column that is 0 there may still
    pass a gradient on.
    """
    if r.requires_grad or r.dim() != 2:
        return F.linear(r, weight.abs())
    active = (r != 0).any(0).nonzero().squeeze(1)
    if active.numel() * 2 > r.shape[1]:
        return F.linear(r, weight.abs())
    return F.linear(r[:, active], weight[:, active].abs())


def interval_forward(
    model: nn.Module, lower: torch.Tensor, upper: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[Step]]:
    """(out_lower, out_upper, trace): sound bounds on model(x') for every pixel-space x' in [lower, upper].

    `model` is a `Classifier` (its normalisation is applied to the box first; std > 0 keeps the order) or a plain
    network built from the SUPPORTED modules (nested Sequentials and `Residual` blocks included). `trace` lists
    one Step per layer in forward order, each with its input interval; `interval_backward` consumes it.
    """
    net, mean, std = _split(model)
    trace: list[Step] = []
    if mean is not None:
        if bool((std <= 0).any()):
            raise UnsupportedModel("interval bounds need a positive input std; this Classifier's std has entries <= 0")
        trace.append(Step("normalise", "", model, lower, upper))
        mean, std = mean.to(lower.dtype), std.to(lower.dtype)
        lower, upper = (lower - mean) / std, (upper - mean) / std
    out_lower, out_upper = _forward(net, "net" if mean is not None else "", lower, upper, trace)
    return out_lower, out_upper, trace


def _adjoint(fn, like: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Jᵀ·grad for a linear map `fn` evaluated at the input shape of `like` (differentiable in grad)."""
    with torch.enable_grad():
        probe = torch.zeros_like(like, requires_grad=True)
        (out,) = torch.autograd.grad(fn(probe), probe, grad, create_graph=True)
    return out


def _relu_backward(gl: torch.Tensor, gu: torch.Tensor, pre_lower: torch.Tensor, pre_upper: torch.Tensor):
    """[gl, gu]·[d_l, d_u] for the ReLU derivative interval d_l = 1[pre_l > 0] ≤ d_u = 1[pre_u > 0]: a unit on over
    the whole box passes the interval, one off passes 0, an undecided one (d_u − d_l = 1) the hull of the interval
    and 0. The same numbers as the min/max of the four end products, written as products with 0/1 masks: on a conv
    net the four-way stack (and torch.where) took a third of a Cert-R4 step. `pre_lower`, `pre_upper`: the bounds
    or, as the trace keeps them, their signs (bool)."""
    # bool masks: autograd keeps 1 byte per unit for the products, not 4, and they run faster; the trace's masks are
    # used as they are (`bool > 0` would convert them to a wider type first)
    on = pre_lower if pre_lower.dtype == torch.bool else pre_lower > 0
    undecided = (pre_upper if pre_upper.dtype == torch.bool else pre_upper > 0) & ~on
    return gl * on + gl.clamp(max=0) * undecided, gu * on + gu.clamp(min=0) * undecided


def _maxpool_backward(pool: nn.MaxPool2d, lower, upper, gl, gu):
    """Conservative routing of a pooled-gradient interval back to the pool's input positions.

    In a window whose max-lower is m = max_j lower_j, position p can hold the max only if upper_p ≥ m (a
    *candidate*; the position attaining m always is one). If the window has a single candidate it is the argmax
    for every point of the box and receives [gl, gu] exactly; otherwise every candidate receives the hull of
    "gets it" and "gets 0", [min(0, gl), max(0, gu)], and non-candidates 0. Overlapping windows sum (fold).
    This keeps the bounds exact at ε = 0 away from ties.

    unfold/fold run on the (N, C, h, w) layout: their im2col loops over the batch dimension, so an (N·C, 1, h, w)
    view made them loop N·C times (a fifth of a Cert-R4 step on a conv net).
    """
    n, ch, h, w = lower.shape
    k, s, p, d = (nn.modules.utils._pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    if s == k and p == (0, 0) and d == (1, 1):
        return _tiled_maxpool_backward(k, lower, upper, gl, gu)
    window_max_lower = F.max_pool2d(lower, k, s, p, d).reshape(n, ch, 1, -1)  # (N, C, 1, L)
    padded = F.pad(upper, (p[1], p[1], p[0], p[0]), value=float("-inf"))
    cols = F.unfold(padded, k, dilation=d, stride=s).reshape(n, ch, k[0] * k[1], -1)  # padding never a candidate
    cand = (cols >= window_max_lower).to(gl.dtype)  # (N, C, k·k, L)
    unique = cand.sum(2, keepdim=True) == 1
    gl, gu = gl.reshape(n, ch, 1, -1), gu.reshape(n, ch, 1, -1)
    lo = torch.where(unique, gl, gl.clamp(max=0)) * cand
    hi = torch.where(unique, gu, gu.clamp(min=0)) * cand

    def fold(t):  # sum each window's share back onto its input positions; padding is cropped away
        return F.fold(t.reshape(n, ch * k[0] * k[1], -1), (h, w), k, dilation=d, padding=p, stride=s)

    return fold(lo), fold(hi)


def _tiled_maxpool_backward(k: tuple[int, int], lower, upper, gl, gu):
    """`_maxpool_backward` for non-overlapping windows (stride = kernel, no padding or dilation: tap-cnn, VGG), with
    no unfold/fold: each window's values are spread onto its own positions by nearest upsampling (exact for an
    integer factor; its adjoint is the window sum) and the candidates are counted by a sum-pool, all in the
    channels-last layout the forward pass stored (`_conv_layout`). Positions past the last whole window get 0."""
    n, ch, h, w = lower.shape
    ho, wo = h // k[0], w // k[1]

    def spread(t):  # (N, C, ho, wo) -> (N, C, ho·k0, wo·k1), each value on its window's positions
        return F.interpolate(t, size=(ho * k[0], wo * k[1]), mode="nearest-exact")

    cand = (upper[:, :, : ho * k[0], : wo * k[1]] >= spread(F.max_pool2d(lower, k))).to(gl.dtype)
    unique = F.avg_pool2d(cand, k, divisor_override=1) == 1  # candidates per window, summed exactly
    gl, gu = _conv_layout(gl.reshape(n, ch, ho, wo)), _conv_layout(gu.reshape(n, ch, ho, wo))
    lo = spread(torch.where(unique, gl, gl.clamp(max=0))) * cand
    hi = spread(torch.where(unique, gu, gu.clamp(min=0))) * cand
    crop = (0, w - wo * k[1], 0, h - ho * k[0])
    return (F.pad(lo, crop), F.pad(hi, crop)) if any(crop) else (lo, hi)


def _conv_layout(t: torch.Tensor) -> torch.Tensor:
    """Interval bounds of conv and pool layers run in the channels-last layout: torch's CPU max-pool, sum-pool and
    nearest upsampling are several times faster there than in NCHW (max-pool 7× at tap-cnn's 100×28×28), and one
    layout throughout keeps the elementwise ops of both passes on contiguous memory. A no-op when t has it."""
    return t.to(memory_format=torch.channels_last)  # not .contiguous(): that keeps NCHW strides when C = 1


_PIXELWISE = ("normalise", "flatten", "identity")  # steps that keep each input feature where it is


def _first_affine(trace: list[Step]) -> int | None:
    """Index of a Linear step reached from the input through pixelwise steps only (an MLP's first layer), else
    None."""
    for i, step in enumerate(trace):
        if step.kind == "linear":
            return i
        if step.kind not in _PIXELWISE:
            return None
    return None


def interval_backward(trace: list[Step], g_lower: torch.Tensor, g_upper: torch.Tensor,
                      columns: torch.Tensor | None = None):
    """Pull an interval [g_lower, g_upper] on ∂ℓ/∂(output) back through `trace` to an interval on ∂ℓ/∂(input)
    (pixel space for a Classifier). Sound for every input in the forward box: each layer's Jacobian over the box
    is bounded by the layer's stored input interval.

    `columns` (indices into the flattened input, C·H·W) asks for the bounds at those input positions only, N×k.
    When the net starts with a Linear layer the last product is taken with those weight columns alone (the same
    numbers, a fraction of the work: Cert-R4 needs only the masked pixels); otherwise the full bounds are
    computed and gathered."""
    first = _first_affine(trace) if columns is not None else None
    gl, gu = g_lower, g_upper
    for index in range(len(trace) - 1, -1, -1):
        step = trace[index]
        m, kind = step.module, step.kind
        if first is not None and index <= first:
            gl, gu = _backward_selected(step, gl, gu, columns)
            continue
        if kind == "linear":
            gl, gu = _linear_backward(gl, gu, m.weight)
        elif kind == "conv":
            c, r = (gl + gu) / 2, (gu - gl) / 2
            pad = _conv_padding(step.name, m)
            out_hw = c.shape[-2:]
            extra = tuple(
                step.lower.shape[-2 + i]
                - ((out_hw[i] - 1) * m.stride[i] - 2 * pad[i] + m.dilation[i] * (m.kernel_size[i] - 1) + 1)
                for i in range(2)
            )
            args = (None, m.stride, pad, extra, m.groups, m.dilation)
            c, r = F.conv_transpose2d(c, m.weight, *args), F.conv_transpose2d(r, m.weight.abs(), *args)
            gl, gu = c - r, c + r
        elif kind == "bn":
            scale, _ = _bn_affine(step.name, m, gl)
            c, r = scale * (gl + gu) / 2, scale.abs() * (gu - gl) / 2
            gl, gu = c - r, c + r
        elif kind == "relu":
            gl, gu = _relu_backward(gl, gu, step.lower, step.upper)
        elif kind == "maxpool":
            gl, gu = _maxpool_backward(m, step.lower, step.upper, gl, gu)
        elif kind == "avgpool":  # non-negative adjoint: monotone, maps each end
            gl, gu = _adjoint(m, step.lower, gl), _adjoint(m, step.lower, gu)
        elif kind == "flatten":
            gl, gu = gl.reshape(step.lower.shape), gu.reshape(step.lower.shape)
        elif kind == "residual":
            body, short = step.branches
            bl, bu = interval_backward(body, gl, gu)
            sl, su = interval_backward(short, gl, gu) if short else (gl, gu)
            gl, gu = bl + sl, bu + su
        elif kind == "normalise":
            std = m.std.to(gl.dtype)
            gl, gu = gl / std, gu / std
        # "identity": nothing to do
    if columns is not None and first is None:
        gl, gu = gl.flatten(1)[:, columns], gu.flatten(1)[:, columns]
    return gl, gu


def _linear_backward(gl: torch.Tensor, gu: torch.Tensor, weight: torch.Tensor):
    """[gl, gu]·W through a Linear layer's weight (out × in): c·W ± r·|W| with the interval's centre c and radius r."""
    c, r = (gl + gu) / 2, (gu - gl) / 2
    c, r = c @ weight, r @ weight.abs()
    return c - r, c + r


def _backward_selected(step: Step, gl: torch.Tensor, gu: torch.Tensor, columns: torch.Tensor):
    """`interval_backward` from an MLP's first Linear layer down to the input, at the input positions `columns`
    only (N×k throughout: the pixelwise steps below the Linear layer keep every feature in place)."""
    if step.kind == "linear":
        return _linear_backward(gl, gu, step.module.weight[:, columns])
    if step.kind == "normalise":
        std = torch.broadcast_to(step.module.std.to(gl.dtype), step.lower.shape)[0].flatten()[columns]
        return gl / std, gu / std
    return gl, gu  # flatten, identity


def ce_gradient_bounds(z_lower: torch.Tensor, z_upper: torch.Tensor, y: torch.Tensor):
    """Bounds on ∂CE(z, y)/∂z = softmax(z) − e_y over the logit box [z_lower, z_upper] (N×K), per example.

    p_l[k] = sigmoid(l_k − logsumexp_{j≠k} u_j), p_u[k] = sigmoid(u_k − logsumexp_{j≠k} l_j): the extremal-logit
    softmax of §2.3 written stably.
    """
    k = z_lower.shape[1]
    off = torch.eye(k, dtype=torch.bool, device=z_lower.device)

    def lse_others(z):  # (N, K): logsumexp over j ≠ k
        return z.unsqueeze(1).expand(-1, k, -1).masked_fill(off, float("-inf")).logsumexp(-1)

    p_lower = torch.sigmoid(z_lower - lse_others(z_upper))
    p_upper = torch.sigmoid(z_upper - lse_others(z_lower))
    onehot = F.one_hot(y, k).to(z_lower.dtype)
    return p_lower - onehot, p_upper - onehot


def input_gradient_bounds(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
    value_range: tuple[float, float] | None = None,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_lower, g_upper), shaped like x: bounds on the pixel-space input gradient ∇_{x'} CE(model(x'), y) of the
    per-example cross-entropy, valid for every x' in `masked_box(x, mask, eps, value_range)` (Cert-R4, §2.3).
    Differentiable in the model's parameters. With `columns` (indices into x.flatten(1)): the bounds at those
    positions only, N×k (`interval_backward`)."""
    box = masked_box(x, mask, eps, value_range)
    z_lower, z_upper, trace = interval_forward(model, box.lower, box.upper)
    g_lower, g_upper = ce_gradient_bounds(z_lower, z_upper, y)
    return interval_backward(trace, g_lower, g_upper, columns)
