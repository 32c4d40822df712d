"""The method registry: every repair method modelfix knows, what it is, where it comes from, its hyper-parameters.

`finetune` methods are training objectives for `modelfix.training.train` (`build(model, loss, **hp) -> objective`,
with `train_defaults` overriding `TrainConfig` fields); `posthoc` methods are listed here for `modelfix methods`
and run through their own commands (`prune-egem`, `refit`). Later methods join with `register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from modelfix.errors import ModelfixError
from modelfix.repair.guidance import RBR, RRR, TAP, L2Objective
from modelfix.repair.guidance.certified import CertR4, IBPEx
from modelfix.repair.guidance.crayon_attention import CrayonAttention
from modelfix.repair.guidance.pgd_ex import PGDEx
from modelfix.repair.guidance.r4 import R4Adv, R4Rand, SmoothRRR
from modelfix.training import TaskObjective

EGEM_PAPER = ('Linhardt, Müller, Montavon 2023/24, "Preemptively Pruning Clever-Hans Strategies in Deep Neural '
              'Networks"')


@dataclass(frozen=True)
class Method:
    """One registry entry. `hyperparameters` maps each name `build` accepts to its default."""

    name: str
    kind: str  # "posthoc" | "finetune"
    summary: str
    paper: str
    hyperparameters: dict
    needs_masks: bool = False
    weight: str | None = None  # the hyper-parameter `--lambda` sets (None: the method has no weight to sweep)
    train_defaults: dict = field(default_factory=dict)  # TrainConfig overrides
    build: Callable[..., object] | None = None  # finetune: build(model, loss="ce", **hyperparameters) -> objective


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to METHODS (a name can be registered once) and return it."""
    if method.kind not in ("posthoc", "finetune"):
        raise ModelfixError(f"method kind must be 'posthoc' or 'finetune', not '{method.kind}'")
    if method.kind == "finetune" and method.build is None:
        raise ModelfixError(f"finetune method '{method.name}' needs a build function")
    if method.name in METHODS:
        raise ModelfixError(f"method '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The entry for `name`; an unknown name raises ModelfixError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ModelfixError(f"unknown method '{name}'", hint=f"use one of: {', '.join(METHODS)}") from None


def make_objective(name: str, model: nn.Module, loss: str = "ce", **hparams) -> object:
    """The training objective of finetune method `name` on `model`: defaults overridden by `hparams`."""
    method = get_method(name)
    if method.build is None:
        raise ModelfixError(f"'{name}' is a post-hoc method, not a fine-tune; it has no training objective",
                            hint=f"fine-tunes: {', '.join(n for n, m in METHODS.items() if m.kind == 'finetune')}")
    unknown = [key for key in hparams if key not in method.hyperparameters]
    if unknown:
        valid = ", ".join(method.hyperparameters) or "none"
        raise ModelfixError(f"method '{name}' has no hyper-parameter '{unknown[0]}'", hint=f"valid: {valid}")
    return method.build(model, loss=loss, **{**method.hyperparameters, **hparams})


# ---------------------------------------------------------------------------------------------------------------
# post-hoc (methods_posthoc.md)

_EGEM_HP = {"alpha": None, "slack": 0.05, "slack_mode": "relative", "schedule": "triangular", "layers": None,
            "samples_per_class": 700}
_REFIT_HP = {"lam": None, "slack": 0.05, "slack_mode": "relative", "samples_per_class": 700}
for _method in (
    Method("egem", "posthoc", "scale each unit by E[a²]/(E[a²]+λ) on verified clean samples (Eq. 5)", EGEM_PAPER,
           dict(_EGEM_HP)),
    Method("pca-egem", "posthoc", "shrink PCA directions of the activations by σ²/(σ²+λ) (Eq. 6)", EGEM_PAPER,
           {**_EGEM_HP, "conv_mode": "sum"}),
    Method("egem-full", "posthoc", "EXPERIMENTAL: explanation-weighted per-weight soft pruning (Eq. 4)", EGEM_PAPER,
           {**_EGEM_HP, "explainer": "gi"}),
    Method("rgem", "posthoc", "ridge refit of the last linear layer to the original logits (Supp. D)", EGEM_PAPER,
           dict(_REFIT_HP)),
    Method("ridge", "posthoc", "ridge refit of the last linear layer to one-hot labels (§4.2)", EGEM_PAPER,
           dict(_REFIT_HP)),
):
    register(_method)

# ---------------------------------------------------------------------------------------------------------------
# fine-tunes (methods_guided_finetunes.md); every objective is `task + λ·penalty`

register(Method("erm", "finetune", "plain fine-tune on the task loss", "empirical risk minimisation (baseline)", {},
                build=lambda model, loss="ce": TaskObjective(loss)))
register(Method("retrain", "finetune",
                "EGEM's Retrain baseline: task loss, Adam, frozen BatchNorm, grad-norm clip 1e-3",
                EGEM_PAPER + ", Supp. F.3", {},
                train_defaults={"optimizer": "adam", "grad_clip": 1e-3, "freeze_bn": True},
                build=lambda model, loss="ce": TaskObjective(loss)))
register(Method("erm-l2", "finetune", "task loss + (l2/2)·Σθ², the honest baseline for the mask methods",
                L2Objective.paper, dict(L2Objective.defaults), weight="l2",
                build=lambda model, loss="ce", **hp: L2Objective(loss=loss, **hp)))
# TAP §1.6: SGD with momentum 0.9 (the paper's "weight decay 0.9"), lr 1e-3, for TAP, RRR and RBR alike.
_TAP_SETUP = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9}
register(Method("tap", "finetune", "penalise conv activations under the (progressively downscaled) spurious mask",
                TAP.paper, dict(TAP.defaults), needs_masks=True, weight="lam", train_defaults=dict(_TAP_SETUP),
                build=lambda model, loss="ce", **hp: TAP(loss=loss, model=model, **hp)))
