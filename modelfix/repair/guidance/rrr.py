"""RRR, "Right for the Right Reasons" (Ross, Hughes, Doshi-Velez, IJCAI 2017), with TAP's reduction
(methods_guided_finetunes.md §1.3, §6 items 4 and 6, §7 item 3).

The penalty is the squared input gradient on the pixels the mask marks as spurious:

    g_b  = Σ_c ∂T(x_b)/∂z_b                 signed sum over channels (as TAP), z = (x − mean)/std the net input
    M̃_b  = M_b · D/|M_b|                    D = H·W, |M_b| = number (mass) of masked pixels of image b
    L_RRR = mean_b Σ_i (M̃_bi · g_bi)²  =  mean_b (D/|M_b|)² Σ_i (M_bi g_bi)²

Images without a mask (`has_mask` False, or an all-zero mask) contribute exactly 0 and still count in the batch
mean; TAP's code divides by zero there and stops on NaN (§1.3). The explained scalar T is chosen by `target`:

- `log-prob-sum`: Σ_k log p_k (Ross et al. and TAP; not label-specific), the default;
- `loss`: the per-example task loss of the true label (R4's RRR);
- `logit-sum`: Σ_k z_k (Heo et al.'s RRR, here with TAP's squared, renormalised reduction).

Gradients are taken with respect to the *network* input z, not the pixels, so λ means what it means in the
papers (TAP standardises its inputs). They are taken in eval mode (TAP, §6 item 6: no batch coupling through
BatchNorm, no dropout noise), with `create_graph=True` so the penalty trains θ (§7 item 4). A model whose train
and eval modes compute the same function (`mode_invariant`: no BatchNorm, dropout or unknown module) gets them
from the training forward pass itself; any other model from a second forward pass in eval mode. Both give the
same numbers on a mode-invariant model (tested); sharing saves one forward pass per step (`bench cost`).
The helpers here (`network_input`, `eval_mode`, `input_gradient`, `pixel_mask`, `mode_invariant`) are shared
with RBR.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from modelfix.errors import ModelfixError
from modelfix.precision import autocast_enabled, full_precision
from modelfix.repair.guidance.base import GuidedObjective
from modelfix.repair.registry import objective
from modelfix.training import task_loss

PAPER = 'Ross, Hughes, Doshi-Velez, IJCAI 2017, "Right for the Right Reasons"'
TARGETS = ("log-prob-sum", "loss", "logit-sum")
# TAP §1.6: SGD with momentum 0.9 (the paper's "weight decay 0.9"), lr 1e-3, for TAP, RRR and RBR alike.
TAP_SETUP = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9}


def check_weight(value: float, option: str) -> float:
    """A penalty weight as a float: finite and >= 0, else one clear error naming the option."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = float("nan")
    if not (math.isfinite(weight) and weight >= 0):
        raise ModelfixError(f"{option} must be a finite number >= 0, got {value!r}")
    return weight


def network_input(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """(net, z): the network behind a `Classifier` and its normalised input z = (x − mean)/std, a fresh leaf that
    requires grad. A plain module is its own network with z = x."""
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and hasattr(model, "mean") and hasattr(model, "std"):
        z = (x - model.mean.to(x.dtype)) / model.std.to(x.dtype)
    else:
        net, z = model, x
    return net, z.detach().requires_grad_(True)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block; each module's own flag restored afterwards (so BatchNorm layers
    frozen by `TrainConfig.freeze_bn` stay in eval mode and the rest go back to train mode)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


# Modules whose forward reads `self.training`; any module outside torch.nn and modelfix is treated as one too.
MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.dropout._DropoutNd,
                  nn.RReLU, nn.MultiheadAttention)


def mode_invariant(model: nn.Module) -> bool:
    """True when train and eval mode compute the same function, so the training forward pass can serve the
    eval-mode input gradient: only torch.nn / modelfix modules, none of them in MODE_DEPENDENT."""
    for module in model.modules():
        origin = type(module).__module__
        if isinstance(module, MODE_DEPENDENT) or not origin.startswith(("torch.nn.", "modelfix.")):
            return False
    return True


