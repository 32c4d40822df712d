"""Rand-R4, Adv-R4 and the Smooth-RRR baseline of R4 ("Robustly Right for the Right Reasons"; reference code
Mihneaghitu/ModelGuidanceViaRobustFeatureAttribution), as the paper intends them (methods_guided_finetunes.md §2.1,
§2.5, §7 items 3, 4 and 8).

R4 asks the explanation to stay off the spurious pixels everywhere in the masked box around x:

    min_θ  CE(f(x), y) + λ · max_{x' ∈ B_ε^M(x)} J(x'),     J(x') = ‖M ⊙ ∇_z ℓ(x', y)‖²,
    B_ε^M(x) = {x' : |x' − x| ≤ ε·M}                          (only the spurious pixels move, by at most ε)

with ℓ the per-example task loss of the true label (R4's explanation, RRR target "loss") and z = (x' − mean)/std
the network input, as in rrr.py. The three objectives differ in how they reach the max:

- `R4Rand` (Rand-R4): max over n draws δ_s ~ U(−ε, ε)·M (two-sided, masked): mean_b max_s J_b(x_b + δ_s);
- `R4Adv` (Adv-R4): PGD *on J itself* (sign steps of ε/4, projection onto the box; each step a Hessian-vector
  product, taken without create_graph and with the iterate detached), then J at the adversarial point;
- `SmoothRRR` (Smooth-RRR, R4's baseline): the RRR penalty of the SmoothGrad-style mean gradient over n noisy copies
  with noise on the whole image, δ_s ~ U(−ε, ε) on every pixel: mean_b ‖M ⊙ mean_s ∇_z ℓ(x_b + δ_s, y_b)‖² (R4's
  App. C, "mean of the gradients", and the repo's code average the gradients before taking the norm).

These are NOT the R4 repository's variants, which are inert or negligible (§2.4, §6 items 12 and 14): its Adv-R4
ascends the task CE with step ε and builds the penalty from `.grad.data` (no gradient reaches θ); its Rand-R4 and
Smooth-RRR draw one-sided U(0, ε) noise and penalise the change |g_s − g_clean| of the batch-mean CE gradient,
scaled to ≈1e-7. Here every penalty is differentiable in θ (double backprop, `create_graph=True`, checked against
finite differences) and penalises the gradient's magnitude, as the paper describes.

Norm: squared L2, summed over the masked elements of the C×H×W gradient, per example; batch mean over all N items
(items without a mask add exactly 0). The repo uses L1 (Adv-R4, Cert-R4) or unsquared L2 divided by the number of
masked pixels (Rand, Smooth); the paper writes a generic norm. Squared L2 is smooth (the unsquared norm and L1 have
kinks, at a zero gradient for the former), which keeps PGD's Hessian-vector steps and the finite-difference tests
well defined, matches Ross et al.'s RRR, and leaves Rand-R4's argmax unchanged (max of squares = square of max).
There is no mask renormalisation (unlike rrr.py's TAP reduction): a box over more pixels is a larger constraint.

Input gradients are taken in eval mode (rrr.py, §6 item 6); the task loss comes from the training-mode forward pass.
ε is in pixel units (the box lives in x, the gradient in z); R4's inputs are x/255 with no standardisation, so its
ε carry over to [0,1] data. Adv-R4's PGD returns the best iterate per example (`pgd_in_box`), never worse than x.
Defaults are R4's DecoyMNIST values (§2.7): Rand-R4 ε 0.5, λ 15, n 10; Adv-R4 ε 0.5, λ 14, 10 steps; Smooth-RRR
ε 0.1, λ 10, n 7. R4's λ were tuned against a double-softmax task loss and the repo's tiny normalised terms, so they
are starting points, not calibrated values, for this single-softmax CE and un-normalised squared norm. Cost:
Rand-R4 and Smooth-RRR ≈ n× RRR (the copies run as one batch, memory n×), Adv-R4 ≈ (steps + 2)× RRR (§5).
"""

from __future__ import annotations

import torch
from torch import nn

