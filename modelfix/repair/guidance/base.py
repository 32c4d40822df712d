"""The one shape of a guided objective (captum's `Attribution`: one base, one verb).

An objective is called as `objective(model, batch) -> (loss, parts)` by `modelfix.training.train`. Subclasses write
`terms(model, batch) -> (task, penalty)`, both differentiable; the base adds them as `task + weight·penalty`, where
the weight is the attribute named by `weight_attr` (None: the penalty is already weighted, as IBP-Ex's and
CRAYON-ATTENTION's). `parts` carries "task" and "penalty" for the log.
"""

from __future__ import annotations

import torch
from torch import nn


class GuidedObjective:
    name = ""
    paper = ""
    defaults: dict = {}
    weight_attr: str | None = "lam"

    @classmethod
    def create(cls, model: nn.Module, loss: str = "ce", **hyperparameters) -> "GuidedObjective":
        """The registry's builder; objectives that need the model at construction override it."""
        return cls(loss=loss, **hyperparameters)

    def describe(self) -> dict:
        return {"name": self.name, "paper": self.paper,
                "hyperparameters": {key: getattr(self, key) for key in self.defaults if hasattr(self, key)}}

    def terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        task, penalty = self.terms(model, batch)
        weight = getattr(self, self.weight_attr) if self.weight_attr else 1.0
        return task + weight * penalty, {"task": float(task.detach()), "penalty": float(penalty.detach())}
