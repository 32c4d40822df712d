"""PGD-Ex (Heo et al. 2023, "Use Perturbations when Learning from Explanations"; methods_guided_finetunes.md
§3.3, §5), and `pgd_in_box`, the masked-box PGD that Adv-R4 (r4.py) shares.

PGD-Ex is adversarial training restricted to the spurious pixels: the worst case of the task loss over the box

    B_ε^M(x) = {x' : |x' − x| ≤ ε·M}          M = 1 on spurious pixels, so only those move (L∞ radius ε)

is found by PGD and trained on next to the clean loss:

    L = CE(x) + λ · (1/N) Σ_{b : |M_b| > 0} CE(x_b*),     x_b* ≈ argmax_{x' ∈ B_ε^M(x_b)} CE(x', y_b)

- Heo's code adds the two losses with no weight (λ = 1, the default here); the paper's Eq. 2 writes α·CE + (1−α)·CE_adv,
  which is the same objective as λ = (1−α)/α with the learning rate scaled by α. λ is exposed so `--lambda` sweeps it.
- PGD as in Heo's code: start at x (no random start), T = 7 sign-gradient steps of size ε/T, projected onto the box
  after every step, no clamp to the valid pixel range. The attack runs in eval mode (no BatchNorm statistics from
  adversarial batches, no dropout noise); Heo attacks in training mode. The loss on x* is a training-mode forward.
- ε is in pixel units here (the box lives in x, not in the network input). Heo's ε is in CIFAR-normalised units
  (std ≈ 0.2), so Heo's ε ∈ [0.03, 5] is ≈ [0.006, 1] in pixels; the default 0.5 matches R4's ε on [0,1] inputs.
- Items without a mask add exactly 0 to the adversarial term (their box is the point x, so Heo's code counts their
  clean loss twice); the term is still divided by the full batch size N.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelfix.errors import ModelfixError
from modelfix.precision import full_precision
from modelfix.repair.guidance.base import GuidedObjective
from modelfix.repair.guidance.rrr import check_weight, eval_mode, pixel_mask
from modelfix.repair.registry import objective
from modelfix.training import task_loss

PAPER = 'Heo et al. 2023, "Use Perturbations when Learning from Explanations" (PGD-Ex; code: vihari/robust_mlx)'


def check_eps(value: float, option: str = "--eps") -> float:
    """A box radius: finite and > 0, else one clear error naming the option."""
    try:
        eps = float(value)
    except (TypeError, ValueError):
        eps = float("nan")
    if not (math.isfinite(eps) and eps > 0):
        raise ModelfixError(f"{option} must be > 0, got {value!r}")
    return eps


def check_count(value: int, option: str) -> int:
    """A number of samples or steps: an integer >= 1 (an integral float such as 10.0 from a JSON card is accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ModelfixError(f"{option} must be an integer >= 1, got {value!r}")
    return int(value)


def check_step_size(value: float | None, eps: float, steps: int, option: str = "--step-size") -> float:
    """The PGD step: `value` if given (finite, > 0), else ε/steps (Heo)."""
    return eps / steps if value is None else check_eps(value, option)


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """The task loss of each example (N,); its batch mean is `task_loss(loss)(logits, y)`."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "double-softmax":  # R4's task loss (training.task_loss)
        return F.cross_entropy(F.softmax(logits, dim=1), y, reduction="none")
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)


def pgd_in_box(
    objective_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    random_start: bool = False,
) -> torch.Tensor:
    """Maximise `objective_fn` (x' ↦ per-example values, shape (N,), differentiable in x') over the box
    |x' − x| ≤ ε·mask by sign-gradient ascent: x' ← Proj_box(x' + step·mask·sign ∇_{x'} Σ_b J_b(x')).

    `mask` broadcasts to x (e.g. N×1×H×W); unmasked pixels stay exactly x. Start at x, or uniformly inside the box
    when `random_start` (drawn from `generator`). Returns the best iterate seen per example, the start included, so
    the result is never worse than the start (a fixed sign step can overshoot a maximum). Detached; no parameter
    gradients are accumulated (`torch.autograd.grad` w.r.t. x' only). The objective must not couple examples
    (run it in eval mode), since one backward of the sum gives every example's own gradient.
    """
    eps, steps = check_eps(eps), check_count(steps, "PGD steps")
    step = check_step_size(step_size, eps, steps)
    x = x.detach()
    radius = eps * mask.to(x.dtype).expand_as(x)
    low, high = x - radius, x + radius
    current = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype,
                           device=generator.device if generator is not None else x.device).to(x.device)
        current = torch.minimum(torch.maximum(x + (2 * noise - 1) * radius, low), high)
    best, best_value = current.clone(), None

    def keep_best(point: torch.Tensor, values: torch.Tensor) -> None:
        nonlocal best, best_value
        values = values.detach()
        if best_value is None:
            best, best_value = point.clone(), values
            return
        better = values > best_value
        best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), point, best)
        best_value = torch.where(better, values, best_value)

    with torch.enable_grad():
        for _ in range(steps):
            current = current.detach().requires_grad_(True)
            values = objective_fn(current)
            (grad,) = torch.autograd.grad(values.sum(), current)
            keep_best(current.detach(), values)
            moved = current.detach() + step * radius.sign() * grad.sign()
            current = torch.minimum(torch.maximum(moved, low), high)
        keep_best(current, objective_fn(current))
    return best.detach()


@objective("adversarial training on the task loss inside the masked box (PGD, ≈5.5× ERM)", needs_masks=True,
           weight="lam", train_defaults={"optimizer": "adamw", "lr": 3e-4, "weight_decay": 1e-4})  # Heo's
class PGDEx(GuidedObjective):
    """Objective `CE(x) + λ·CE(x*)` (module docstring); parts "task" = CE(x), "penalty" = the adversarial term."""

    name = "pgd-ex"
    paper = PAPER
    defaults = {"lam": 1.0, "eps": 0.5, "steps": 7, "step_size": None}

    def __init__(self, lam: float = 1.0, eps: float = 0.5, steps: int = 7, step_size: float | None = None,
                 loss: str = "ce"):
        self.lam = check_weight(lam, "PGD-Ex lam")
        self.eps = check_eps(eps)
        self.steps = check_count(steps, "--steps")
        self.step_size = check_step_size(step_size, self.eps, self.steps)
        self.loss = loss
        self.loss_fn = task_loss(loss)


    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x* for masked items (`mask` N×H×W): PGD on their per-example task loss, in eval mode; in float32 under
        autocast (a 16-bit gradient flips the sign of its small entries, and x* would not be the point fp32 finds)."""
        def objective(point: torch.Tensor) -> torch.Tensor:
            with eval_mode(model), full_precision(point.device):
                return per_example_loss(model(point), y, self.loss)

        return pgd_in_box(objective, x, mask[:, None], self.eps, self.steps, self.step_size)

    def penalty_at(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(1/N) Σ CE(x*_b) at given adversarial points, differentiable in θ (training-mode forward)."""
        return per_example_loss(model(x_adv), y, self.loss).sum() / batch_size

    def penalty(self, model: nn.Module, batch: dict) -> torch.Tensor:
        x, y = batch["x"], batch["y"]
        mask = pixel_mask(batch, x.dtype)
        keep = mask.flatten(1).any(dim=1)
        if not bool(keep.any()):  # nothing to attack: exactly 0, no extra passes
            return x.new_zeros(())
        x_adv = self.adversarial(model, x[keep], y[keep], mask[keep])
        return self.penalty_at(model, x_adv, y[keep], x.shape[0])

    def terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(task, penalty), both differentiable in θ (x* is a constant of the step, as in adversarial training)."""
        return self.loss_fn(model(batch["x"]), batch["y"]), self.penalty(model, batch)

