"""Refinement points: the module outputs inside `Classifier.net` where EGEM / PCA-EGEM insert their patches.

Points come from one dry run (methods_posthoc.md §5): execution order, call counts and per-item output shapes.
`--layers auto` gives the family defaults (ResNet stages, VGG pools and classifier ReLUs, DenseNet transitions)
or, for small nets, the input of each Conv/Linear after the first: every activation module that follows a Conv/Linear
(BatchNorm allowed in between), moved on through the pooling/flatten leaves after it, up to the final Linear (the EGEM
paper's MNIST points `pool1, flatten, relu3`). A module that runs more than once per forward pass (the shared `relu` of a
torchvision BasicBlock) can never be a point: one forward hook cannot tell its calls apart.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modelfix.errors import ModelfixError, UnsupportedModel

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.ELU, nn.SiLU, nn.Tanh, nn.Sigmoid)
_BATCHNORM = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Point:
    """One refinement point: a module inside `model.net`, its place in execution order (1..L), its output shape."""

    name: str
    index: int
    shape: tuple[int, ...]  # per item (batch dimension dropped)

    @property
    def kind(self) -> str:
        """`conv` for a (C, H, W) output, `dense` for a (d,) output."""
        return "conv" if len(self.shape) == 3 else "dense"


@dataclass
class _Trace:
    """What one dry run saw: names in the order their first call finished, call counts, first-call output shapes."""

    modules: dict[str, nn.Module]
    order: list[str]
    calls: dict[str, int]
    shapes: dict[str, tuple[int, ...] | None]  # None: the output was not one tensor


def _dry_run(model: nn.Module) -> _Trace:
    """Run one all-zero pixel-space input through `model` (eval, no_grad) with a counting hook on every module."""
    net = model.net
    modules = {name: module for name, module in net.named_modules() if name}
    trace = _Trace(modules, [], {name: 0 for name in modules}, {})

    def hook_for(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            trace.calls[name] += 1
            if trace.calls[name] == 1:
                trace.order.append(name)
                trace.shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None

        return hook

    spec = model.input_spec
    reference = next(iter(model.parameters()), None)
    if reference is None:
        reference = next(iter(model.buffers()), torch.zeros(()))
    x = torch.zeros(1, spec.channels, spec.height, spec.width, device=reference.device, dtype=torch.float32)
    training = {module: module.training for module in model.modules()}
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag
    return trace


def _problem(trace: _Trace, name: str) -> str | None:
    """Why `name` cannot be a refinement point, or None if it can."""
    calls = trace.calls[name]
    if calls == 0:
        return f"'{name}' never runs in a forward pass; a refinement point must run exactly once"
    if calls > 1:
        return f"'{name}' runs {calls} times per forward pass; a refinement point must run exactly once"
    shape = trace.shapes[name]
    if shape is None:
        return f"'{name}' does not return a single tensor"
    if len(shape) not in (1, 3):
        return f"'{name}' outputs per-item shape {tuple(shape)}; a refinement point needs (C, H, W) or (d,)"
    return None


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob over dotted module names: `*` and `?` stay within one name part, `**` crosses dots, `[..]` a class.

    `layer*` thus selects the ResNet stages, not every module inside them.
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        ch = pattern[i]
        if ch == "*":
            out.append(r"[^.]*")
        elif ch == "?":
            out.append(r"[^.]")
        elif ch == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _no_match(pattern: str, names: list[str]) -> ModelfixError:
    examples = difflib.get_close_matches(pattern, names, n=4) or names[:4]
    return ModelfixError(
        f"--layers '{pattern}' matches no module of the network; e.g. {', '.join(examples)}",
        hint="`modelfix inspect` lists the layer names",
    )


def _selected(trace: _Trace, layers: str | Sequence[str]) -> set[str]:
    """Module names for `--layers` (names or globs, comma-separated or a list), each checked; deduplicated."""
    patterns = layers.split(",") if isinstance(layers, str) else list(layers)
    patterns = [p.strip() for p in patterns if p.strip()]
    if not patterns:
        raise ModelfixError("--layers is empty", hint="pass module names or globs, e.g. --layers 'layer*'")
    names = list(trace.modules)
    chosen: set[str] = set()
    for pattern in patterns:
        if not any(ch in pattern for ch in "*?["):
            if pattern not in trace.modules:
                raise _no_match(pattern, names)
            problem = _problem(trace, pattern)
            if problem:
                raise ModelfixError(problem, hint="choose a module that runs once, e.g. a stage or a layer output")
            chosen.add(pattern)
            continue
        regex = _glob_regex(pattern)
        matched = [name for name in names if regex.match(name)]
        if not matched:
            raise _no_match(pattern, names)
        usable = [name for name in matched if _problem(trace, name) is None]
        if not usable:  # a glob silently skips unusable modules, but must leave at least one
            raise ModelfixError(
                f"--layers '{pattern}' matches no module usable as a refinement point ({_problem(trace, matched[0])})"
            )
        chosen.update(usable)
    return chosen


def _family_defaults(net: nn.Module) -> list[str] | None:
    """The torchvision families' default points (methods_posthoc.md §0 item 4, §5), or None for other nets."""
    if not any(c.__module__.startswith("torchvision") for c in type(net).__mro__):
        return None  # importing torchvision costs about 1.7 s; other nets never need it
    import torchvision

    if isinstance(net, torchvision.models.ResNet):
        return ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    if isinstance(net, torchvision.models.VGG):
        # MaxPools located by type: with batch norm their indices shift.
        pools = [f"features.{n}" for n, m in net.features.named_children() if isinstance(m, nn.MaxPool2d)]
        relus = [f"classifier.{n}" for n, m in net.classifier.named_children() if isinstance(m, nn.ReLU)]
        return pools + relus
    if isinstance(net, torchvision.models.DenseNet):
        children = [n for n, _ in net.features.named_children()]
        blocks = [n for n in children if n.startswith("denseblock")]
        return [f"features.{n}" for n in children if n.startswith("transition")] + [f"features.{blocks[-1]}"]
    return None


