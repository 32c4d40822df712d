"""Describe a model: its card and, from one dry run, every layer's output shape, parameter count and call count."""

from __future__ import annotations

import torch
from torch import nn

from modelfix.card import ModelCard
from modelfix.zoo import Classifier


def _shape_of(output: object) -> list[int] | None:
    """Per-item output shape (batch dimension dropped) of a tensor, or of the first tensor in a tuple/list."""
    if isinstance(output, torch.Tensor):
        return list(output.shape[1:])
    if isinstance(output, (tuple, list)):
        for item in output:
            shape = _shape_of(item)
            if shape is not None:
                return shape
    return None


def describe(model: Classifier, card: ModelCard) -> dict:
    """A JSON-ready description; layer names are names inside `model.net` (what `--layers` takes).

    The dry run feeds one all-zero pixel-space input in eval mode under no_grad, so batch-norm statistics are
    untouched; training flags are restored and hooks removed afterwards. A module run more than once per forward
    (e.g. torchvision's shared ReLU in a ResNet block) is listed under `reused`: per-call hooks cannot tell its calls
    apart.
    """
    net = model.net
    modules = [(name, module) for name, module in net.named_modules() if name]
    calls = {name: 0 for name, _ in modules}
    shapes: dict[str, list[int] | None] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            calls[name] += 1
            shapes[name] = _shape_of(output)

        return hook

    training = {module: module.training for module in model.modules()}
    handles = []
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()), torch.zeros(()))
    spec = card.input
    x = torch.zeros(1, spec.channels, spec.height, spec.width, device=reference.device, dtype=torch.float32)
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(hook_for(name)))
        model.eval()
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag

    layers = [
        {
            "name": name,
            "type": type(module).__name__,
            "output_shape": shapes.get(name),
            "params": sum(p.numel() for p in module.parameters()),
            "leaf": next(iter(module.children()), None) is None,
            "calls": calls[name],
        }
        for name, module in modules
    ]
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "arch": card.arch,
        "arch_kwargs": dict(card.arch_kwargs),
        "num_classes": card.num_classes,
        "class_names": list(card.class_names),
        "input": spec.to_dict(),
        "output_shape": _shape_of(logits),
        "parameters": parameters,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "layers": layers,
        "calls": dict(calls),
        "reused": [name for name, n in calls.items() if n > 1],
        "history": [dict(entry) for entry in card.history],
        "patches": [dict(entry) for entry in card.patches],
    }
