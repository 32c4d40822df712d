"""Interval-bound objectives on the masked box x ± ε·M (`repair.intervals`): Cert-R4 and IBP-Ex (+RRR).

- Cert-R4 (R4, methods_guided_finetunes.md §2.3): with [G_l, G_u] ⊇ {∇_z' CE(f(x'), y) : x' in the box},
      penalty = Σ_{b,i} M_bi (|G_l,bi| + |G_u,bi|) / (B·D),   D = C·H·W,
  an upper bound (within a factor 2) on the largest masked input gradient anywhere in the box. Differentiable in θ
  through both interval passes. This is the one R4 mask term the reference code trains on DecoyMNIST. The gradient
  is taken with respect to the network input z = (x − mean)/std (the package's convention, rrr.py): R4's networks
  read ÷255 pixels with no normalisation, so z is R4's input and λ = k keeps R4's meaning (on a card with mean 0,
  std 1, as R4's `mlp`, z = x and nothing changes). The box x ± ε·M stays in pixel units, as IBP-Ex's. Bounds on
  ∇_z are the pixel bounds times std per channel (∂/∂z = std·∂/∂x; std > 0 keeps their order). (Until issue 18 the
  penalty used the pixel gradient, 1/std larger.)
- IBP-Ex (Heo et al., §3.1): worst-case logits ẑ (lower bound at the true class, upper bound elsewhere), then
      loss = α·CE(f(x), y) + (1 − α)·CE(ẑ, y)    (regulariser over items with a mask only, batch mean over them).
  With `ramp` (Heo's schedules, §3.1, updated at the start of each epoch e of E, counted from 0):
      α_e = α₀ − 0.5·α₀·e/E,     ε_e = ε_start + ε·e/E
  (α ends near α₀/2 and ε near ε_start + ε, not at ε: Heo's ε_max is an increment). Without it α and ε are constant,
  as in R4's DecoyMNIST table (§2.7). `rrr` > 0 adds Heo's IBP-Ex+RRR term λ_rrr·Σ_b Σ_pixels |M ⊙ ∂(Σ_k f_k)/∂z|
  (L1, summed over the batch), with z = (x − mean)/std the network input: the package's convention for input
  gradients (rrr.py), and Heo's, whose inputs are the normalised images (§3.4), so λ_rrr = 1 keeps Heo's meaning.
  (Until issue 18 this differentiated with respect to pixels, a term 1/std larger.)

Both need a network the interval module supports (Linear, Conv2d, ReLU, pools, eval BatchNorm, Flatten, Residual);
any other layer is refused in one line naming it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelfix.errors import ModelfixError
from modelfix.precision import full_precision
from modelfix.repair.guidance.base import GuidedObjective
from modelfix.repair.guidance.pgd_ex import check_eps
from modelfix.repair.guidance.rrr import check_weight, eval_mode, network_input, pixel_mask
from modelfix.repair.intervals import input_gradient_bounds, interval_forward, masked_box
from modelfix.repair.registry import objective
from modelfix.training import task_loss

# Heo's optimiser for Heo's methods (methods_guided_finetunes.md §3.4, §7 item 14); the R4 methods take R4's table.
HEO_SETUP = {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 1e-4}
R4_PAPER = 'R4, "Robustly Right for the Right Reasons" (code: Mihneaghitu/ModelGuidanceViaRobustFeatureAttribution)'
HEO_PAPER = 'Heo et al. 2023, "Use Perturbations when Learning from Explanations" (code: vihari/robust_mlx)'


def _input_std(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input std of every position of one item, flattened (C·H·W): the `Classifier`'s std per channel, 1 for a
    plain network (the same test as `network_input`)."""
    std = getattr(model, "std", None) if isinstance(getattr(model, "net", None), nn.Module) else None
    if std is None or not hasattr(model, "mean"):
        return x.new_ones(x[0].numel())
    return torch.broadcast_to(std.to(x.dtype).reshape(-1, 1, 1), x.shape[1:]).flatten()


def _masked_items(batch: dict, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N×1×H×W mask with unmasked items zeroed, bool N of items that have any masked pixel)."""
    mask = pixel_mask(batch, dtype).unsqueeze(1)
    return mask, mask.flatten(1).amax(1) > 0


@objective("penalise sound interval bounds on the masked input gradient over x ± ε·M", needs_masks=True,
           weight="lam", train_defaults={"optimizer": "adam", "lr": 1e-3})
class CertR4(GuidedObjective):
    """Objective `task + λ·R_cert` (module docstring). Defaults: R4's DecoyMNIST table (ε 0.5, k = λ 15)."""

    name = "r4-cert"
    paper = R4_PAPER
    defaults = {"lam": 15.0, "eps": 0.5}

    def __init__(self, lam: float = 15.0, eps: float = 0.5, loss: str = "ce"):
        if loss not in ("ce", "double-softmax"):  # double-softmax: R4's task term; the bounds stay single-softmax CE
            raise ModelfixError("r4-cert bounds the cross-entropy gradient; use --loss ce")
        self.lam = check_weight(lam, "r4-cert lam")
        self.eps = check_eps(eps)
        self.loss_fn = task_loss(loss)

    def penalty(self, model: nn.Module, batch: dict) -> torch.Tensor:
        x = batch["x"]
        mask, has = _masked_items(batch, x.dtype)
        if not bool(has.any()):
            return x.new_zeros(())
        # Only the masked positions enter the penalty, so the bounds are computed there alone (exact, and on an MLP
        # most of the last backward product is skipped: intervals.interval_backward).
        weights = mask.expand_as(x).flatten(1)
        columns = weights.amax(0).nonzero().squeeze(1)
        # bounds of the eval-mode function (BatchNorm running statistics), in float32 under autocast: 16-bit rounding
        # of the interval products would loosen the bounds, and they are differentiated once more
        with eval_mode(model), full_precision(x.device):
            g_lower, g_upper = input_gradient_bounds(model, x, batch["y"], mask, self.eps, columns=columns)
        scale = weights[:, columns] * _input_std(model, x)[columns]  # bounds on ∇_z = std·∇_x (module docstring)
        return (scale * (g_lower.abs() + g_upper.abs())).sum() / x.numel()

    def terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(model(batch["x"]), batch["y"]), self.penalty(model, batch)