def explained_scalar(logits: torch.Tensor, y: torch.Tensor, target: str, loss: str = "ce") -> torch.Tensor:
    """The batch sum of the per-example scalar whose input gradient is the explanation (see module docstring).
    Summing over the batch keeps each example's gradient its own (no coupling in eval mode)."""
    if target == "log-prob-sum":
        return F.log_softmax(logits, dim=1).sum()
    if target == "logit-sum":
        return logits.sum()
    if target == "loss":
        # R4's regularisers explain the single-softmax CE of the logits even where its task term is double-softmax
        explained = "ce" if loss == "double-softmax" else loss
        return task_loss(explained)(logits, y) * logits.shape[0]  # batch mean × N = sum of per-example losses
    raise ModelfixError(f"RRR target must be one of {', '.join(TARGETS)}, not '{target}'")


def input_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, target: str = "log-prob-sum", loss: str = "ce"
) -> torch.Tensor:
    """∂T/∂z (N×C×H×W) from a second forward pass in eval mode, with `create_graph=True` (differentiable in θ);
    in float32 under autocast (a gradient differentiated again is not rounded to 16 bits)."""
    with eval_mode(model), full_precision(x.device):
        net, z = network_input(model, x)
        scalar = explained_scalar(net(z), y, target, loss)
        (grad,) = torch.autograd.grad(scalar, z, create_graph=True)
    return grad


def pixel_mask(batch: dict, dtype: torch.dtype) -> torch.Tensor:
    """The batch's penalty mask as N×H×W (1 = spurious): channels merged by max, items without a mask zeroed."""
    mask = batch["mask"].to(dtype)
    mask = mask.amax(dim=1) if mask.dim() == 4 else mask
    return mask * batch["has_mask"].to(dtype).view(-1, *([1] * (mask.dim() - 1)))


def rrr_penalty(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_b (D/|M_b|)² Σ_i (M_bi g_bi)² with g = Σ_c grad (N×H×W), D = H·W; 0 for images with |M_b| = 0."""
    g = grad.sum(dim=1)
    count = mask.sum(dim=(1, 2))
    pixels = mask.shape[1] * mask.shape[2]
    scale = torch.where(count > 0, pixels / count.clamp_min(torch.finfo(count.dtype).tiny), torch.zeros_like(count))
    return (scale.pow(2) * (mask * g).pow(2).sum(dim=(1, 2))).mean()


@objective("penalise input gradients on the spurious mask (double backprop, ≈3× ERM)", needs_masks=True,
           weight="lam", train_defaults=TAP_SETUP)
class RRR(GuidedObjective):
    """Objective `task + λ·L_RRR` (module docstring). Task loss from the normal training-mode forward pass."""

    name = "rrr"
    paper = PAPER
    defaults = {"lam": 1e-3, "target": "log-prob-sum"}

    def __init__(self, lam: float = 1e-3, target: str = "log-prob-sum", loss: str = "ce"):
        if target not in TARGETS:
            raise ModelfixError(f"RRR target must be one of {', '.join(TARGETS)}, not '{target}'")
        self.lam = check_weight(lam, "RRR lam")
        self.target = target
        self.loss = loss
        self.loss_fn = task_loss(loss)


    def penalty(self, model: nn.Module, batch: dict) -> torch.Tensor:
        x = batch["x"]
        mask = pixel_mask(batch, x.dtype)
        if not bool(mask.any()):  # nothing to penalise: skip the double-backprop pass (exactly 0)
            return x.new_zeros(())
        return rrr_penalty(input_gradient(model, x, batch["y"], self.target, self.loss), mask)

    def terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(task, penalty), both differentiable; one shared forward pass on a mode-invariant model."""
        x, y = batch["x"], batch["y"]
        mask = pixel_mask(batch, x.dtype)
        if not mode_invariant(model) or not bool(mask.any()) or autocast_enabled(x.device):
            # under autocast the task pass stays 16-bit and the penalty gets its own float32 pass
            return self.loss_fn(model(x), y), self.penalty(model, batch)
        net, z = network_input(model, x)
        logits = net(z)
        (grad,) = torch.autograd.grad(explained_scalar(logits, y, self.target, self.loss), z, create_graph=True)
        return self.loss_fn(logits, y), rrr_penalty(grad, mask)

