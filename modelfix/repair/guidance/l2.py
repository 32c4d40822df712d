"""ERM + L2: the honest baseline for the mask methods (methods_guided_finetunes.md §7 item 10).

    L = task + (l2/2)·Σ_θ θ²          over every trainable parameter (requires_grad), biases included

R4's baselines fold a weight penalty of 1e-3 to 1.5e-3 into their "regulariser", and on DecoyMNIST that penalty is
all that trains (§6 item 12); without this baseline a mask method's gain cannot be told apart from plain
regularisation. The term is explicit, not optimiser weight decay, so it behaves the same under SGD, Adam and AdamW.
"""

from __future__ import annotations

import torch
from torch import nn

from modelfix.repair.guidance.base import GuidedObjective
from modelfix.repair.guidance.rrr import check_weight
from modelfix.repair.registry import objective
from modelfix.training import task_loss

PAPER = "baseline (no paper): ERM with an explicit L2 penalty, the effective regulariser of R4's DecoyMNIST baselines"


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """½ Σ θ² over the trainable parameters of `model` (0 when there are none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return torch.zeros(())
    return 0.5 * sum(p.pow(2).sum() for p in params)


@objective("task loss + (l2/2)·Σθ², the honest baseline for the mask methods", weight="l2")
class L2Objective(GuidedObjective):
    """Objective `task + l2·(½ Σ θ²)`; `parts["penalty"]` is ½ Σ θ²."""

    name = "erm-l2"
    paper = PAPER
    defaults = {"l2": 1e-3}
    weight_attr = "l2"

    def __init__(self, l2: float = 1e-3, loss: str = "ce"):
        self.l2 = check_weight(l2, "erm-l2 l2")
        self.loss_fn = task_loss(loss)


    def terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(task, penalty), both differentiable."""
        return self.loss_fn(model(batch["x"]), batch["y"]), l2_penalty(model)