from modelfix.precision import full_precision
from modelfix.repair.guidance.base import GuidedObjective
from modelfix.repair.guidance.pgd_ex import check_count, check_eps, check_step_size, pgd_in_box
from modelfix.repair.guidance.rrr import check_weight, eval_mode, explained_scalar, pixel_mask
from modelfix.repair.registry import objective
from modelfix.training import task_loss

PAPER = 'R4, "Robustly Right for the Right Reasons" (code: Mihneaghitu/ModelGuidanceViaRobustFeatureAttribution)'


def masked_uniform(x: torch.Tensor, mask: torch.Tensor, eps: float, n: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """n perturbations δ_s = U(−ε, ε) ⊙ mask, shape n × x.shape; `mask` broadcasts to x (all ones: whole image)."""
    device = generator.device if generator is not None else x.device
    u = torch.rand((n, *x.shape), generator=generator, dtype=x.dtype, device=device).to(x.device)
    return (2 * u - 1) * eps * mask.to(x.dtype)


def _differentiable_input(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """(net, z) like rrr.network_input, but z stays differentiable in x when x requires grad (PGD on J needs
    ∂J/∂x'); otherwise z is a fresh leaf that requires grad."""
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and hasattr(model, "mean") and hasattr(model, "std"):
        z = (x - model.mean.to(x.dtype)) / model.std.to(x.dtype)
    else:
        net, z = model, x
    return net, (z if z.requires_grad else z.detach().requires_grad_(True))


def masked_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                     loss: str = "ce") -> torch.Tensor:
    """M_b ⊙ ∂ℓ(x_b, y_b)/∂z_b per example (N×C×H×W), `mask` N×H×W; eval mode, `create_graph=True`, so it is
    differentiable in θ and in x."""
    with eval_mode(model):
        net, z = _differentiable_input(model, x)
        (grad,) = torch.autograd.grad(explained_scalar(net(z), y, "loss", loss), z, create_graph=True)
    return mask[:, None] * grad


def masked_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                          loss: str = "ce") -> torch.Tensor:
    """J_b = ‖M_b ⊙ ∂ℓ(x_b, y_b)/∂z_b‖² per example (N,), `mask` N×H×W; differentiable in θ and in x."""
    return masked_gradients(model, x, y, mask, loss).pow(2).flatten(1).sum(dim=1)


