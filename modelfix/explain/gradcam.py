"""Grad-CAM and input-gradient saliency of the TRUE class, as CRAYON uses them (methods_posthoc.md §6.2).

For a conv feature map A (N×C×h×w) at the last conv block and the true-class logit z_y:

    w_nc  = mean_hw ∂z_{y_n}/∂A_nc                 spatially averaged gradient, per item and channel
    M_n   = ReLU(Σ_c w_nc A_nc)                     h×w, NOT upsampled (CRAYON's released code keeps feature resolution)

Nets without a Conv2d (CRAYON's DecoyMNIST MLP) and `layer="input"` use the input-gradient map
`M_n = Σ_c |∂z_{y_n}/∂x_n|` with x in pixel space (absolute values, so the max-normalisation below sees values ≥ 0).
`normalise_maps` is the paper's `M ← (M + 1e-10)/max(M + 1e-10)`.

Gradients are taken in eval mode (BatchNorm statistics, no dropout: no coupling between the items of a batch), so
summing the selected logits over the batch before `autograd.grad` gives every item its own gradient. With
`create_graph=True` the maps stay differentiable in θ (double backprop, CRAYON-ATTENTION's M'); plain autograd, never
zennit (methods_posthoc.md §8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modelfix.errors import ModelfixError
from modelfix.repair.guidance.rrr import eval_mode

EPS = 1e-10  # the paper's (and released code's) epsilon of the max-normalisation
INPUT = "input"  # the layer name that asks for the input-gradient map
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Tanh, nn.Sigmoid)
_HINT = "name a conv block with --layer (`modelfix inspect` lists the layers), or --layer input for input gradients"


def _network(model: nn.Module) -> nn.Module:
    """The net behind a `Classifier` (layer names are names inside it), else the module itself."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def default_cam_layer(net: nn.Module) -> str | None:
    """The last conv block's output module inside `net`: ResNet "layer4"; VGG the last module of `features` (its last
    max-pool); DenseNet "features.norm5"; other nets the activation right after the last Conv2d (BatchNorm in
    between allowed), else that conv itself; None for nets without a Conv2d (input-gradient maps)."""
    if any(c.__module__.startswith("torchvision") for c in type(net).__mro__):  # import (1.7 s) only for those
        import torchvision

        if isinstance(net, torchvision.models.ResNet):
            return "layer4"
        if isinstance(net, torchvision.models.VGG):
            return f"features.{list(net.features.named_children())[-1][0]}"
        if isinstance(net, torchvision.models.DenseNet):
            return "features.norm5"
    leaves = [(n, m) for n, m in net.named_modules() if n and next(iter(m.children()), None) is None]
    last = max((i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.Conv2d)), default=None)
    if last is None:
        return None
    for name, module in leaves[last + 1:]:
        if isinstance(module, _ACTIVATIONS):
            return name
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            break
    return leaves[last][0]


def _selected_logits(logits: Tensor, y: Tensor) -> Tensor:
    """Σ_n z_{n, y_n}: one scalar whose gradient holds every item's own true-class gradient."""
    return logits.gather(1, y.to(logits.device).long().view(-1, 1)).sum()


def _input_gradient_maps(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
    xin = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(_selected_logits(model(xin), y), xin, create_graph=create_graph)
    return grad.abs().sum(dim=1)


def _gradcam_maps(model: nn.Module, x: Tensor, y: Tensor, layer: str, create_graph: bool) -> Tensor:
    modules = dict(_network(model).named_modules())
    if not layer or layer not in modules:
        raise ModelfixError(f"Grad-CAM layer '{layer}' is not a module of the network", hint=_HINT)
    seen: list[object] = []

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        seen.append(output)
        # Downstream gets a copy: an in-place op after the layer (DenseNet's relu(norm5, inplace=True)) must not
        # change the map A that Grad-CAM weighs and differentiates.
        return output.clone() if isinstance(output, Tensor) else None

    handle = modules[layer].register_forward_hook(hook)
    try:
        # x as a leaf that requires grad: A is in a graph even when every parameter is frozen.
        logits = model(x.detach().requires_grad_(True))
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ModelfixError(f"Grad-CAM layer '{layer}' ran {len(seen)} times in one forward pass; it needs a module "
                            "that runs once", hint=_HINT)
    a = seen[0]
    if not isinstance(a, Tensor) or a.dim() != 4:
        shape = "×".join(map(str, a.shape)) if isinstance(a, Tensor) else type(a).__name__
        raise ModelfixError(f"Grad-CAM layer '{layer}' is not a conv feature map (output {shape}, needs N×C×h×w)",
                            hint=_HINT)
    (grad,) = torch.autograd.grad(_selected_logits(logits, y), a, create_graph=create_graph)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * a).sum(dim=1))


def saliency_maps(model: nn.Module, x: Tensor, y: Tensor, layer: str | None = None,
                  create_graph: bool = False) -> Tensor:
    """N×h×w true-class saliency (module docstring): Grad-CAM at `layer` (a module name inside `model.net`;
    `default_cam_layer` when None), or the input-gradient map for conv-free nets and `layer="input"`.

    Eval mode inside (each module's training flag restored); hooks removed before returning. Without
    `create_graph` the maps are detached.
    """
    if layer is None:
        layer = default_cam_layer(_network(model))
    with torch.enable_grad(), eval_mode(model):
        if layer is None or layer == INPUT:
            maps = _input_gradient_maps(model, x, y, create_graph)
        else:
            maps = _gradcam_maps(model, x, y, layer, create_graph)
    return maps if create_graph else maps.detach()


def normalise_maps(maps: Tensor) -> Tensor:
    """`(M + 1e-10) / max_hw(M + 1e-10)` per map (paper §3.2): each map's maximum becomes 1."""
    shifted = maps + EPS
    return shifted / shifted.amax(dim=(-2, -1), keepdim=True)
