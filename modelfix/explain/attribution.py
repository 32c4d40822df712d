"""One entry point for attributions of a `Classifier`'s target logit on pixel positions (`modelfix explain`).

Every method explains the logit `z_t(x)` of a target class `t`, with `x` in pixel space:

    gradient              G(x)   = ∂z_t/∂x
    gradxinput            x ⊙ G(x)
    integrated-gradients  (x − x̄) ⊙ (1/S) Σ_{k<S} G(x̄ + (k + ½)/S · (x − x̄)),   x̄ = 0 (black image), S = steps
    smoothgrad            (1/n) Σ_{k<n} G(x + ε_k),   ε_k ~ N(0, (σ·(max x − min x))²), n = samples, σ = noise
    lrp                   zennit LRP of `net` on the normalised input (`lrp.lrp`): Σ R = z_t
    gradcam               ReLU(Σ_c mean_hw(∂z_t/∂A_c) A_c) at a conv layer (`gradcam.saliency_maps`), upsampled

Integrated gradients (Sundararajan et al. 2017, Eq. 1) with the midpoint Riemann sum; the baseline is the
pixel-space zero image (black, "no signal" for digit-like data) rather than the normalised zero (the mean image),
so completeness reads `Σ attribution ≈ z_t(x) − z_t(0)`, up to the Riemann error that shrinks with `steps`.
SmoothGrad (Smilkov et al. 2017) draws its noise from a `torch.Generator` seeded with `seed`, one draw of fixed
shape per item in item order, so the result does not depend on the batch size or the device.

The model is left exactly as it was: every method runs inside `lrp.explaining` (eval mode, parameters not requiring
grad, in-place activations off, each flag restored afterwards, even on error); zennit's canonizers fold BatchNorm
only inside LRP's `with` block. No hooks remain, the `state_dict` is bit-identical and the outputs are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelfix import distributed
from modelfix.errors import ModelfixError
from modelfix.explain import gradcam
from modelfix.explain.lrp import COMPOSITES as LRP_COMPOSITES
from modelfix.explain.lrp import explaining
from modelfix.explain.lrp import lrp as lrp_relevance
from modelfix.progress import progress_bar
from modelfix.repair.guidance.rrr import eval_mode

METHODS = ("lrp", "gradient", "gradxinput", "integrated-gradients", "smoothgrad", "gradcam")

# User-facing (hyphenated) composite names → zennit's names in `lrp.COMPOSITES`.
COMPOSITES = {name.replace("_", "-"): name for name in LRP_COMPOSITES}


@dataclass
class Attribution:
    """What `attribution_details` returns.

    values: N×C×H×W (Grad-CAM: N×1×H×W), float32 on the CPU, on pixel positions.
    logits: N, the explained target logit z_t(x) (for LRP the one computed under the canonizers, which fold BN).
    expected_sum: N or None: what `values` should sum to per item (LRP: z_t; integrated gradients:
        z_t(x) − z_t(0)); None for methods without such a property.
    """

    values: Tensor
    logits: Tensor
    expected_sum: Tensor | None


def composite_name(name: str) -> str:
    """zennit's name for a user-facing composite (`epsilon-plus-flat` → `epsilon_plus_flat`); snake_case accepted."""
    key = name.replace("_", "-")
    if key not in COMPOSITES:
        raise ModelfixError(f"unknown LRP composite '{name}'",
                            hint=f"--composite takes one of: {', '.join(COMPOSITES)}")
    return COMPOSITES[key]


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ModelfixError(f"unknown attribution method '{method}'",
                            hint=f"--method takes one of: {', '.join(METHODS)}")
    return method