class _R4Objective(GuidedObjective):
    """Shared plumbing: `task + λ·penalty`; subclasses define `masked_penalty` on the items that have a mask."""

    name = ""
    paper = PAPER
    defaults: dict = {}

    def __init__(self, lam: float, eps: float, loss: str):
        self.lam = check_weight(lam, f"{self.name} lam")
        self.eps = check_eps(eps)
        self.loss = loss
        self.loss_fn = task_loss(loss)


    def masked_penalty(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Σ_b of the per-example penalty over the given (masked) items."""
        raise NotImplementedError

    def penalty(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The batch mean over all N items; items without a mask are skipped (they add exactly 0). In float32 under
        autocast: every term here is an input gradient differentiated again (and Adv-R4's PGD steps are Hessian-vector
        products)."""
        x, y = batch["x"], batch["y"]
        mask = pixel_mask(batch, x.dtype)
        keep = mask.flatten(1).any(dim=1)
        if not bool(keep.any()):  # nothing to penalise: skip the double-backprop passes (exactly 0)
            return x.new_zeros(())
        with full_precision(x.device):
            return self.masked_penalty(model, x[keep], y[keep], mask[keep]) / x.shape[0]

    def terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(task, penalty), both differentiable in θ."""
        return self.loss_fn(model(batch["x"]), batch["y"]), self.penalty(model, batch)


def _on_copies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, deltas: torch.Tensor,
               loss: str) -> torch.Tensor:
    """J at every copy x + δ_s, shape n × N, from one batch of n·N (eval mode: the copies do not interact)."""
    n = deltas.shape[0]
    copies = (x.unsqueeze(0) + deltas).flatten(0, 1)
    norms = masked_gradient_norms(model, copies, y.repeat(n), mask.repeat(n, 1, 1), loss)
    return norms.view(n, x.shape[0])


@objective("penalise the largest masked input gradient over n random masked-box points", needs_masks=True,
           weight="lam", train_defaults={"optimizer": "adam", "lr": 1e-3})
class R4Rand(_R4Objective):
    """Rand-R4: λ · mean_b max_{s ≤ n} ‖M ⊙ ∇ℓ(x_b + δ_s)‖², δ_s ~ U(−ε, ε)·M (module docstring)."""

    name = "r4-rand"
    defaults = {"lam": 15.0, "eps": 0.5, "samples": 10}

    def __init__(self, lam: float = 15.0, eps: float = 0.5, samples: int = 10, loss: str = "ce",
                 generator: torch.Generator | None = None):
        super().__init__(lam, eps, loss)
        self.samples = check_count(samples, "--samples")
        self.generator = generator  # None: the global torch RNG (seeded by the training run)

    def masked_penalty(self, model, x, y, mask):
        deltas = masked_uniform(x, mask[:, None], self.eps, self.samples, self.generator)
        return _on_copies(model, x, y, mask, deltas, self.loss).amax(dim=0).sum()


@objective("penalise masked input gradients averaged over noisy copies of the image", needs_masks=True,
           weight="lam", train_defaults={"optimizer": "adam", "lr": 1e-3})
class SmoothRRR(_R4Objective):
    """Smooth-RRR: λ · mean_b ‖M ⊙ mean_{s ≤ n} ∇ℓ(x_b + δ_s)‖², δ_s ~ U(−ε, ε) on every pixel (module docstring).

    The norm of the averaged (SmoothGrad) gradient, as R4's App. C and code; before issue 18 this was the mean of the
    per-copy squared norms, which is larger (Jensen) and penalises each copy's noise, not the smoothed explanation."""

    name = "smooth-rrr"
    paper = PAPER + ", Smooth-RRR baseline (SmoothGrad noise on the whole image)"
    defaults = {"lam": 10.0, "eps": 0.1, "samples": 7}

    def __init__(self, lam: float = 10.0, eps: float = 0.1, samples: int = 7, loss: str = "ce",
                 generator: torch.Generator | None = None):
        super().__init__(lam, eps, loss)
        self.samples = check_count(samples, "--samples")
        self.generator = generator

    def masked_penalty(self, model, x, y, mask):
        deltas = masked_uniform(x, torch.ones_like(x), self.eps, self.samples, self.generator)
        n = deltas.shape[0]
        copies = (x.unsqueeze(0) + deltas).flatten(0, 1)  # one batch of n·N (eval mode: the copies do not interact)
        grads = masked_gradients(model, copies, y.repeat(n), mask.repeat(n, 1, 1), self.loss)
        return grads.view(n, *x.shape).mean(dim=0).pow(2).flatten(1).sum(dim=1).sum()


@objective("penalise the masked input gradient at a PGD worst case in the masked box", needs_masks=True,
           weight="lam", train_defaults={"optimizer": "adam", "lr": 2e-3})
class R4Adv(_R4Objective):
    """Adv-R4: λ · mean_b ‖M ⊙ ∇ℓ(x_b*)‖², x_b* = PGD maximising that same norm in the masked box (module docstring).

    x* is a constant of the step (as in adversarial training): by Danskin's theorem the gradient of the max is the
    gradient at the maximiser, and x* is piecewise constant in θ (sign steps), so the penalty's θ-gradient is that
    of J at x*."""

    name = "r4-adv"
    defaults = {"lam": 14.0, "eps": 0.5, "steps": 10, "step_size": None}

    def __init__(self, lam: float = 14.0, eps: float = 0.5, steps: int = 10, step_size: float | None = None,
                 loss: str = "ce"):
        super().__init__(lam, eps, loss)
        self.steps = check_count(steps, "--steps")
        self.step_size = self.eps / 4 if step_size is None else check_step_size(step_size, self.eps, self.steps)

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x* for masked items (`mask` N×H×W): sign-PGD on J_b, start at x (R4's PGD has no random start)."""
        return pgd_in_box(lambda point: masked_gradient_norms(model, point, y, mask, self.loss),
                          x, mask[:, None], self.eps, self.steps, self.step_size)

    def masked_penalty(self, model, x, y, mask):
        return masked_gradient_norms(model, self.adversarial(model, x, y, mask), y, mask, self.loss).sum()