register(Method("rrr", "finetune", "penalise input gradients on the spurious mask (double backprop, ≈3× ERM)",
                RRR.paper, dict(RRR.defaults), needs_masks=True, weight="lam", train_defaults=dict(_TAP_SETUP),
                build=lambda model, loss="ce", **hp: RRR(loss=loss, **hp)))
register(Method("rbr", "finetune", "penalise input gradient × influence on the spurious mask (6.4–7.8× ERM measured)",
                RBR.paper, dict(RBR.defaults), needs_masks=True, weight="lam", train_defaults=dict(_TAP_SETUP),
                build=lambda model, loss="ce", **hp: RBR(loss=loss, **hp)))

# CRAYON-ATTENTION (methods_posthoc.md §6.2, §6.6): `data` and `verdicts` (the yes/no/maybe feedback, one per
# training item) come in as hyper-parameters, so they are listed here with default None. --lambda sweeps β.
register(Method("crayon-attention", "finetune",
                "CE + α·attention of yes-samples outside their original map + β·attention of no-samples inside it",
                CrayonAttention.paper, {**CrayonAttention.defaults, "data": None, "verdicts": None},
                needs_masks=False, weight="beta", train_defaults={"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4},
                build=lambda model, loss="ce", **hp: CrayonAttention(model=model, loss=loss, **hp)))

# R4 family and PGD-Ex (methods_guided_finetunes.md §2.5, §3.3): the papers' objectives, not the R4 repo's inert
# variants. One source per method: the R4 methods (r4-*, smooth-rrr) take R4's DecoyMNIST table (§2.7; Adam, no
# weight decay); Heo's methods (pgd-ex, ibp-ex, ibp-ex-rrr) take Heo's (§3.4, §7 item 14; AdamW lr 3e-4, wd 1e-4).
_HEO_SETUP = {"optimizer": "adamw", "lr": 3e-4, "weight_decay": 1e-4}

register(Method("r4-rand", "finetune", "penalise the largest masked input gradient over n random masked-box points",
                R4Rand.paper, dict(R4Rand.defaults), needs_masks=True, weight="lam",
                train_defaults={"optimizer": "adam", "lr": 1e-3},
                build=lambda model, loss="ce", **hp: R4Rand(loss=loss, **hp)))
register(Method("r4-adv", "finetune", "penalise the masked input gradient at a PGD worst case in the masked box",
                R4Adv.paper, dict(R4Adv.defaults), needs_masks=True, weight="lam",
                train_defaults={"optimizer": "adam", "lr": 2e-3},
                build=lambda model, loss="ce", **hp: R4Adv(loss=loss, **hp)))
register(Method("smooth-rrr", "finetune", "penalise masked input gradients averaged over noisy copies of the image",
                SmoothRRR.paper, dict(SmoothRRR.defaults), needs_masks=True, weight="lam",
                train_defaults={"optimizer": "adam", "lr": 1e-3},
                build=lambda model, loss="ce", **hp: SmoothRRR(loss=loss, **hp)))
register(Method("pgd-ex", "finetune", "adversarial training on the task loss inside the masked box (PGD, ≈5.5× ERM)",
                PGDEx.paper, dict(PGDEx.defaults), needs_masks=True, weight="lam",
                train_defaults=dict(_HEO_SETUP),
                build=lambda model, loss="ce", **hp: PGDEx(loss=loss, **hp)))
register(Method("r4-cert", "finetune", "penalise sound interval bounds on the masked input gradient over x ± ε·M",
                CertR4.paper, dict(CertR4.defaults), needs_masks=True, weight="lam",
                train_defaults={"optimizer": "adam", "lr": 1e-3},
                build=lambda model, loss="ce", **hp: CertR4(loss=loss, **hp)))
register(Method("ibp-ex", "finetune", "α·CE + (1 − α)·CE of the worst-case logits over x ± ε·M (interval bounds)",
                IBPEx.paper, dict(IBPEx.defaults), needs_masks=True, weight=None,
                train_defaults=dict(_HEO_SETUP),
                build=lambda model, loss="ce", **hp: IBPEx(loss=loss, **hp)))
register(Method("ibp-ex-rrr", "finetune", "IBP-Ex plus λ·L1 of the masked gradient of the logit sum (Heo's combination)",
                IBPEx.paper, {**IBPEx.defaults, "rrr": 1.0}, needs_masks=True, weight="rrr",
                train_defaults=dict(_HEO_SETUP),
                build=lambda model, loss="ce", **hp: IBPEx(loss=loss, **hp)))
