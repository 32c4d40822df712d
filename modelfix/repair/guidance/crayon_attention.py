"""CRAYON-ATTENTION (methods_posthoc.md §6.2, §6.6): fine-tune with yes/no/maybe feedback on saliency maps.

M_n is the original model's normalised true-class Grad-CAM (or input-gradient map for MLPs), computed once at
construction and frozen; M'_n is the same map of the model being trained, differentiable in θ (double backprop).
Feedback "yes" (set R) asks the model to keep attending where it did, "no" (set I) to look elsewhere, "maybe" adds
only the task loss. The preprint's objective over a batch B is

    L_map = Σ_n CE_n + α Σ_{n∈R} Σ_hw M'_n (1 − M_n) + β Σ_{n∈I} Σ_hw M'_n M_n

and this objective returns it DIVIDED BY |B|, so that it is on the training loop's batch-mean scale:
task = mean_n CE_n, penalty = (α Σ_R L_rel + β Σ_I L_irrel)/|B|. α and β are the weights (no extra λ).

`variant="normalized"` is the released (BigData'24) code's loss, not the preprint's:
L_rel = Σ M'(1−M)/Σ(1−M), L_irrel = Σ M'M/ΣM, CE summed, and α, β divided by the number of yes / no verdicts in
the whole feedback set. Only the frozen original map M is max-normalised there; the current map M' is the raw
Grad-CAM (or input-gradient map), so the loss scales with the logits (scale the head by c and the map terms scale by
c), and the released α, β are calibrated to that scale; it too is divided by |B| here (under Adam only the effective weight decay changes). A map
term whose denominator is 0 (M ≡ 1 for L_rel, which happens when the original map was all zero) is 0, since its
numerator is 0 too.

The task loss comes from the normal training-mode forward pass, the maps from a second pass in eval mode; a batch
with nothing to penalise (no "yes" with α > 0, no "no" with β > 0) skips the double-backprop pass (penalty exactly 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modelfix.errors import ModelfixError
from modelfix.explain.gradcam import normalise_maps, saliency_maps
from modelfix.precision import full_precision
from modelfix.repair.guidance.base import GuidedObjective
from modelfix.repair.guidance.rrr import check_weight
from modelfix.repair.registry import objective
from modelfix.training import task_loss

PAPER = ('CRAYON preprint, "Towards Mitigating Spurious Correlations in Image Classifiers with Simple Yes-no '
         'Feedback" (released code: poloclub/crayon, IEEE BigData 2024)')
VARIANTS = ("preprint", "normalized")
VERDICTS = ("yes", "no", "maybe")


def _model_tensor(model: nn.Module) -> Tensor:
    return next(iter(model.parameters()), torch.zeros(()))


def frozen_maps(model: nn.Module, data, layer: str | None = None, batch_size: int = 256) -> Tensor:
    """normalise_maps(saliency_maps(model, data.x, data.y, layer)) for every item, N×h×w on the CPU (no graph)."""
    ref = _model_tensor(model)
    maps = [normalise_maps(saliency_maps(model, batch["x"].to(ref.device, ref.dtype), batch["y"].to(ref.device),
                                         layer)).cpu()
            for batch in data.batches(batch_size)]
    if not maps:
        raise ModelfixError("crayon-attention needs at least one training item")
    return torch.cat(maps)


def map_terms(current: Tensor, original: Tensor, variant: str) -> tuple[Tensor, Tensor]:
    """(L_rel, L_irrel) per item for current maps M' and frozen normalised maps M (both N×h×w), module docstring;
    M' is normalised for the preprint variant and raw for the released one (the caller's job)."""
    rel = (current * (1 - original)).sum(dim=(1, 2))
    irrel = (current * original).sum(dim=(1, 2))
    if variant == "normalized":
        rel_mass, irrel_mass = (1 - original).sum(dim=(1, 2)), original.sum(dim=(1, 2))
        rel = torch.where(rel_mass > 0, rel / torch.where(rel_mass > 0, rel_mass, 1), torch.zeros_like(rel))
        irrel = torch.where(irrel_mass > 0, irrel / torch.where(irrel_mass > 0, irrel_mass, 1), torch.zeros_like(irrel))
    return rel, irrel


@objective("CE + α·attention of yes-samples outside their original map + β·attention of no-samples inside it",
           defaults={"alpha": 0.0, "beta": 30.0, "variant": "preprint", "layer": None, "data": None, "verdicts": None},
           needs=("data", "sample_feedback"), weight="beta",
           train_defaults={"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4})
class CrayonAttention(GuidedObjective):
    """Objective `task + penalty` of CRAYON-ATTENTION (module docstring) for the items of `data`, whose per-item
    `verdicts` ("yes" / "no" / "maybe", data order) select the map terms; batches are matched by `batch["index"]`."""

    name = "crayon-attention"
    paper = PAPER
    defaults = {"alpha": 0.0, "beta": 30.0, "variant": "preprint", "layer": None}
    weight_attr = None  # α and β are inside the penalty

    @classmethod
    def create(cls, model: nn.Module, loss: str = "ce", **hyperparameters) -> "CrayonAttention":
        return cls(model=model, loss=loss, **hyperparameters)  # the original maps are computed on the model

    def __init__(self, model: nn.Module, data=None, verdicts: Sequence[str] | None = None, alpha: float = 0.0,
                 beta: float = 30.0, variant: str = "preprint", layer: str | None = None, loss: str = "ce",
                 batch_size: int = 256):
        if verdicts is None or data is None:
            raise ModelfixError("crayon-attention needs --feedback", hint="a samples.csv of yes/no/maybe verdicts per "
                                "training image (`modelfix feedback saliency` writes a blank one)")
        if variant not in VARIANTS:
            raise ModelfixError(f"crayon-attention variant must be one of {', '.join(VARIANTS)}, not '{variant}'")
        verdicts = [str(v) for v in verdicts]
        if len(verdicts) != len(data):
            raise ModelfixError(f"crayon-attention got {len(verdicts)} verdicts for {len(data)} training items",
                                hint="the feedback must hold one verdict per training image (missing = maybe)")
        bad = sorted(set(verdicts) - set(VERDICTS))
        if bad:
            raise ModelfixError(f"crayon-attention verdicts must be yes, no or maybe, not '{bad[0]}'")
        self.alpha = check_weight(alpha, "crayon-attention alpha")
        self.beta = check_weight(beta, "crayon-attention beta")
        self.variant, self.layer, self.loss = variant, layer, loss
        self.loss_fn = task_loss(loss)
        self.yes = torch.tensor([v == "yes" for v in verdicts], dtype=torch.bool)
        self.no = torch.tensor([v == "no" for v in verdicts], dtype=torch.bool)
        self.labels = data.y.clone()
        if variant == "normalized":  # released code: weights per verdict, over the whole feedback set
            self.alpha_eff = self.alpha / max(int(self.yes.sum()), 1)
            self.beta_eff = self.beta / max(int(self.no.sum()), 1)
        else:
            self.alpha_eff, self.beta_eff = self.alpha, self.beta
        self.maps = frozen_maps(model, data, layer, batch_size)

    def describe(self) -> dict:
        return {"name": self.name, "paper": self.paper,
                "hyperparameters": {"alpha": self.alpha, "beta": self.beta, "variant": self.variant,
                                    "layer": self.layer},
                "feedback": {"yes": int(self.yes.sum()), "no": int(self.no.sum()),
                             "maybe": int(len(self.yes) - self.yes.sum() - self.no.sum())}}

    def _select(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        index = batch["index"].cpu().long()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self.yes)):
            raise ModelfixError("crayon-attention got a batch index outside its feedback set (another dataset?)")
        if not torch.equal(self.labels[index], batch["y"].cpu().long()):
            raise ModelfixError("crayon-attention's batch labels differ from those of its feedback set; the "
                                "objective must train on the data it was built with")
        return index, self.yes[index], self.no[index]

    def terms(self, model: nn.Module, batch: dict) -> tuple[Tensor, Tensor]:
        """(task, penalty), both differentiable, on the batch-mean scale (module docstring)."""
        index, yes, no = self._select(batch)
        x, y = batch["x"], batch["y"]
        task = self.loss_fn(model(x), y)
        use_yes = yes if self.alpha > 0 else torch.zeros_like(yes)
        use_no = no if self.beta > 0 else torch.zeros_like(no)
        if not bool(use_yes.any() or use_no.any()):
            return task, task.new_zeros(())
        with full_precision(x.device):  # Grad-CAM's gradient is differentiated again: float32 under autocast
            current = saliency_maps(model, x, y, self.layer, create_graph=True)
        if self.variant == "preprint":  # the released code leaves M' raw (module docstring)
            current = normalise_maps(current)
        original = self.maps[index].to(current.device, current.dtype)
        if current.shape != original.shape:
            raise ModelfixError(f"crayon-attention maps changed shape ({tuple(original.shape[1:])} → "
                                f"{tuple(current.shape[1:])}); the data or layer differs from construction")
        rel, irrel = map_terms(current, original, self.variant)
        device = rel.device
        penalty = (self.alpha_eff * rel[use_yes.to(device)].sum() + self.beta_eff * irrel[use_no.to(device)].sum())
        return task, penalty / len(y)

