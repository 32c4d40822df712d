"""Fold patches into the stock weights of `Classifier.net` where that is exact (methods_posthoc.md §2.4).

A folded model has no `modelfix.patch.*` tensors: it loads into the plain architecture. The analysis is one torch.fx
trace of `model.net` (modules traced through their `forward`, so patch hooks stay out of it) with tensor shapes from
`ShapeProp`. A patch acts on its target's output node: the call of a leaf module, or for a container (a ResNet stage,
a DenseNet transition) the one node inside it whose value leaves it, so a fold may reach into the container (a
DenseNet transition's scale goes to its conv).

- `channel_scale` (`a_i ← c_i·a_i`, EGEM Eq. 5). Producer fold (preferred): walk back from the target through
  ReLU / pools / dropout / identity, every node on the way having no other user, to a Conv/Linear (scale weight
  rows and bias) or an affine BatchNorm (scale γ, β); `relu(c·z) = c·relu(z)` and `maxpool(c·z) = c·maxpool(z)`
  need `c ≥ 0`. Consumer fold: walk forward through the same ops and flattens (channel i of a (C, H, W) map is
  columns i·H·W … (i+1)·H·W) and scale the input columns of every Conv2d (groups = 1, zero padding is exact) or
  Linear reached; any other user (a skip-connection add, a concatenation, the output) blocks it.
- `pca_affine` on a dense target (`a ← ā + M(a − ā)`, PCA-EGEM Eq. 6) whose users are Linear layers (through
  dropout / identity / flatten of a flat tensor): `W' = W·M`, `b' = b + W·(I − M)·ā`, in float64. On a conv map
  (position mode) it is kept: its shift is not exact at the borders of a padded conv.
- `pca_sum_ratio` on a map that is only globally average-pooled into Linear layers (ResNet `layer4` → `avgpool` →
  `fc`): pooling the patched map gives `p' = ā/HW + M(p − ā/HW)`, so `W' = W·M`, `b' = b + W·(I − M)·ā/HW`.
  Caveat: where a channel sum is exactly 0 the patch's `s = 0 → 1e-6` guard zeroes that channel, which no weight
  edit can reproduce; there the folded model applies the affine map instead (folded entries carry a `note`).

Patches interact: a fold moves a patch along the graph, so it must not cross another patch it does not commute
with (only channel scales commute with each other), and several patches on one target fold only if all are
channel scales. Every fold is checked on a seeded probe batch before the model is changed.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from modelfix.errors import ModelfixError
from modelfix.repair.patches import patch_entries, remove_patch

TOLERANCE = 1e-5  # max |Δoutput| allowed after folding, relative to the largest |output| on the probe batch
PROBE_ITEMS = 4

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu}
_MAXPOOL_FUNCTIONS = {F.max_pool2d, F.adaptive_max_pool2d}
_AVGPOOL_FUNCTIONS = {F.avg_pool2d, F.adaptive_avg_pool2d}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_SCALE_STEPS = {"relu": True, "pool-max": True, "pool-avg": False, "dropout": False}  # step -> needs c >= 0


class _NoFold(Exception):
    """Why a patch cannot be folded (internal; becomes the kept entry's reason)."""


@dataclass(frozen=True)
class FoldPlan:
    """Whether patch `key` folds exactly and how (`reason` says why not when `foldable` is False).

    `edits` are `(op, module name, *float64 tensors)` with op `scale_out` (weight rows / BN γ and β ×c),
    `scale_in` (weight input columns ×c) or `affine_in` (`W' = W·M`, `b' = b + W·(I − M)·m`).
    """

    key: str
    target: str
    kind: str
    foldable: bool
    reason: str
    edits: tuple = ()
    note: str | None = None

    @property
    def into(self) -> list[str]:
        """Names of the modules whose weights the fold changes, in edit order."""
        return list(dict.fromkeys(edit[1] for edit in self.edits))


@dataclass
class FoldResult:
    """Card entries of the patches folded (with `into`: modules changed) and of those kept (with `reason`)."""

    folded: list[dict]
    kept: list[dict]


# ---------------------------------------------------------------------------------------------------------------
# the traced network


class _Tracer(fx.Tracer):
    """Default fx tracing, except that modules are traced through `forward`, not `__call__`: their forward hooks
    (patches among them) would otherwise run on proxies."""

    def call_module(self, module: nn.Module, forward, args, kwargs):
        return super().call_module(module, module.forward, args, kwargs)


@dataclass
class _Net:
    graph: fx.Graph
    modules: dict[str, nn.Module]
    calls: Counter  # call_module target -> number of nodes calling it
    shared: set[str]  # modules whose parameters another module also holds (tied weights)


def _trace(model: nn.Module) -> _Net | None:
    """fx graph of `model.net` with per-node shapes (ShapeProp on a zero input); None if the net does not trace.

    Two items, so that a literal 1 in a shape is never mistaken for the batch dimension.
    """
    net = model.net
    spec = model.input_spec
    reference = next(iter(net.parameters()), torch.zeros(()))
    x = torch.zeros(2, spec.channels, spec.height, spec.width, device=reference.device, dtype=torch.float32)
    training = {module: module.training for module in net.modules()}
    try:
        graph = _Tracer().trace(net)
        net.eval()  # shapes only; eval so batch-norm statistics stay untouched
        with torch.no_grad():
            ShapeProp(fx.GraphModule(net, graph)).propagate(x)
    except Exception:  # fx raises many types for untraceable control flow; the reason is reported, not the detail
        return None
    finally:
        for module, flag in training.items():
            module.training = flag
    owners = Counter(id(p) for _, m in net.named_modules() for p in m.parameters(recurse=False))
    shared = {n for n, m in net.named_modules() if any(owners[id(p)] > 1 for p in m.parameters(recurse=False))}
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    return _Net(graph, dict(net.named_modules()), calls, shared)


def _target_node(net: _Net, target: str) -> fx.Node:
    """The node whose value is the output of `model.net.<target>` (the tensor its patch acts on).

    A leaf module is its call node; for a container it is the one node inside it whose value is used outside it.
    """
    if target not in net.modules:
        raise _NoFold(f"'{target}' is not a module of the network")
    if net.calls[target]:
        nodes = [node for node in net.graph.nodes if node.op == "call_module" and node.target == target]
        if len(nodes) != 1:
            raise _NoFold(f"'{target}' runs {len(nodes)} times per forward pass")
        return nodes[0]
    inside = [node for node in net.graph.nodes if target in _containers(node)]
    if not inside:
        raise _NoFold(f"'{target}' does not run in the traced forward pass")
    again = re.compile(re.escape(target) + r"@\d+")
    if any(again.fullmatch(key) for node in inside for key in node.meta.get("nn_module_stack", {})):
        raise _NoFold(f"'{target}' runs more than once per forward pass")
    outputs = [node for node in inside if any(target not in _containers(user) for user in node.users)]
    if len(outputs) != 1 or any(target in _containers(user) for user in outputs[0].users):
        raise _NoFold(f"cannot locate the output of '{target}' in the traced graph")
    return outputs[0]


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _containers(node: fx.Node) -> set[str]:
    """Names of the modules whose forward `node` runs inside (a called module counts as inside itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    names = {value[0] if isinstance(value, tuple) else re.sub(r"@\d+$", "", key) for key, value in stack.items()}
    if node.op == "call_module":
        parts = str(node.target).split(".")
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def _describe(net: _Net, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(net.modules[node.target]).__name__} '{node.target}'"
    if node.op == "output":
        return "the network output"
    if node.op == "placeholder":
        return "the network input"
    stack = node.meta.get("nn_module_stack")
    where = f"'{list(stack.values())[-1][0]}'" if stack else "the top level"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if name in ("add", "iadd", "add_"):
        return f"a skip connection (add) at {where}"
    if name == "cat":
        return f"a concatenation (cat) at {where}"
    return f"{name} at {where}"


def _flattens(node: fx.Node) -> bool:
    """True if `node` maps (N, C, …) to (N, C·…) (torch.flatten(x, 1), nn.Flatten, x.view(N, -1), …)."""
    before, after = _shape(node.args[0]) if node.args else None, _shape(node)
    return (
        before is not None and after is not None and len(after) == 2 and after[0] == before[0]
        and after[1] == math.prod(before[1:])
    )


def _averages_positions(node: fx.Node) -> bool:
    """True for a mean over the two spatial dims of a 4-d tensor (x.mean((2, 3)) and the like)."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    before = _shape(node.args[0])
    if before is None or len(before) != 4 or not isinstance(dims, (tuple, list)):
        return False
    return {d % 4 for d in dims} == {2, 3}


def _step(net: _Net, node: fx.Node) -> str:
    """How a per-channel tensor passes `node`: relu, pool-max, pool-avg, dropout, flatten, mean, shape or other."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return "shape"
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device"):
        return "shape"
    if _shape(node) is None:
        return "other"
    if node.op == "call_module":
        module = net.modules[node.target]
        if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
            return "relu"
        if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            return "pool-max"
        if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return "pool-avg"
        if isinstance(module, _DROPOUTS):
            return "dropout"
        if isinstance(module, nn.Flatten) and _flattens(node):
            return "flatten"
        return "other"
    if node.op == "call_function":
        target = node.target
        if target in _RELU_FUNCTIONS:
            return "relu"
        if target in _MAXPOOL_FUNCTIONS:
            return "pool-max"
        if target in _AVGPOOL_FUNCTIONS:
            return "pool-avg"
        if target in _DROPOUT_FUNCTIONS:
            return "dropout"
        if target in (torch.flatten, torch.reshape) and _flattens(node):
            return "flatten"
        if target is torch.mean and _averages_positions(node):
            return "mean"
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return "relu"
        if node.target in ("flatten", "view", "reshape") and _flattens(node):
            return "flatten"
        if node.target == "mean" and _averages_positions(node):
            return "mean"
    return "other"


def _users(net: _Net, node: fx.Node) -> list[fx.Node]:
    """The users of `node` that consume its values (shape queries dropped); each must take it as its only input."""
    users = [user for user in node.users if _step(net, user) != "shape"]
    for user in users:
        others = [a for a in (*user.args[1:], *user.kwargs.values()) if a is node]
        if not user.args or user.args[0] is not node or others:
            raise _NoFold(f"feeds {_describe(net, user)}")
    return users


def _single_use(net: _Net, node: fx.Node) -> nn.Module:
    """The module `node` calls, checked to run once per forward and to hold no tied parameters."""
    name = str(node.target)
    if net.calls[name] != 1:
        raise _NoFold(f"'{name}' runs {net.calls[name]} times per forward pass")
    if name in net.shared:
        raise _NoFold(f"'{name}' shares its parameters with another module")
    return net.modules[name]


def _check_crossings(net: _Net, edges: list[tuple[fx.Node, fx.Node]], blocking: set[str]) -> None:
    """Refuse a fold that would move the patch across the output of another patch's target (edge u→v leaving it)."""
    for u, v in edges:
        crossed = sorted((_containers(u) - _containers(v)) & blocking)
        if crossed:
            raise _NoFold(f"the fold would cross the patch on '{crossed[0]}', which does not commute with it")


# ---------------------------------------------------------------------------------------------------------------
# fold rules


def _scale_producer(net: _Net, target: fx.Node, scale: torch.Tensor, blocking: set[str]) -> tuple[list, str]:
    """Scale the rows of the Conv/Linear, or the γ/β of the BatchNorm, that produces the target's channels."""
    node, edges, positive = target, [], False
    while _step(net, node) in _SCALE_STEPS:
        positive |= _SCALE_STEPS[_step(net, node)]
        source = node.args[0]
        if not isinstance(source, fx.Node):
            raise _NoFold(f"{_describe(net, node)} has no traced input")
        others = [u for u in source.users if u is not node and _step(net, u) != "shape"]
        if others:
            raise _NoFold(f"{_describe(net, source)} also feeds {_describe(net, others[0])}")
        edges.append((source, node))
        node = source
    module = net.modules.get(node.target) if node.op == "call_module" else None
    shape = _shape(node) or ()
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (isinstance(module, nn.Linear) and len(shape) == 2):
        pass
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and len(shape) >= 2:
        if module.weight is None or module.bias is None:
            raise _NoFold(f"{_describe(net, node)} has no affine γ, β to scale")
    elif node is target and node.op == "call_module":
        raise _NoFold(f"{_describe(net, node)} is not a Conv/Linear/BatchNorm, ReLU, pool or dropout")
    else:
        raise _NoFold(f"reaches {_describe(net, node)}, not a Conv/Linear/BatchNorm")
    _single_use(net, node)
    if shape[1] != scale.numel():
        raise _NoFold(f"{scale.numel()} factors for {shape[1]} channels of {_describe(net, node)}")
    if positive and bool((scale < 0).any()):
        raise _NoFold("negative factors do not commute with ReLU / max-pool")
    _check_crossings(net, edges, blocking)
    return [("scale_out", str(node.target), scale)], f"scales the outputs of '{node.target}'"


def _scale_consumers(net: _Net, target: fx.Node, scale: torch.Tensor, blocking: set[str]) -> tuple[list, str]:
    """Scale the input columns of every Conv2d/Linear the target's channels reach (through ReLU/pools/flatten)."""
    queue, edits, edges, positive = [(target, scale)], [], [], False
    while queue:
        node, factors = queue.pop(0)
        for user in _users(net, node):
            step = _step(net, user)
            edges.append((node, user))
            if step in _SCALE_STEPS:
                positive |= _SCALE_STEPS[step]
                queue.append((user, factors))
                continue
            if step == "flatten":  # channel i of (C, H, W) becomes columns i·H·W … (i+1)·H·W
                queue.append((user, factors.repeat_interleave(math.prod(_shape(node)[2:]))))
                continue
            module = net.modules.get(user.target) if user.op == "call_module" else None
            rank = len(_shape(node))
            if isinstance(module, nn.Conv2d) and module.groups == 1 and rank == 4:
                pass
            elif isinstance(module, nn.Linear) and rank == 2:
                pass
            else:
                raise _NoFold(f"feeds {_describe(net, user)}")
            _single_use(net, user)
            edits.append(("scale_in", str(user.target), factors))
    if not edits:
        raise _NoFold("reaches no Conv/Linear layer")
    if positive and bool((scale < 0).any()):
        raise _NoFold("negative factors do not commute with ReLU / max-pool")
    _check_crossings(net, edges, blocking)
    return edits, "scales the inputs of " + ", ".join(f"'{e[1]}'" for e in edits)


def _dense_consumers(net: _Net, start: fx.Node, edges: list) -> list[str]:
    """The Linear layers a flat (d,) or (d, 1, 1) tensor reaches through dropout / identity / flatten / 1×1 pools."""
    queue, found = [start], []
    while queue:
        node = queue.pop(0)
        for user in _users(net, node):
            step = _step(net, user)
            edges.append((node, user))
            one_position = step in ("flatten", "pool-avg", "pool-max") and (
                math.prod(_shape(node)[2:]) == 1 and math.prod(_shape(user)[2:]) == 1
            )
            if step == "dropout" or one_position:
                queue.append(user)
                continue
            module = net.modules.get(user.target) if user.op == "call_module" else None
            if not (isinstance(module, nn.Linear) and len(_shape(node)) == 2):
                raise _NoFold(f"feeds {_describe(net, user)}")
            if module.bias is None:
                raise _NoFold(f"'{user.target}' has no bias to absorb the PCA mean shift")
            _single_use(net, user)
            found.append(str(user.target))
    if not found:
        raise _NoFold("reaches no Linear layer")
    return found


def _fold_affine(net: _Net, target: fx.Node, matrix, mean, blocking: set[str]) -> tuple[list, str]:
    if math.prod(_shape(target)[2:]) > 1:
        raise _NoFold("PCA position mode before a padded conv is not exact at borders")
    edges: list = []
    linears = _dense_consumers(net, target, edges)
    _check_crossings(net, edges, blocking)
    return [("affine_in", name, matrix, mean) for name in linears], "W·M into " + ", ".join(linears)


def _fold_sum_ratio(net: _Net, target: fx.Node, matrix, mean, blocking: set[str]) -> tuple[list, str]:
    shape = _shape(target)
    if len(shape) != 4:
        raise _NoFold("input-dependent ratio on a non-conv output")
    positions = shape[2] * shape[3]
    queue, pooled, edges = [target], [], []
    while queue:  # dropout / identity, then a global average over all positions
        node = queue.pop(0)
        for user in _users(net, node):
            edges.append((node, user))
            step, module = _step(net, user), net.modules.get(user.target) if user.op == "call_module" else None
            out = _shape(user)
            if step == "dropout":
                queue.append(user)
            elif step == "mean" or (
                step == "pool-avg" and tuple(out[2:]) == (1, 1)
                and (user.target is F.adaptive_avg_pool2d or isinstance(module, nn.AdaptiveAvgPool2d)
                     or (isinstance(module, nn.AvgPool2d) and module.padding in (0, (0, 0))
                         and nn.modules.utils._pair(module.kernel_size) == tuple(shape[2:])))
            ):
                pooled.append(user)
            else:
                raise _NoFold(f"input-dependent ratio: the map feeds {_describe(net, user)}, not a global average pool")
    linears = [name for node in pooled for name in _dense_consumers(net, node, edges)]
    _check_crossings(net, edges, blocking)
    edits = [("affine_in", name, matrix, mean / positions) for name in linears]
    return edits, "W·M into " + ", ".join(linears) + " (through the global average pool)"


SUM_RATIO_NOTE = (
    "equals the patch except on items where a channel sum at the target is exactly 0: the patch zeroes such a "
    "channel (its s = 0 guard), the folded weights apply the affine map on the pooled features"
)


def _plan(model: nn.Module, entry: dict, net: _Net | None, entries: list[dict]) -> FoldPlan:
    key, target, kind = entry["key"], entry["target"], entry["kind"]

    def keep(reason: str) -> FoldPlan:
        return FoldPlan(key, target, kind, False, reason)

    if net is None:
        return keep("network not traceable by torch.fx")
    together = [e for e in entries if e["target"] == target]
    if len(together) > 1 and any(e["kind"] != "channel_scale" for e in together):
        kinds = ", ".join(f"{e['key']} {e['kind']}" for e in together)
        return keep(f"'{target}' carries several patches ({kinds}) whose order matters")
    commuting = kind == "channel_scale"  # diagonal scalings commute with each other, nothing else does
    blocking = {e["target"] for e in entries if e["target"] != target and not (commuting and e["kind"] == kind)}
    patch = model.patches[key]
    try:
        node = _target_node(net, target)
        if kind == "channel_scale":
            scale = patch.scale.detach().to("cpu", torch.float64)
            try:
                edits, how = _scale_producer(net, node, scale, blocking)
            except _NoFold as producer:
                try:
                    edits, how = _scale_consumers(net, node, scale, blocking)
                except _NoFold as consumer:
                    raise _NoFold(f"producer side: {producer}; consumer side: {consumer}") from None
            return FoldPlan(key, target, kind, True, how, tuple(edits))
        matrix = patch.matrix.detach().to("cpu", torch.float64)
        mean = patch.mean.detach().to("cpu", torch.float64)
        if kind == "pca_affine":
            edits, how = _fold_affine(net, node, matrix, mean, blocking)
            return FoldPlan(key, target, kind, True, how, tuple(edits))
        if kind == "pca_sum_ratio":
            edits, how = _fold_sum_ratio(net, node, matrix, mean, blocking)
            return FoldPlan(key, target, kind, True, how, tuple(edits), note=SUM_RATIO_NOTE)
        return keep(f"no fold rule for patch kind '{kind}'")
    except _NoFold as e:
        return keep(str(e))


def fold_plans(model: nn.Module, keys=None) -> list[FoldPlan]:
    """A plan for every patch in `keys` (default: all), in attachment order; nothing is changed."""
    entries = patch_entries(model)
    known = [e["key"] for e in entries]
    wanted = known if keys is None else list(keys)
    unknown = [k for k in wanted if k not in known]
    if unknown:
        raise ModelfixError(f"no patch {unknown[0]} in the model (patches: {', '.join(known) or 'none'})")
    net = _trace(model) if wanted else None
    return [_plan(model, entry, net, entries) for entry in entries if entry["key"] in wanted]


def fold_plan(model: nn.Module, key: str) -> FoldPlan:
    """Whether patch `key` folds exactly (`.foldable`) and how or why not (`.reason`), with the edits it needs."""
    return fold_plans(model, [key])[0]


# ---------------------------------------------------------------------------------------------------------------
# applying and checking


def _apply(net: nn.Module, edits: tuple) -> None:
    """Apply the weight edits of one plan in place: scalings in the weights' dtype (a product of two float32 numbers
    rounds the same either way), the PCA matrix products in float64."""
    with torch.no_grad():
        for op, name, *tensors in edits:
            module = net.get_submodule(name)
            weight, bias = module.weight, module.bias
            tensors = [t.to(weight.device) for t in tensors]
            if op == "scale_out":
                c = tensors[0].to(weight.dtype)  # one rounding, the same as in float64 and back
                weight.mul_(c.view(-1, *([1] * (weight.ndim - 1))))
                if bias is not None:
                    bias.mul_(c)
            elif op == "scale_in":
                weight.mul_(tensors[0].to(weight.dtype).view(1, -1, *([1] * (weight.ndim - 2))))
            elif op == "affine_in":  # W(M a + (I − M) m) + b = (W M) a + (b + W (m − M m)), in float64
                matrix, mean = tensors
                w = weight.detach().double()
                bias.copy_(bias.double() + w @ (mean - matrix @ mean))
                weight.copy_(w @ matrix)
            else:
                raise ValueError(f"unknown fold edit {op}")


def _pooled_form(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Reference for a folded sum-ratio patch: `x + (s' − s)/HW`, which global pooling maps exactly like the patch
    where no channel sum is 0, and which (unlike the ratio) defines s = 0 as the affine map the fold applies."""
    x = args[0]
    s = x.sum(dim=(2, 3))
    refined = module.mean + (s - module.mean) @ module.matrix.T
    return x + ((refined - s) / (x.shape[2] * x.shape[3]))[:, :, None, None]


def _outputs(model: nn.Module, x: torch.Tensor, pooled: list[nn.Module] = ()) -> torch.Tensor:
    training = {module: module.training for module in model.modules()}
    handles = []
    try:
        handles = [patch.register_forward_hook(_pooled_form) for patch in pooled]
        model.eval()
        with torch.no_grad():
            return model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training.items():
            module.training = flag


def _probe(model: nn.Module) -> torch.Tensor:
    """PROBE_ITEMS seeded uniform pixel-space inputs in the card's value range."""
    spec = model.input_spec
    low, high = spec.value_range
    generator = torch.Generator().manual_seed(0)
    x = low + (high - low) * torch.rand(PROBE_ITEMS, spec.channels, spec.height, spec.width, generator=generator)
    reference = next(iter(model.parameters()), torch.zeros(()))
    return x.to(reference.device)


def fold_patches(model: nn.Module, strict: bool = False, keys=None) -> FoldResult:
    """Fold every patch in `keys` (default: all) that folds exactly into `model.net`'s weights and remove it.

    `strict=True`: if any of them cannot fold, raise ModelfixError listing each with its reason and change nothing.
    The folded model is compared with the patched one on a probe batch first; a difference above TOLERANCE
    (relative to the output scale) is a bug in this module: RuntimeError, and the model is left as it was.
    """
    plans = fold_plans(model, keys)
    entries = {e["key"]: e for e in patch_entries(model)}
    kept = [{**entries[p.key], "reason": p.reason} for p in plans if not p.foldable]
    if strict and kept:
        listing = "; ".join(f"{e['key']} ({e['target']}, {e['kind']}): {e['reason']}" for e in kept)
        raise ModelfixError(f"cannot fold every patch: {listing}", hint="drop --fold to keep them as patches")
    good = [p for p in plans if p.foldable]
    if not good:
        return FoldResult([], kept)

    x = _probe(model)
    reference = _outputs(model, x, [model.patches[p.key] for p in good if p.kind == "pca_sum_ratio"])
    trial = copy.deepcopy(model)  # fold a copy first, so a failed check leaves the model untouched
    for plan in good:
        _apply(trial.net, plan.edits)
        remove_patch(trial, plan.key)
    error = float((_outputs(trial, x) - reference).abs().max())
    scale = float(reference.abs().max())
    if not error <= TOLERANCE * max(scale, 1e-12):
        raise RuntimeError(
            f"folding {', '.join(p.key for p in good)} changed the outputs by {error:.3g} (scale {scale:.3g}); "
            "this is a bug in modelfix.repair.fold; the model was left unchanged"
        )
    with torch.no_grad():
        for name in dict.fromkeys(name for plan in good for name in plan.into):
            model.net.get_submodule(name).load_state_dict(trial.net.get_submodule(name).state_dict())
    for plan in good:
        remove_patch(model, plan.key)
    folded = [{**entries[p.key], "into": p.into, **({"note": p.note} if p.note else {})} for p in good]
    return FoldResult(folded, kept)