def worst_case_logits(z_lower: torch.Tensor, z_upper: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ẑ: the lower bound at the true class, the upper bound at every other class."""
    true = F.one_hot(y, z_lower.shape[1]).bool()
    return torch.where(true, z_lower, z_upper)


@objective("IBP-Ex plus λ·L1 of the masked gradient of the logit sum (Heo's combination)", name="ibp-ex-rrr",
           defaults={"alpha": 0.5, "eps": 0.2, "rrr": 1.0, "ramp": False, "eps_start": 0.0}, needs_masks=True,
           weight="rrr", train_defaults=HEO_SETUP)
@objective("α·CE + (1 − α)·CE of the worst-case logits over x ± ε·M (interval bounds)", needs_masks=True,
           train_defaults=HEO_SETUP)
class IBPEx(GuidedObjective):
    """Objective α·CE + (1 − α)·CE(ẑ) (+ λ_rrr·L1 masked logit-sum gradient); module docstring. `task` is α·CE,
    `penalty` the rest, so `loss = task + penalty` (the weights are inside, no extra λ). Defaults, all from Heo
    (methods_guided_finetunes.md §3.1, §3.4; the registry adds Heo's AdamW lr 3e-4, wd 1e-4): α 0.5 (where Heo's
    ramp ends; the ramp itself is opt-in), ε 0.2 px (Heo's ε_max = 1 in CIFAR-normalised units, std ≈ 0.2), rrr 0
    (IBP-Ex) or 1 (Heo's IBP-Ex+RRR). `bench r4-mnist` passes R4's table instead."""

    name = "ibp-ex"
    paper = HEO_PAPER
    defaults = {"alpha": 0.5, "eps": 0.2, "rrr": 0.0, "ramp": False, "eps_start": 0.0}
    weight_attr = None  # the penalty carries its own weights (1 − α, rrr)

    def __init__(self, alpha: float = 0.5, eps: float = 0.2, rrr: float = 0.0, ramp: bool = False,
                 eps_start: float = 0.0, loss: str = "ce"):
        if loss not in ("ce", "double-softmax"):  # double-softmax: R4's task term; the bound term stays CE
            raise ModelfixError("ibp-ex uses cross-entropy on the worst-case logits; use --loss ce")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ModelfixError(f"--alpha must lie in [0, 1] for ibp-ex, got {alpha}")
        self.alpha0, self.eps_max = float(alpha), check_eps(eps)
        self.eps_start = check_weight(eps_start, "--eps-start")
        self.ramp = bool(ramp)
        self.rrr = check_weight(rrr, "ibp-ex rrr weight")
        self.loss_fn = task_loss(loss)
        self.set_epoch(0, 1)

    def set_epoch(self, epoch: int, epochs: int) -> dict:
        """Heo's per-epoch ramps (module docstring) when `ramp`; constant α and ε otherwise."""
        if not self.ramp:
            self.alpha, self.eps = self.alpha0, self.eps_max
            return {}
        progress = epoch / max(epochs, 1)
        self.alpha = self.alpha0 - 0.5 * self.alpha0 * progress
        self.eps = self.eps_start + self.eps_max * progress
        return {"alpha": self.alpha, "eps": self.eps}

    def penalty(self, model: nn.Module, batch: dict) -> torch.Tensor:
        x, y = batch["x"], batch["y"]
        mask, has = _masked_items(batch, x.dtype)
        if not bool(has.any()):
            return x.new_zeros(())
        with full_precision(x.device):  # interval bounds and the input gradient in float32 (CertR4.penalty)
            return self._penalty(model, x, y, mask, has)

    def _penalty(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, has: torch.Tensor):
        with eval_mode(model):
            box = masked_box(x[has], mask[has], self.eps)
            z_lower, z_upper, _ = interval_forward(model, box.lower, box.upper)
        penalty = (1 - self.alpha) * F.cross_entropy(worst_case_logits(z_lower, z_upper, y[has]), y[has])
        if self.rrr > 0:
            with eval_mode(model):
                net, z = network_input(model, x)  # gradient w.r.t. the normalised input (module docstring)
                (grad,) = torch.autograd.grad(net(z).sum(), z, create_graph=True)
            penalty = penalty + self.rrr * (mask * grad).abs().sum()
        return penalty

    def terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha * self.loss_fn(model(batch["x"]), batch["y"]), self.penalty(model, batch)

