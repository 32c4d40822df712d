"""Patches: repairs that cannot be folded into stock weights, saved as `modelfix.patch.*` tensors plus card entries.

A patch kind registers `apply(model, entry, tensors) -> None` in `PATCH_KINDS`; each card entry is a dict with at
least a `kind`. Loading re-applies the patches listed in the card; saving asks `patch_state` what to write.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from modelfix.errors import CheckpointError

PATCH_PREFIX = "modelfix.patch."

# kind -> apply(model, entry, tensors); filled in by the methods that write patches (e.g. EGEM scales).
PATCH_KINDS: dict[str, Callable[[nn.Module, dict, Mapping[str, torch.Tensor]], None]] = {}


def apply_patches(model: nn.Module, entries: list[dict], tensors: Mapping[str, torch.Tensor]) -> None:
    """Re-insert the patches a card lists, in order; an unknown kind is refused rather than silently skipped."""
    for entry in entries:
        kind = entry.get("kind") if isinstance(entry, Mapping) else None
        if kind not in PATCH_KINDS:
            raise CheckpointError(
                f"unknown patch kind '{kind}' in checkpoint (written by a newer modelfix?)",
                hint=f"known kinds: {', '.join(PATCH_KINDS) or 'none'}",
            )
        PATCH_KINDS[kind](model, entry, tensors)


def patch_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The patch tensors (keys under `modelfix.patch.`) and card entries describing the patches in `model`.

    No patch kind exists yet, so this returns nothing.
    """
    return {}, []
