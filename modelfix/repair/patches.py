"""Patches: repairs that cannot be folded into stock weights, saved as `modelfix.patch.*` tensors plus card entries.

A patch is a real `nn.Module` (so zennit can give it a rule) applied to the output of a named module inside
`Classifier.net` by a forward hook that returns `patch(output)`. The patch modules live in `Classifier.patches`
(a `ModuleDict` keyed `p0, p1, …`: module names contain dots, which `ModuleDict` forbids), never as children of a
user module — an `nn.Sequential` would otherwise also run them in its own forward. The user's modules and
state-dict keys stay untouched, so a patched file loaded into the plain architecture with `strict=True` fails on
the `modelfix.patch.*` keys instead of silently dropping the repair.

Card entry per patch: `{"key": "p0", "target": "layer2", "kind": "channel_scale", ...method info}`; tensors are
`modelfix.patch.<key>.<buffer>`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from modelfix.errors import CheckpointError, ModelfixError

PATCH_PREFIX = "modelfix.patch."


class ChannelScale(nn.Module):
    """EGEM's soft pruning (paper Eq. 5): `a_i ← c_i · a_i`, one factor per unit (dense) or channel (conv)."""

    kind = "channel_scale"

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().to(torch.float32).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, *([1] * (x.ndim - 2)))


