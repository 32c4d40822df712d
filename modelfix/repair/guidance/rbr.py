"""RBR, "Right for Better Reasons" (Shao et al., AAAI 2021), as TAP implements it but with the influence term
computed in full (methods_guided_finetunes.md §1.4, §6 item 5, §7 item 12).

    L_RBR = Σ_{b,i} (M_bi · g_bi · IF_bi)²          batch SUM, no mask renormalisation (as TAP)

- g = Σ_c ∂(Σ_k log p_k)/∂z, RRR's `log-prob-sum` input gradient in eval mode (rrr.py: from the training pass on a
  mode-invariant model, else from a second pass);
- IF = Σ_c ∂/∂z [ Σ_{every parameter entry p} ∂L_task/∂θ_p ], a cheap scalarisation of the influence function,
  where L_task is the batch-mean task loss of the training-mode forward pass (the same one the task term uses).

TAP's reference code builds L_task *before* marking the input as requiring grad, so only the explicit appearance
of x in the first layer's weight gradient reaches x and every path through the activations is lost (§1.4: −0.276
instead of −14.44 in a float64 directional check). Here z requires grad before the forward pass that builds
L_task, so IF is the full derivative (tests check it against finite differences). Note that for softmax CE,
Σ_k (p_k − y_k) = 0: the last layer's bias gradients contribute exactly 0 to the scalar.

Default λ = 3, not TAP's 1e4: TAP's λ was tuned for its truncated influence term; with the full term the squared
penalty is about 2,700× larger and λ = 1e4 diverges (NaN at epoch 2 of `bench tap-mnist`), while λ = 3 trains
(docs/methods/rbr.md).

Cost: double backprop for g plus a third-order backprop for IF: measured 6.4–7.8× ERM (`bench cost`); TAP's code,
which drops most of the third-order graph, 5.5×.
"""

from __future__ import annotations

import torch
from torch import nn

from modelfix.errors import UnsupportedModel
from modelfix.precision import full_precision
from modelfix.repair.guidance.base import GuidedObjective
from modelfix.repair.guidance.rrr import (TAP_SETUP, check_weight, explained_scalar, input_gradient, mode_invariant,
                                          network_input, pixel_mask)
from modelfix.repair.registry import objective
from modelfix.training import task_loss

PAPER = ('Shao, Skryagin, Stammer, Schramowski, Kersting, AAAI 2021, "Right for Better Reasons: Training '
         'Differentiable Models by Constraining their Influence Functions"')


def influence_input_gradient(task: torch.Tensor, z: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """∂/∂z [Σ_p Σ_entries ∂task/∂θ_p] (shape of z), differentiable in θ. `z` must have required grad before the
    forward pass that built `task`, else only explicit uses of z in the parameter gradients are seen (TAP's bug)."""
    grads = torch.autograd.grad(task, params, create_graph=True, allow_unused=True)
    total = sum(grad.sum() for grad in grads if grad is not None)
    if not isinstance(total, torch.Tensor) or not total.requires_grad:
        return torch.zeros_like(z)
    (influence,) = torch.autograd.grad(total, z, create_graph=True, allow_unused=True)
    return torch.zeros_like(z) if influence is None else influence


def rbr_penalty(grad: torch.Tensor, influence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{b,i} (M_bi g_bi IF_bi)² with g, IF summed over channels (N×C×H×W → N×H×W) and mask N×H×W."""
    return (mask * grad.sum(dim=1) * influence.sum(dim=1)).pow(2).sum()


@objective("penalise input gradient × influence on the spurious mask (6.4–7.8× ERM measured)", needs_masks=True,
           weight="lam", train_defaults=TAP_SETUP)
class RBR(GuidedObjective):
    """Objective `task + λ·L_RBR` (module docstring); the task term and IF share the training-mode forward pass."""

    name = "rbr"
    paper = PAPER
    defaults = {"lam": 3.0}

    def __init__(self, lam: float = 3.0, loss: str = "ce"):
        self.lam = check_weight(lam, "RBR lam")
        self.loss = loss
        self.loss_fn = task_loss(loss)


    def terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(task, penalty), both differentiable; in float32 under autocast (the task pass is also the one the
        third-order influence term differentiates, so it cannot stay 16-bit)."""
        with full_precision(batch["x"].device):
            return self._terms(model, batch)

    def _terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch["x"], batch["y"]
        mask = pixel_mask(batch, x.dtype)
        net, z = network_input(model, x)  # z requires grad before the forward pass that builds the task loss
        logits = net(z)
        task = self.loss_fn(logits, y)
        if bool(mask.any()):
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
                # torch has no third-order derivative of train-mode batch norm; fail in one line, not deep in autograd
                raise UnsupportedModel("RBR needs third-order gradients, which BatchNorm in training mode lacks",
                                       hint="freeze BatchNorm (TrainConfig freeze_bn=True) or use another method")
            params = [p for p in model.parameters() if p.requires_grad]
            influence = influence_input_gradient(task, z, params)
            if mode_invariant(model):  # the training pass is the eval pass: reuse it for g (rrr.py)
                (grad,) = torch.autograd.grad(explained_scalar(logits, y, "log-prob-sum"), z, create_graph=True)
            else:
                grad = input_gradient(model, x, y, "log-prob-sum", self.loss)
            penalty = rbr_penalty(grad, influence, mask)
        else:  # nothing to penalise: skip the third-order pass (exactly 0)
            penalty = x.new_zeros(())
        return task, penalty

