"""Layer-wise relevance propagation (LRP) heatmaps of a `Classifier`, through zennit (notes §1.5c, §8).

What is explained is `model.net` on the *normalised* input `z = (x − mean)/std`: the relevance then sits on pixel
positions and sums to the explained logit. (Explaining the `Classifier` itself would route the relevance through the
normalisation, whose gradient multiplies it by `1/std`.) The starting relevance is the target logit's value
(`attr_output = one_hot(target)·logits`), as the EGEM reference does.

Patches (`repair/patches.py`) run from forward hooks on modules of `net` but live in `model.patches`, outside `net`.
zennit assigns rules by walking a module tree, so it is handed a small view whose children are `net` and `patches`
(the same module objects): `ChannelScale` gets `Pass` and the PCA patches `Epsilon`. Without `Pass` a patch's scale
silently rescales the relevance (notes §2.4, §8.7: 0.70× the logit instead of 1.00×).

Pitfalls handled here (notes §8): eval mode for the call (BN folding uses running statistics; dropout off), with the
modules' own flags restored afterwards; no `no_grad`; in-place activations switched off for the call; rules and
canonizers registered in a `with` block so they go even on error; `zero_params='bias'` by default, which makes the
relevance conserved exactly (with biases it sums to about 0.96 of the logit).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelfix.data.dataset import Dataset
from modelfix.errors import ModelfixError, ModelfixWarning
from modelfix.progress import progress_bar
from modelfix.repair.patches import ChannelScale, PCAffine, PCASumRatio

# zennit is imported inside the functions that use it: importing it costs about 2 s (it imports torchvision).

# zennit's default ε of the Epsilon rule (and the stabiliser of the others).
EPSILON = 1e-6

# The LRP composites of zennit that take a `layer_map` (others, such as guided backprop, are not LRP).
COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_plus", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat")


class _Explained(nn.Module):
    """The tree zennit walks: `net` and the patch modules as children; its forward is `net(z)`.

    Adding existing modules as children of a new parent changes nothing in them or in the `Classifier`.
    """

    def __init__(self, net: nn.Module, patches: nn.Module | None):
        super().__init__()
        self.net = net
        if patches is not None:
            self.patches = patches

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


@contextlib.contextmanager
def explaining(model: nn.Module) -> Iterator[nn.Module]:
    """`model` prepared for attribution, yielding the view module (`net` + `patches`) to hand to zennit.

    For the duration: eval mode, parameters not requiring grad (only input gradients are wanted), in-place
    activations off (a captured tensor must not be overwritten by a later ReLU, notes §8.2); gradients enabled even
    inside a caller's `no_grad`/`inference_mode` (zennit fails without them, notes §8.6). Every flag is restored on
    exit, also on error.
    """
    training = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    inplace = {m: m.inplace for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)}
    try:
        model.eval()
        for p in grads:
            p.requires_grad_(False)
        for m in inplace:
            m.inplace = False
        with torch.inference_mode(False), torch.enable_grad():
            yield _Explained(model.net, model._modules.get("patches"))
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in inplace.items():
            m.inplace = flag


def canonizers_for(net: nn.Module) -> list:
    """zennit canonizers by family: torchvision ResNet → `ResNetCanonizer` (BN merge + an explicit residual `Sum`),
    VGG → `VGGCanonizer` (sequential BN merge); timm ResNet and VGG → their timm twins (`timm_canonizers.py`); any
    other `nn.Sequential` with BN → `SequentialMergeBatchNorm`.

    Other nets with BN get none: the sequential merge pairs Conv→BN by registration order, which is wrong for nets
    that register modules out of execution order (DenseNet's concatenations); their BN layers pass relevance
    unchanged (the composites' `Pass`), so conservation is only approximate there.
    """
    import torchvision
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if type(net).__module__.startswith("timm."):  # timm is imported only for its own networks
        from modelfix.explain.timm_canonizers import timm_canonizers

        found = timm_canonizers(net)
        if found:
            return found
    if isinstance(net, torchvision.models.ResNet):
        return [ResNetCanonizer()]
    if isinstance(net, torchvision.models.VGG):
        return [VGGCanonizer()]
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if has_bn and isinstance(net, nn.Sequential):
        return [SequentialMergeBatchNorm()]
    return []


def build_composite(model: nn.Module, composite: str = "epsilon_plus_flat", zero_bias: bool = True,
                    name_rules: Mapping[str, object] | None = None):
    """The zennit composite for `model` (rules are matched on the view's names, `net.<name>` / `patches.<key>`).

    Patch rules are prepended to the composite's layer map; `name_rules` (view name → zennit rule) override both,
    which is how `egem-full` puts the ρ-compatible `Epsilon` rule on the layers it edits.
    """
    from zennit.composites import COMPOSITES as ZENNIT_COMPOSITES
    from zennit.composites import MixedComposite, NameMapComposite
    from zennit.rules import Epsilon, Pass

    if composite not in COMPOSITES:
        raise ModelfixError(f"unknown LRP composite '{composite}'", hint=f"use one of: {', '.join(COMPOSITES)}")
    zero_params = "bias" if zero_bias else None
    patch_rules = [(ChannelScale, Pass()), ((PCAffine, PCASumRatio), Epsilon(epsilon=EPSILON, zero_params=zero_params))]
    kwargs: dict = {"zero_params": zero_params, "canonizers": canonizers_for(model.net), "layer_map": patch_rules}
    if composite == "epsilon_gamma_box":
        # ZBox needs the bounds of the input it sees: the normalised pixel range, per channel (notes §8.8).
        low, high = model.input_spec.value_range
        kwargs["low"] = ((low - model.mean) / model.std).detach().clone()
        kwargs["high"] = ((high - model.mean) / model.std).detach().clone()
    base = ZENNIT_COMPOSITES[composite](**kwargs)
    if not name_rules:
        return base
    names = NameMapComposite([((name,), rule) for name, rule in name_rules.items()])
    return MixedComposite([names, base])  # the name map wins; the base's canonizers are kept


def _targets(target: Tensor | int, n: int, num_classes: int, device: torch.device) -> Tensor:
    target = torch.as_tensor(target, dtype=torch.long, device=device).reshape(-1)
    if target.numel() == 1 and n != 1:
        target = target.expand(n)
    if target.shape != (n,):
        raise ValueError(f"target must hold one class per item ({n}), got shape {tuple(target.shape)}")
    if n and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target classes must be in [0, {num_classes}), got {target.tolist()}")
    return target


def lrp(model: nn.Module, x: Tensor, target: Tensor | int, composite: str = "epsilon_plus_flat",
        zero_bias: bool = True) -> tuple[Tensor, Tensor]:
    """LRP relevance of `model`'s `target` logit for the pixel-space batch `x`.

    Returns `(relevance, logit)`: relevance `N×C×H×W` on the pixel positions (the normalised input's), and the
    explained logit value per item as computed inside the zennit context (canonizers fold BN, which moves logits by
    ~1e-4; the relevance is conserved with respect to this value). With `zero_bias` (default) `relevance.sum()`
    equals the logit up to the ε stabilisers.
    """
    from zennit.attribution import Gradient

    with explaining(model) as view:
        z = ((x.to(model.mean.device) - model.mean) / model.std).detach().clone().requires_grad_(True)
        with Gradient(view, build_composite(model, composite, zero_bias)) as attributor:
            logits, relevance = attributor(z, lambda out: _one_hot(out, target) * out.detach())
        target = _targets(target, len(x), logits.shape[1], logits.device)
        explained = logits.detach().gather(1, target[:, None]).squeeze(1)
    if zero_bias:
        check_conservation(model, relevance.detach(), explained)
    return relevance.detach(), explained


CONSERVATION_TOLERANCE = 0.05  # |ΣR / logit − 1| beyond this on a net without a known canonizer is warned about
WARNED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models already warned about (once each)


def check_conservation(model: nn.Module, relevance: Tensor, logit: Tensor) -> None:
    """Warn (once per model) when relevance is not conserved on a net without a known canonizer: its heatmaps may
    be wrong (BatchNorm left unmerged, an unknown block), and nothing else would say so."""
    if model in WARNED or canonizers_for(model.net):
        return
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.net.modules())
    ratio = relevance.sum(dim=tuple(range(1, relevance.ndim))) / logit
    confident = logit.abs() > 1e-3  # a logit near 0 makes the ratio meaningless
    off = ((ratio - 1).abs() > CONSERVATION_TOLERANCE) & confident
    if has_bn and bool(off.any()):
        worst = float((ratio[confident] - 1).abs().max())
        warnings.warn(f"LRP relevance is not conserved on this network (ΣR/logit off by up to {100 * worst:.0f} %; "
                      f"no canonizer is known for {type(model.net).__name__}): its heatmaps are approximate",
                      ModelfixWarning, stacklevel=3)
        WARNED.add(model)


def _one_hot(out: Tensor, target: Tensor | int) -> Tensor:
    target = _targets(target, out.shape[0], out.shape[1], out.device)
    return F.one_hot(target, out.shape[1]).to(out.dtype)


def conservation(model: nn.Module, x: Tensor, target: Tensor | int, **kwargs) -> Tensor:
    """Per item `ΣR / logit`: 1 where relevance is conserved (a check on canonizers, rules and patches)."""
    relevance, logit = lrp(model, x, target, **kwargs)
    return relevance.sum(dim=tuple(range(1, relevance.ndim))) / logit


def relevance_share(model: nn.Module, data: Dataset, relevant_mask: Tensor, batch_size: int = 32,
                    progress: bool = True, **kwargs) -> Tensor:
    """Per item, the share of `|R|` (summed over channels) inside `relevant_mask` (`N×1×H×W`, 1 = relevant).

    The true class (`data.y`) is explained. This is the paper's CelebA approval rule "≥ 75 % of |LRP| inside the
    mask" (`--approve-mask DIR --min-relevance 0.75`). Items with no relevance at all get share 0 (not approved).
    """
    mask = torch.as_tensor(relevant_mask, dtype=torch.float32)
    if mask.ndim == 3:
        mask = mask[:, None]
    n, _, h, w = data.x.shape
    if tuple(mask.shape) != (n, 1, h, w):
        raise ModelfixError(f"relevance mask must have shape ({n}, 1, {h}, {w}) to match the data, "
                            f"got {tuple(mask.shape)}")
    shares = torch.zeros(n, dtype=torch.float64)
    with progress_bar(progress) as bar:
        task = bar.add_task("LRP relevance share", total=n)
        for batch in data.batches(batch_size):
            relevance, _ = lrp(model, batch["x"], batch["y"], **kwargs)
            magnitude = relevance.detach().abs().sum(dim=1, keepdim=True).double().cpu()
            total = magnitude.sum(dim=(1, 2, 3))
            inside = (magnitude * mask[batch["index"]].double()).sum(dim=(1, 2, 3))
            shares[batch["index"]] = torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total))
            bar.advance(task, len(batch["y"]))
    return shares
