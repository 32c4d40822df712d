"""TAP, the Targeted Activation Penalty (Zhang, Williams, Toni, AAAI 2024; methods_guided_finetunes.md §1.2,
§6 items 1–2, §7 item 11).

For hooked conv feature maps a^l (N×C_l×h_l×w_l, l = 1..L in execution order) and the pixel mask M (1 = spurious):

    A^l     = Σ_c a^l_c                                     channel sum (= channel L1 for post-ReLU maps)
    M^l     = downscale(M^{l−1} → h_l×w_l), M^0 = M          PROGRESSIVE, see `downscale_masks`
    L_TAP   = mean_b (1/L) Σ_l ‖M^l_b ⊙ A^l_b‖_F²            norm="squared" (TAP's code; what its numbers used)
           or mean_b (1/L) Σ_l ‖M^l_b ⊙ A^l_b‖₁              norm="l1"      (the paper's Eq. 8)

Items without a mask contribute exactly 0 and still count in the batch mean. The activations are those of the
ordinary training forward pass (hooks, removed in `finally`), so TAP costs about one ERM step (§5).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modelfix.errors import ModelfixError
from modelfix.repair.guidance.base import GuidedObjective
from modelfix.repair.guidance.rrr import TAP_SETUP, check_weight, pixel_mask
from modelfix.repair.registry import objective
from modelfix.training import task_loss

PAPER = 'Zhang, Williams, Toni, AAAI 2024, "Targeted Activation Penalties Help CNNs Ignore Spurious Signals"'
NORMS = ("squared", "l1")
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Tanh, nn.Sigmoid)
_LAYERS_HINT = "name conv feature maps with --layers, e.g. --layers conv1,conv2 (`modelfix inspect` lists the layers)"


def downscale_masks(mask: torch.Tensor, sizes: Sequence[int | tuple[int, int]]) -> list[torch.Tensor]:
    """The mask at each size in `sizes` (N×1×H×W in, one N×1×h×w per size), downscaled PROGRESSIVELY as TAP's code:
    each stage starts from the previous stage's mask, with k = ⌊W_cur/w⌋ and r = w/(W_cur/k) from the WIDTH, as TAP's
    code (it reads the last dimension; until issue 18 this took the height, which differs on non-square inputs):

        if k > 1:  M ← AvgPool(k, stride k)(MaxPool(3, stride 1, pad 1)(M))     (3×3 dilation, fixed-kernel average)
        if r < 1:  M ← nearest resize with scale factor r                       (F.interpolate default mode)

    Where this does not land on h×w (non-square maps with other ratios, a map larger than the current mask, k = 0, or
    a mask shorter than k) the stage falls back to a nearest resize to exactly (h, w), where TAP's code stops with a
    size check; on its square nets this never happens.
    """
    current, out = mask, []
    for size in sizes:
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        width = current.shape[-1]
        k = width // w
        if 1 <= k <= current.shape[-2]:  # (a mask wider than tall can have fewer rows than k: resize below)
            if k > 1:
                current = F.avg_pool2d(F.max_pool2d(current, 3, stride=1, padding=1), k, stride=k)
            ratio = w / (width / k)
            if ratio < 1:
                current = F.interpolate(current, scale_factor=ratio)
        if tuple(current.shape[-2:]) != (h, w):
            current = F.interpolate(current, size=(h, w))
        out.append(current)
    return out


def tap_penalty(activations: Sequence[torch.Tensor], mask: torch.Tensor, norm: str = "squared") -> torch.Tensor:
    """L_TAP for hooked activations (execution order, each N×C×h×w) and the pixel mask N×1×H×W (0 where none).
    Summed in float32: maps from an autocast forward are 16-bit, and squares summed over a map lose digits there."""
    activations = [a.to(torch.promote_types(a.dtype, torch.float32)) for a in activations]
    masks = downscale_masks(mask.to(activations[0].dtype), [tuple(a.shape[-2:]) for a in activations])
    per_item = 0
    for a, m in zip(activations, masks):
        masked = m[:, 0] * a.sum(dim=1)
        per_item = per_item + (masked.pow(2) if norm == "squared" else masked.abs()).sum(dim=(1, 2))
    return (per_item / len(activations)).mean()


def _snapshot(output: object) -> object:
    """A copy of a hooked tensor (still in the graph): later in-place ops such as DenseNet's
    `F.relu(norm5_output, inplace=True)` would otherwise change the map TAP penalises (TAP hooks norm5 pre-ReLU)."""
    return output.clone() if isinstance(output, torch.Tensor) else output


def _network(model: nn.Module) -> nn.Module:
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def default_tap_layers(net: nn.Module) -> list[str]:
    """TAP's hooked layers per family (§1.2, §7 item 11), as module names inside `net`:

    - torchvision ResNet: layer1..layer4; VGG: the MaxPool2d modules of `features` (located by type, so *_bn
      variants work); DenseNet: features.transition1..3 and features.norm5 (pre-ReLU, as TAP);
    - other nets: every MaxPool2d with a Conv2d since the previous MaxPool (tap-cnn and egem-cnn: pool1, pool2),
      else the activation module right after each Conv2d (BatchNorm in between allowed), in module order.
    """
    if any(c.__module__.startswith("torchvision") for c in type(net).__mro__):  # import (1.7 s) only for those
        import torchvision

        if isinstance(net, torchvision.models.ResNet):
            return ["layer1", "layer2", "layer3", "layer4"]
        if isinstance(net, torchvision.models.VGG):
            return [f"features.{n}" for n, m in net.features.named_children() if isinstance(m, nn.MaxPool2d)]
        if isinstance(net, torchvision.models.DenseNet):
            children = [n for n, _ in net.features.named_children()]
            return [f"features.{n}" for n in children if n.startswith("transition") or n == "norm5"]
    leaves = [(n, m) for n, m in net.named_modules() if n and next(iter(m.children()), None) is None]
    pools, conv_seen = [], False
    for name, module in leaves:
        if isinstance(module, nn.Conv2d):
            conv_seen = True
        elif isinstance(module, nn.MaxPool2d) and conv_seen:
            pools.append(name)
            conv_seen = False
    if pools:
        return pools
    acts, after_conv = [], False
    for name, module in leaves:
        if isinstance(module, nn.Conv2d):
            after_conv = True
        elif after_conv and isinstance(module, _ACTIVATIONS):
            if name not in acts:
                acts.append(name)
            after_conv = False
        elif not isinstance(module, nn.modules.batchnorm._BatchNorm):
            after_conv = False
    if acts:
        return acts
    raise ModelfixError(f"no default TAP layers for {type(net).__name__} (no conv feature maps found)",
                        hint=_LAYERS_HINT)


def resolve_tap_layers(net: nn.Module, layers: str | Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """(name, module) for `layers` (names, a list or comma-separated), or the family defaults when None."""
    if layers is None:
        names = default_tap_layers(net)
    else:
        names = [s.strip() for s in (layers.split(",") if isinstance(layers, str) else layers) if s.strip()]
        if not names:
            raise ModelfixError("TAP --layers is empty", hint=_LAYERS_HINT)
    modules = dict(net.named_modules())
    for name in names:
        if name not in modules or not name:
            valid = [n for n in modules if n]
            examples = difflib.get_close_matches(name, valid, n=4) or valid[:6]
            raise ModelfixError(f"TAP layer '{name}' is not a module of the network; valid names include "
                                f"{', '.join(examples)}", hint="`modelfix inspect` lists the layer names")
    return [(name, modules[name]) for name in dict.fromkeys(names)]


@objective("penalise conv activations under the (progressively downscaled) spurious mask", needs_masks=True,
           weight="lam", train_defaults=TAP_SETUP)
class TAP(GuidedObjective):
    """Objective `task + λ·L_TAP` (module docstring). `layers` None: `default_tap_layers`; passing `model` checks
    the names at construction instead of at the first step."""

    name = "tap"
    paper = PAPER
    defaults = {"lam": 1e-3, "layers": None, "norm": "squared"}

    @classmethod
    def create(cls, model: nn.Module, loss: str = "ce", **hyperparameters) -> "TAP":
        return cls(loss=loss, model=model, **hyperparameters)  # the layers are resolved on the model

    def __init__(self, lam: float = 1e-3, layers: str | Sequence[str] | None = None, norm: str = "squared",
                 loss: str = "ce", model: nn.Module | None = None):
        if norm not in NORMS:
            raise ModelfixError(f"TAP norm must be one of {', '.join(NORMS)}, not '{norm}'")
        self.lam = check_weight(lam, "TAP lam")
        self.layers = layers
        self.norm = norm
        self.loss_fn = task_loss(loss)
        if model is not None:
            resolve_tap_layers(_network(model), layers)


    def activations(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, hooked maps in execution order) from one forward pass; hooks never outlive the call."""
        hooked = resolve_tap_layers(_network(model), self.layers)
        seen: list[tuple[str, object]] = []
        handles = []
        try:
            for name, module in hooked:
                handles.append(module.register_forward_hook(
                    lambda module, args, output, name=name: seen.append((name, _snapshot(output)))))
            logits = model(x)
        finally:
            for handle in handles:
                handle.remove()
        names = [name for name, _ in seen]
        for name, _ in hooked:
            if names.count(name) != 1:
                raise ModelfixError(f"TAP layer '{name}' ran {names.count(name)} times in one forward pass; it needs a "
                                    "module that runs once", hint=_LAYERS_HINT)
        for name, output in seen:
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = "×".join(map(str, output.shape)) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ModelfixError(f"layer '{name}' is not spatial (output {shape}); TAP needs conv feature maps",
                                    hint=_LAYERS_HINT)
        return logits, [output for _, output in seen]

    def terms(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(task, penalty), both differentiable, from one forward pass."""
        x = batch["x"]
        logits, maps = self.activations(model, x)
        task = self.loss_fn(logits, batch["y"])
        return task, tap_penalty(maps, pixel_mask(batch, x.dtype).unsqueeze(1), self.norm)