class PCAffine(nn.Module):
    """PCA-EGEM's linear map (paper Eq. 6): `a ← ā + M (a − ā)` with `M = U diag(c) Uᵀ`.

    Dense tensors `(N, d)` are mapped as vectors; conv maps `(N, C, H, W)` per position (the `position` mode, a 1×1
    affine convolution).
    """

    kind = "pca_affine"

    def __init__(self, matrix: torch.Tensor, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix.detach().to(torch.float32).clone())
        self.register_buffer("mean", mean.detach().to(torch.float32).reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return self.mean + (x - self.mean) @ self.matrix.T
        centred = x - self.mean.view(1, -1, 1, 1)
        return torch.einsum("ij,njhw->nihw", self.matrix, centred) + self.mean.view(1, -1, 1, 1)


class PCASumRatio(nn.Module):
    """PCA-EGEM on conv maps in the paper code's `sum` mode (commit e9b127c): refine the per-image channel sums
    `s` in PCA space, `s' = ā + M (s − ā)`, and rescale each channel map by `s'/s`.

    The ratio is input-dependent (not foldable) and, as in the reference, detached, so gradients see it as a
    constant. `s = 0` is replaced by 1e-6 as the reference does; where `s ≈ 0` the ratio can be large or negative.
    """

    kind = "pca_sum_ratio"

    def __init__(self, matrix: torch.Tensor, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix.detach().to(torch.float32).clone())
        self.register_buffer("mean", mean.detach().to(torch.float32).reshape(-1).clone())

    def ratio(self, x: torch.Tensor) -> torch.Tensor:
        s = x.detach().sum(dim=(2, 3))
        refined = self.mean + (s - self.mean) @ self.matrix.T
        return refined / torch.where(s == 0, torch.full_like(s, 1e-6), s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ratio(x)[:, :, None, None]


def _from_tensors(cls: type[nn.Module], names: tuple[str, ...]) -> Callable[[Mapping[str, torch.Tensor]], nn.Module]:
    def build(tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        return cls(*(tensors[name] for name in names))

    return build


# kind -> build(buffers by name) -> patch module. A method with a new patch type adds it here.
PATCH_KINDS: dict[str, Callable[[Mapping[str, torch.Tensor]], nn.Module]] = {
    ChannelScale.kind: _from_tensors(ChannelScale, ("scale",)),
    PCAffine.kind: _from_tensors(PCAffine, ("matrix", "mean")),
    PCASumRatio.kind: _from_tensors(PCASumRatio, ("matrix", "mean")),
}


class _ApplyPatch:
    """The forward hook on the target module: replace its output by `patch(output)`.

    An object rather than a closure so that `copy.deepcopy(model)` maps `patch` to the copy's patch module.
    """

    def __init__(self, key: str, patch: nn.Module):
        self.key = key
        self.patch = patch

    def __call__(self, module: nn.Module, args: object, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ModelfixError(f"patch {self.key}: its target returned {type(output).__name__}, not one tensor")
        return self.patch(output)


def _store(model: nn.Module) -> tuple[nn.ModuleDict, dict[str, dict]]:
    if "patches" not in model._modules:
        model.add_module("patches", nn.ModuleDict())
        model.patch_info = {}
    return model.patches, model.patch_info


def attach_patch(model: nn.Module, target: str, patch: nn.Module, info: Mapping | None = None) -> str:
    """Apply `patch` to the output of `model.net.<target>` from now on; returns its key (`p0`, `p1`, …).

    `info` (JSON-ready) is stored in the card entry next to `key`, `target` and `kind`. Several patches on one
    target run in the order they were attached.
    """
    net = model.net
    try:
        module = net.get_submodule(target)
    except AttributeError:
        raise ModelfixError(f"cannot patch '{target}': no such module in the network") from None
    if getattr(type(patch), "kind", None) not in PATCH_KINDS:
        raise TypeError(f"{type(patch).__name__} is not a registered patch kind")
    patches, infos = _store(model)
    index = 0
    while f"p{index}" in patches:
        index += 1
    key = f"p{index}"
    patches[key] = patch.to(next(iter(model.buffers()), torch.zeros(())).device)
    infos[key] = {"key": key, "target": target, "kind": type(patch).kind, **dict(info or {})}
    module.register_forward_hook(_ApplyPatch(key, patches[key]))
    return key


def patch_entries(model: nn.Module) -> list[dict]:
    """The card entries of the patches in `model`, in attachment order (empty for an unpatched model)."""
    if "patches" not in model._modules:
        return []
    return [dict(model.patch_info[key]) for key in model.patches]


def remove_patch(model: nn.Module, key: str) -> None:
    """Detach patch `key`: its hook goes, its module and entry are forgotten."""
    entry = model.patch_info.pop(key)
    module = model.net.get_submodule(entry["target"])
    for handle_id, hook in list(module._forward_hooks.items()):
        if isinstance(hook, _ApplyPatch) and hook.key == key:
            del module._forward_hooks[handle_id]
    del model.patches[key]


def remove_patches(model: nn.Module) -> None:
    """Detach every patch (the model computes what its stock weights compute again)."""
    for entry in patch_entries(model):
        remove_patch(model, entry["key"])


def apply_patches(model: nn.Module, entries: list[dict], tensors: Mapping[str, torch.Tensor]) -> None:
    """Re-insert the patches a card lists, in order; an unknown kind or a missing tensor is refused, never skipped."""
    used: set[str] = set()
    for entry in entries:
        kind = entry.get("kind") if isinstance(entry, Mapping) else None
        if kind not in PATCH_KINDS:
            raise CheckpointError(
                f"unknown patch kind '{kind}' in checkpoint (written by a newer modelfix?)",
                hint=f"known kinds: {', '.join(PATCH_KINDS)}",
            )
        key, target = entry.get("key"), entry.get("target")
        prefix = f"{PATCH_PREFIX}{key}."
        buffers = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        try:
            patch = PATCH_KINDS[kind](buffers)
        except KeyError as e:
            raise CheckpointError(f"patch {key} ({kind}) lacks its tensor {prefix}{e.args[0]}") from None
        used.update(prefix + name for name in buffers)
        info = {k: v for k, v in entry.items() if k not in ("key", "target", "kind")}
        new_key = attach_patch(model, str(target), patch, info)
        if new_key != key:  # keep the file's keys so a re-save writes the same names
            model.patch_info[key] = {**model.patch_info.pop(new_key), "key": key}
            patches = model.patches
            patches[key] = patches[new_key]
            hooks = model.net.get_submodule(str(target))._forward_hooks
            for hook in hooks.values():
                if isinstance(hook, _ApplyPatch) and hook.key == new_key:
                    hook.key = key
            del patches[new_key]
    unused = sorted(set(tensors) - used)
    if unused:
        raise CheckpointError(f"patch tensors not described by the card: {', '.join(unused[:3])}")


def patch_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The patch tensors (keys under `modelfix.patch.`) and card entries describing the patches in `model`."""
    entries = patch_entries(model)
    tensors = {
        f"{PATCH_PREFIX}{entry['key']}.{name}": buffer
        for entry in entries
        for name, buffer in model.patches[entry["key"]].named_buffers()
    }
    return tensors, entries
