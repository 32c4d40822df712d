"""The in-memory dataset every command shares: whole tensors of items `(x, y, mask, group)`.

Holding whole tensors (instead of per-item files) keeps batching a slice of a tensor, so training and evaluation
run at the speed of a bare torch loop, and makes a dataset easy to fingerprint (`checksum`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

# `info` entries that hold one value per item; `subset` indexes them along with the tensors.
PER_ITEM_INFO = ("poisoned", "index", "files")


@dataclass(eq=False)
class Dataset(torch.utils.data.Dataset):
    """Items `(x, y, mask, group)` held as whole tensors in pixel space.

    - `x`: float32 N×C×H×W (pixel space, usually [0, 1]);
    - `y`: int64 N, labels in [0, K);
    - `mask`: float32 N×1×H×W, 1 = spurious/irrelevant, 0 = keep; zeros where an item has no mask;
    - `has_mask`: bool N (a zero mask from a file is still a mask; a missing file is not);
    - `group`: int64 N, defaults to the label; `group_names` names them;
    - `class_names`: K names (default "0".."K-1"); `name`; `info` (source, scenario, seed, checksum, ...).
    """

    x: Tensor
    y: Tensor
    mask: Tensor | None = None
    has_mask: Tensor | None = None
    group: Tensor | None = None
    class_names: Sequence[str] | None = None
    group_names: Sequence[str] | None = None
    name: str = "data"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"dataset '{self.name}'"
        x = torch.as_tensor(self.x)
        if x.dim() != 4:
            raise DataError(f"{where}: x must be N×C×H×W, got shape {tuple(x.shape)}")
        if not (x.is_floating_point() or x.dtype == torch.uint8):
            raise DataError(f"{where}: x must hold floats, got {x.dtype}")
        x = (x.float() / 255 if x.dtype == torch.uint8 else x.float()).contiguous()
        n, _, h, w = x.shape
        # A sum is a fast first check (NaN and inf propagate); only a non-finite sum pays for the exact test.
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise DataError(f"{where}: x holds NaN or infinite values")

        y = torch.as_tensor(self.y)
        if y.shape != (n,):
            raise DataError(f"{where}: y must have shape ({n},) to match x, got {tuple(y.shape)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise DataError(f"{where}: y must hold integer labels, got {y.dtype}")
        y = y.long().contiguous()
        if n and int(y.min()) < 0:
            raise DataError(f"{where}: y holds a negative label ({int(y.min())})")

        if self.class_names is None:
            k = int(y.max()) + 1 if n else 0
            class_names = [str(i) for i in range(k)]
        else:
            class_names = [str(c) for c in self.class_names]
            if len(set(class_names)) != len(class_names):
                raise DataError(f"{where}: class_names has duplicates: {class_names}")
        if n and int(y.max()) >= len(class_names):
            raise DataError(f"{where}: label {int(y.max())} but only {len(class_names)} class names")

        if self.mask is None:
            mask = torch.zeros(n, 1, h, w)
        else:
            mask = torch.as_tensor(self.mask)
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)
            if tuple(mask.shape) != (n, 1, h, w):
                raise DataError(f"{where}: mask must have shape ({n}, 1, {h}, {w}) to match x, got {tuple(mask.shape)}")
            mask = mask.float().contiguous()

        if self.has_mask is None:
            has_mask = torch.zeros(n, dtype=torch.bool) if self.mask is None else torch.ones(n, dtype=torch.bool)
        else:
            has_mask = torch.as_tensor(self.has_mask)
            if has_mask.shape != (n,):
                raise DataError(f"{where}: has_mask must have shape ({n},), got {tuple(has_mask.shape)}")
            has_mask = has_mask.bool().contiguous()

        default_groups = self.group is None
        if default_groups:
            group = y.clone()
        else:
            group = torch.as_tensor(self.group)
            if group.shape != (n,):
                raise DataError(f"{where}: group must have shape ({n},) to match y, got {tuple(group.shape)}")
            if group.is_floating_point() or group.dtype == torch.bool:
                raise DataError(f"{where}: group must hold integers, got {group.dtype}")
            group = group.long().contiguous()
            if n and int(group.min()) < 0:
                raise DataError(f"{where}: group holds a negative value ({int(group.min())})")
        if self.group_names is None:
            if default_groups:
                group_names = list(class_names)
            else:
                group_names = [str(i) for i in range(int(group.max()) + 1 if n else 0)]
        else:
            group_names = [str(g) for g in self.group_names]
            if n and int(group.max()) >= len(group_names):
                raise DataError(f"{where}: group {int(group.max())} but only {len(group_names)} group names")

        self.x, self.y, self.mask, self.has_mask, self.group = x, y, mask, has_mask, group
        self.class_names, self.group_names = class_names, group_names
        self.info = dict(self.info)

    # ---- the torch Dataset protocol ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.x[i], self.y[i], self.mask[i], self.group[i]

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, n={len(self)}, shape={self.shape}, classes={self.num_classes}, "
                f"with_mask={int(self.has_mask.sum())})")

    # ---- views and copies --------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.x.shape[1:])

    def class_counts(self) -> Tensor:
        """Number of items per class (int64, length K)."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def subset(self, idx) -> Dataset:
        """The items at `idx` (indices, a bool mask, a slice or a list); per-item `info` entries follow along.

        The stored `checksum` is dropped (it described the whole set); `checksum()` recomputes one.
        """
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise DataError(f"dataset '{self.name}': a boolean subset needs {len(self)} entries, "
                                f"got {tuple(idx.shape)}")
            idx = torch.nonzero(idx).flatten()
        idx = idx.long().flatten()
        info = {}
        for key, value in self.info.items():
            if key == "checksum":
                continue
            if key in PER_ITEM_INFO and len(value) == len(self):
                value = value[idx] if isinstance(value, Tensor) else [value[int(i)] for i in idx]
            info[key] = value
        return Dataset(x=self.x[idx], y=self.y[idx], mask=self.mask[idx], has_mask=self.has_mask[idx],
                       group=self.group[idx], class_names=self.class_names, group_names=self.group_names,
                       name=self.name, info=info)

    def with_(self, **changes) -> Dataset:
        """A copy with some fields replaced (validated again); tensors not replaced are shared."""
        return dataclasses.replace(self, **changes)

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[dict[str, Tensor]]:
        """Yield dicts of tensor slices `x, y, mask, has_mask, group, index` (index = item positions).

        Whole-tensor slicing, no per-item Python: this is what keeps loops as fast as a bare torch loop.
        In order, the slices are views; shuffled (a `torch.randperm` from `generator`), they are gathered copies.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if order is None:
                sel = slice(start, end)
                index = torch.arange(start, end)
            else:
                sel = index = order[start:end]
            yield {"x": self.x[sel], "y": self.y[sel], "mask": self.mask[sel], "has_mask": self.has_mask[sel],
                   "group": self.group[sel], "index": index}

    # ---- fingerprint -------------------------------------------------------------------------------------------

    def checksum(self) -> str:
        """First 16 hex characters of the sha256 of the bytes of x, y and mask (what a model sees and is told).

        Remembered while x, y and mask are the same tensor objects, unmodified (torch bumps a tensor's version on
        every in-place change): a scenario's split is hashed once when built and again when a report records it."""
        tensors = (self.x, self.y, self.mask)
        versions = tuple(t._version for t in tensors)
        memo = self.__dict__.get("_checksum_memo")  # (tensors, their versions, value); holds the tensors it names
        if memo is not None and all(a is b for a, b in zip(memo[0], tensors)) and memo[1] == versions:
            return memo[2]
        digest = hashlib.sha256()
        for t in tensors:
            digest.update(np.ascontiguousarray(t.detach().cpu().numpy()).data)
        value = digest.hexdigest()[:16]
        self.__dict__["_checksum_memo"] = (tensors, versions, value)
        return value