def _first_layer(model: nn.Module) -> nn.Module | None:
    net = getattr(model, "net", model)
    return next((m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)


def default_composite(model: nn.Module) -> str:
    """epsilon-plus-flat (zennit's recommendation for CNNs) unless the first layer is Linear, where Flat would make
    every map uniform (`composite_warnings`): then epsilon-plus."""
    return "epsilon-plus" if isinstance(_first_layer(model), nn.Linear) else "epsilon-plus-flat"


def composite_warnings(model: nn.Module, composite: str) -> list[str]:
    """Why an LRP composite may give a useless map for this model: the `-flat` composites put the Flat rule on the
    first layer, which for a Linear first layer (an MLP) spreads every unit's relevance evenly over all pixels, so
    every heatmap is uniform."""
    name = composite_name(composite)
    if name.endswith("_flat") and isinstance(_first_layer(model), nn.Linear):
        return [f"the {name.replace('_', '-')} composite applies the Flat rule to the first layer, a Linear layer "
                "here: every pixel gets the same relevance; use --composite epsilon-plus for a dense network"]
    return []


def _device(model: nn.Module) -> torch.device:
    buffer = getattr(model, "mean", None)
    if isinstance(buffer, Tensor):
        return buffer.device
    return next(model.parameters()).device


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad(), eval_mode(model):
        return int(model(x[:1].to(_device(model))).shape[1])


def resolve_targets(model: nn.Module, x: Tensor, y: Tensor | None, target: str | int,
                    batch_size: int = 256) -> Tensor:
    """The class to explain per item (LongTensor N, CPU): `"true"` → the labels `y`, `"pred"` → the model's arg-max
    (eval mode; each module's flag restored), an int (or its text) → that class for every item."""
    n = len(x)
    if isinstance(target, str) and target in ("true", "pred"):
        if target == "true":
            if y is None:
                raise ModelfixError("--target true needs labels", hint="use --target pred or a class index")
            return torch.as_tensor(y, dtype=torch.long).cpu().reshape(n)
        out = torch.empty(n, dtype=torch.long)
        with torch.no_grad(), eval_mode(model):
            for start in range(0, n, batch_size):
                logits = model(x[start:start + batch_size].to(_device(model)))
                out[start:start + batch_size] = logits.argmax(1).cpu()
        return out
    try:
        cls = int(target)
        if isinstance(target, float) or (isinstance(target, str) and str(cls) != target.strip()):
            raise ValueError
    except (TypeError, ValueError):
        raise ModelfixError(f"--target must be true, pred or a class index, not '{target}'") from None
    k = _num_classes(model, x) if n else cls + 1
    if not 0 <= cls < k:
        raise ModelfixError(f"--target {cls} is not a class of the model (classes 0 … {k - 1})")
    return torch.full((n,), cls, dtype=torch.long)


def _gradient(model: nn.Module, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(∂z_t/∂x, z_t) per item. In eval mode the items do not interact, so the gradient of Σ_n z_{n,t_n} holds
    every item's own gradient."""
    xin = x.detach().clone().requires_grad_(True)
    logits = model(xin).gather(1, t[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad(logits.sum(), xin)
    return grad, logits.detach()


def _integrated_gradients(model: nn.Module, x: Tensor, t: Tensor, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    baseline = torch.zeros_like(x)
    total = torch.zeros_like(x)
    for k in range(steps):
        alpha = (k + 0.5) / steps  # midpoint rule: error O(1/steps²) on smooth stretches of the path
        grad, _ = _gradient(model, baseline + alpha * (x - baseline), t)
        total += grad
    with torch.no_grad():
        at_x = model(x).gather(1, t[:, None]).squeeze(1)
        at_baseline = model(baseline).gather(1, t[:, None]).squeeze(1)
    return (x - baseline) * total / steps, at_x, at_x - at_baseline


def _smoothgrad(model: nn.Module, x: Tensor, t: Tensor, samples: int, noise: float,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, *[1] * (x.dim() - 1))  # per item max − min
    # One CPU draw of shape samples×C×H×W per item, in item order: the same noise whatever the batching or device.
    eps = torch.stack([torch.randn((samples, *x.shape[1:]), generator=generator) for _ in range(len(x))])
    eps = eps.to(x.device) * (noise * span)[:, None]
    total = torch.zeros_like(x)
    for k in range(samples):
        grad, _ = _gradient(model, x + eps[:, k], t)
        total += grad
    with torch.no_grad():
        logits = model(x).gather(1, t[:, None]).squeeze(1)
    return total / samples, logits


def _gradcam(model: nn.Module, x: Tensor, t: Tensor, layer: str | None) -> tuple[Tensor, Tensor]:
    if layer is None and gradcam.default_cam_layer(getattr(model, "net", model)) is None:
        raise ModelfixError("Grad-CAM needs a conv layer and this network has none",
                            hint="use --method gradient, or --layer input for |input gradient| maps")
    maps = gradcam.saliency_maps(model, x, t, layer=layer)
    with torch.no_grad():
        logits = model(x).gather(1, t[:, None]).squeeze(1)
    # bilinear, as Grad-CAM is usually shown; a no-op when the map already has the input's size
    return F.interpolate(maps[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False), logits


def attribution_details(model: nn.Module, x: Tensor, targets: Tensor, method: str = "gradient",
                        composite: str = "epsilon-plus-flat", steps: int = 32, samples: int = 16, noise: float = 0.1,
                        layer: str | None = None, batch_size: int = 32, progress: bool = False,
                        seed: int = 0, shard: bool = False) -> Attribution:
    """`attribute` with the explained logits and, where the method has one, the sum each map should have.

    `shard=True` (every process of a torchrun group calls it with the same items): each process explains its block
    of whole batches (`distributed.batch_block`) and every process gets all of them back, bit for bit the
    one-process result (SmoothGrad's generator skips the draws of the items before the block)."""
    check_method(method)
    zennit_composite = composite_name(composite)
    for option, value in (("--steps", steps), ("--samples", samples), ("--batch-size", batch_size)):
        if value < 1:
            raise ModelfixError(f"{option} must be at least 1, not {value}")
    if noise < 0:
        raise ModelfixError(f"--noise must be >= 0, not {noise}")
    targets = torch.as_tensor(targets, dtype=torch.long).cpu().reshape(-1)
    if targets.shape != (len(x),):
        raise ValueError(f"targets must hold one class per item ({len(x)}), got shape {tuple(targets.shape)}")
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    rows = distributed.batch_block(len(x), batch_size) if shard else range(len(x))
    if method == "smoothgrad":
        for _ in range(rows.start):  # the noise of the items before this block, drawn as in one process
            torch.randn((samples, *x.shape[1:]), generator=generator)
    values, logits, sums = [], [], []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{method} attributions", total=len(rows))
        for start in range(rows.start, rows.stop, batch_size):
            xb = x[start:min(start + batch_size, rows.stop)].to(device, torch.float32)
            tb = targets[start:min(start + batch_size, rows.stop)].to(device)
            expected = None
            if method == "lrp":
                attr, logit = lrp_relevance(model, xb, tb, composite=zennit_composite)
                expected = logit
            else:
                with explaining(model):
                    if method in ("gradient", "gradxinput"):
                        attr, logit = _gradient(model, xb, tb)
                        if method == "gradxinput":
                            attr = xb * attr
                    elif method == "integrated-gradients":
                        attr, logit, expected = _integrated_gradients(model, xb, tb, steps)
                    elif method == "smoothgrad":
                        attr, logit = _smoothgrad(model, xb, tb, samples, noise, generator)
                    else:
                        attr, logit = _gradcam(model, xb, tb, layer)
            values.append(attr.detach().float().cpu())
            logits.append(logit.detach().float().cpu())
            if expected is not None:
                sums.append(expected.detach().float().cpu())
            bar.advance(task, len(xb))
    if not values:
        c = 1 if method == "gradcam" else x.shape[1]
        values, logits = [torch.zeros(0, c, *x.shape[2:])], [torch.zeros(0)]
        sums = [torch.zeros(0)] if method in ("lrp", "integrated-gradients") else []
    values, logits, sums = torch.cat(values), torch.cat(logits), (torch.cat(sums) if sums else None)
    if shard:
        values, logits = distributed.concat_shards(values), distributed.concat_shards(logits)
        sums = None if sums is None else distributed.concat_shards(sums)
    return Attribution(values, logits, sums)


def attribute(model: nn.Module, x: Tensor, targets: Tensor, method: str = "gradient",
              composite: str = "epsilon-plus-flat", steps: int = 32, samples: int = 16, noise: float = 0.1,
              layer: str | None = None, batch_size: int = 32, progress: bool = False, seed: int = 0,
              shard: bool = False) -> Tensor:
    """Attribution of each item's `targets` logit for the pixel-space batch `x` (module docstring for the methods).

    Returns a float32 CPU tensor shaped like `x` (Grad-CAM: N×1×H×W, upsampled to H×W). `composite` is the LRP
    composite (user-facing name, `COMPOSITES`); `steps` the integrated-gradients Riemann points; `samples`/`noise`
    SmoothGrad's copies and noise level (σ as a share of each item's max − min); `layer` the Grad-CAM layer (a module
    name inside `model.net`, default the last conv block; `"input"` gives |input gradient| maps). `shard`: split
    across the processes of a torchrun group (`attribution_details`).
    """
    return attribution_details(model, x, targets, method, composite, steps, samples, noise, layer, batch_size,
                               progress, seed, shard).values


def relevance_maps(attr: Tensor) -> Tensor:
    """N×H×W: the attribution summed over channels (signed, so positive and negative evidence stay apart)."""
    return attr.sum(dim=1)
