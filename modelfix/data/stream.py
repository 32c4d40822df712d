"""One batch stream for every dataset: dict batches `x, y, mask, has_mask, group, index`.

An in-memory `Dataset` is sliced (no per-item Python: as fast as a bare torch loop); an `ImageSource` goes
through a `torch.utils.data.DataLoader` (worker processes, pinned memory and non-blocking copies on CUDA). Both
paths draw the same order from the same seed, so they yield the same batches bit for bit.

The order is `sampler` when given (e.g. a `DistributedSampler`; the caller calls its `set_epoch`), else a
`torch.randperm` from `seed` when shuffling, else the item order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from ..errors import DataError
from .dataset import Dataset
from .source import ImageSource
from .transforms import Augment, item_generator

KEYS = ("x", "y", "mask", "has_mask", "group", "index")
MAX_MATERIALISE_BYTES = 8 * 2**30  # to_dataset refuses more than this much float32 pixel data


def _order(n: int, shuffle: bool, seed: int, sampler: Iterable[int] | None,
           generator: torch.Generator | None) -> list[int] | None:
    if sampler is not None:
        if shuffle:
            raise DataError("pass either shuffle or a sampler (the sampler decides the order)")
        return [int(i) for i in sampler]
    if shuffle:
        generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))
        return torch.randperm(n, generator=generator).tolist()
    return None


def _as_float(x: Tensor) -> Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x


class _Augmented(torch.utils.data.Dataset):
    """A source's items with the augmentation applied in the worker, drawn from (seed, item index) only."""

    def __init__(self, source: ImageSource, augment: Augment | None, seed: int):
        self.source, self.augment, self.seed = source, augment, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        item = self.source[i]
        if self.augment is not None and "error" not in item:
            x, mask = self.augment(item["x"], item["mask"], item_generator(self.seed, i))
            item = {**item, "x": x, "mask": mask}
        return item


def collate(items: list[dict]) -> dict:
    """Stack items; a batch mixing uint8 and float images is float (uint8 ÷ 255); an item's decoding error makes
    the batch an `error` entry (raised by the stream in the main process)."""
    errors = [it["error"] for it in items if "error" in it]
    if errors:
        return {"error": errors[0]}
    xs = [it["x"] for it in items]
    if len({x.dtype for x in xs}) > 1:
        xs = [_as_float(x) for x in xs]
    return {"x": torch.stack(xs), **{k: torch.stack([it[k] for it in items]) for k in KEYS[1:]}}


def _to(batch: dict, device: torch.device | None) -> dict:
    if device is not None:
        batch = {k: v.to(device, non_blocking=device.type == "cuda") for k, v in batch.items()}
    batch["x"] = _as_float(batch["x"])  # uint8 crosses processes and the bus; ÷ 255 on the device
    return batch


def augment_batch(batch: dict, augment: Augment, seed: int) -> dict:
    """Each item of a batch augmented from (seed, its `index`), image and mask alike."""
    xs, masks = [], []
    for x, m, i in zip(batch["x"], batch["mask"], batch["index"].tolist()):
        x, m = augment(x, m, item_generator(seed, i))
        xs.append(x)
        masks.append(m)
    return {**batch, "x": torch.stack(xs), "mask": torch.stack(masks)}


def batches(data: Dataset | ImageSource, batch_size: int, shuffle: bool = False, seed: int = 0,
            workers: int | None = None,
            device: str | torch.device | None = None, augment: Augment | None = None,
            sampler: Iterable[int] | None = None, drop_last: bool = False,
            generator: torch.Generator | None = None) -> Iterator[dict[str, Tensor]]:
    """Yield dict batches `x` (float32), `y`, `mask`, `has_mask`, `group`, `index` on `device`.

    `seed` fixes the shuffle and the augmentation draws (pass seed + epoch for new ones each epoch); a
    `generator`, when given, draws the shuffle instead (one generator across epochs gives exactly the orders of
    `Dataset.batches(shuffle=True, generator=...)`, as the training loop draws them today). `workers` is the
    DataLoader's worker processes (lazy sources only, default the source's `workers`; in-memory data is sliced in
    this process).
    """
    workers = getattr(data, "workers", 0) if workers is None else workers
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise DataError(f"workers must be 0 or more, got {workers}")
    if not isinstance(data, (Dataset, ImageSource)):
        raise DataError(f"cannot batch a {type(data).__name__}; expected a Dataset or an ImageSource")
    device = torch.device(device) if device is not None else None
    order = _order(len(data), shuffle, seed, sampler, generator)
    if isinstance(data, Dataset):
        if order is None:
            stream = data.batches(batch_size, drop_last=drop_last)
        else:  # the given order, sliced like Dataset.batches slices a shuffle
            idx = torch.tensor(order, dtype=torch.long)
            stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
            stream = ({"x": data.x[s], "y": data.y[s], "mask": data.mask[s], "has_mask": data.has_mask[s],
                       "group": data.group[s], "index": s}
                      for s in (idx[i:i + batch_size] for i in range(0, stop, batch_size)))
        for batch in stream:
            if augment is not None:
                batch = augment_batch(batch, augment, seed)
            yield _to(dict(batch), device)
        return
    loader = torch.utils.data.DataLoader(
        _Augmented(data, augment, seed), batch_size=batch_size, sampler=order, num_workers=workers,
        collate_fn=collate, pin_memory=device is not None and device.type == "cuda", drop_last=drop_last)
    for batch in loader:
        if "error" in batch:
            raise DataError(batch["error"], hint="check the files first with check='decode' (and skip_bad)")
        yield _to(batch, device)


def take(data: Dataset | ImageSource, idx) -> Dataset:
    """The items at `idx` as an in-memory `Dataset`: a subset of in-memory data, or only those items of a lazy
    source decoded (what a command that needs random access to a bounded number of items materialises)."""
    if isinstance(data, Dataset):
        return data.subset(idx)
    return to_dataset(data.subset(idx))


def to_dataset(source: ImageSource, workers: int | None = None, max_bytes: int = MAX_MATERIALISE_BYTES) -> Dataset:
    """The whole source decoded into an in-memory `Dataset` (for commands that need whole tensors); refuses more
    than `max_bytes` of float32 pixels."""
    if isinstance(source, Dataset):
        return source
    c, h, w = source.shape
    need = len(source) * (c + 1) * h * w * 4
    if need > max_bytes:
        raise DataError(f"data '{source.name}' would take {need / 2**30:.1f} GiB in memory "
                        f"({len(source)} images of {c}×{h}×{w} plus masks)",
                        hint="stream it in batches instead, or use a smaller input size")
    # filled batch by batch into tensors of the final size: a list of batches and their concatenation would hold
    # the pixels twice at the peak
    x, mask = torch.empty(len(source), c, h, w), torch.empty(len(source), 1, h, w)
    for batch in batches(source, 256, workers=workers):  # workers None: the source's
        x[batch["index"]], mask[batch["index"]] = batch["x"], batch["mask"]
    return Dataset(x=x, y=source.y.clone(), mask=mask, has_mask=source.has_mask.clone(), group=source.group.clone(),
                   class_names=source.class_names, group_names=source.group_names, name=source.name,
                   info=dict(source.info))