def _generic_defaults(trace: _Trace) -> list[str]:
    """The input of every parametric layer after the first, up to the last Linear: for each activation module that
    follows a Conv/Linear (BatchNorm between allowed), the point moves on through the parameter-free leaves after it
    (pooling, flatten, dropout) to the last one before the next Conv/Linear. That is where the EGEM reference code
    patches (the input of conv2, fc1, fc2 on its MNIST net: `pool1, flatten, relu3`), and it puts a flattened point,
    where every unit is one channel at one position, between the convs and the classifier: channel factors alone
    cannot single out a position (a corner artifact; docs/benchmarks.md)."""
    leaves = [name for name in trace.order if next(iter(trace.modules[name].children()), None) is None]
    linears = [i for i, name in enumerate(leaves) if isinstance(trace.modules[name], nn.Linear)]
    end = linears[-1] if linears else len(leaves)
    usable = lambda name: trace.calls[name] == 1 and trace.shapes[name] is not None and len(trace.shapes[name]) in (1, 3)  # noqa: E731
    found, producer, pending = [], None, None
    for name in leaves[:end]:
        module = trace.modules[name]
        parametric = any(True for _ in module.parameters(recurse=False)) and not isinstance(module, _BATCHNORM)
        if parametric:
            if pending is not None:
                found.append(pending)
            pending, producer = None, module
            continue
        if pending is not None:
            if usable(name):
                pending = name  # pooling / flatten / another activation after the activation: move on
            continue
        if isinstance(module, ACTIVATIONS) and isinstance(producer, (nn.Linear, nn.modules.conv._ConvNd)) \
                and usable(name):
            pending = name
    if pending is not None:
        found.append(pending)
    return found


def find_points(model: nn.Module, layers: str | Sequence[str] | None = None) -> list[Point]:
    """The refinement points of `model` (a `Classifier`) in execution order.

    `layers`: None or "auto" for the defaults; otherwise module names or globs inside `model.net` (a comma-separated
    string or a list; in a glob `*` stays within one dotted part, `**` crosses dots). A glob skips modules that
    cannot be points; a plain name that cannot be one is an error. Every user mistake is a one-line ModelfixError
    naming the offending name.
    """
    trace = _dry_run(model)
    if layers is None or (isinstance(layers, str) and layers.strip() == "auto"):
        names = _family_defaults(model.net)
        if names is None:
            names = _generic_defaults(trace)
            if not names:
                raise UnsupportedModel(
                    f"no default refinement points in {type(model.net).__name__} (no activation module after a "
                    "Conv/Linear; functional activations cannot be hooked); pass --layers NAMES"
                )
        chosen = set(_selected(trace, names))
    else:
        chosen = _selected(trace, layers)
    ordered = [name for name in trace.order if name in chosen]
    return [Point(name, i + 1, trace.shapes[name]) for i, name in enumerate(ordered)]
