"""The refinement set of the post-hoc methods (EGEM paper §4.4, Supp. F; notes §3.5).

Approved samples the model predicts correctly, at most N per class, split stratified into fit (80 %) and
validation (`ceil(20 %)` per class) *before* oversampling, so no duplicate crosses the split. Oversampling each part
to its share of N per class is represented by integer multiplicities (`fit_counts`, `val_counts`) on the unique
samples: statistics and accuracies weighted by them equal those of the duplicated set exactly, at the cost of the
unique samples only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from modelfix.data.dataset import Dataset
from modelfix.data.source import ImageSource
from modelfix.data.stream import take, to_dataset
from modelfix.errors import DataError
from modelfix.evaluate import predict, predict_data


@dataclass
class RefinementSplit:
    """Unique fit and validation samples with their oversampling multiplicities (`counts[i]` copies of item i)."""

    fit: Dataset
    fit_counts: torch.Tensor
    val: Dataset
    val_counts: torch.Tensor
    summary: dict = field(default_factory=dict)

    def expanded(self, part: str = "fit") -> Dataset:
        """The oversampled dataset itself (duplicates materialised), for methods that train on it."""
        data, counts = (self.fit, self.fit_counts) if part == "fit" else (self.val, self.val_counts)
        return data.subset(torch.repeat_interleave(torch.arange(len(data)), counts))


def _check_pool(class_counts: torch.Tensor, what: str) -> None:
    if int(class_counts.sum()) == 0:
        raise DataError(f"the {what} is empty", hint="give a folder or scenario with approved samples of every class")
    present = int((class_counts > 0).sum())
    if present < 2:
        raise DataError(
            f"the {what} has samples of only {present} class" + ("" if present == 1 else "es"),
            hint="the refinement needs approved samples of at least two classes",
        )


def _multiplicities(n_unique: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """Counts summing to `total` over `n_unique` items: every item `total // n` times, the rest drawn without
    replacement. (Fewer unique items than `total` means oversampling; more never happens: the pool is capped.)"""
    counts = torch.full((n_unique,), total // n_unique, dtype=torch.long)
    extra = torch.randperm(n_unique, generator=generator)[: total % n_unique]
    counts[extra] += 1
    return counts


def refinement_split(
    model: nn.Module,
    data: Dataset | ImageSource,
    samples_per_class: int = 700,
    val_fraction: float = 0.2,
    seed: int = 0,
    keep_incorrect: bool = False,
    approved: torch.Tensor | None = None,
    batch_size: int = 256,
) -> RefinementSplit:
    """Build the fit/validation parts from a pool of samples.

    - `approved`: optional bool mask over `data` (e.g. from `explain.lrp.relevance_share`); others are dropped;
    - unless `keep_incorrect`, samples the model gets wrong are dropped (the paper's "correctly predicted");
    - per class: the first N usable samples in a seeded order of the pool, `ceil(val_fraction·n)` of them to
      validation, then each part oversampled to `N − ceil(val_fraction·N)` and `ceil(val_fraction·N)` items.

    The pool is predicted batch by batch in that order, skipping items of classes that have N usable samples
    already, and the walk stops once every class has N usable samples or none left, so a large pool is predicted
    only as far as the split needs (about N per class over the accuracy); the result is the one a prediction of
    the whole pool would give. The summary's `correct` and `pool_accuracy` count the predicted items (`predicted`
    of them). A lazy source is read batch by
    batch in that walk, and only the split's items are decoded into its in-memory parts.
    """
    if samples_per_class < 2:
        raise DataError(f"--samples-per-class must be at least 2, got {samples_per_class}")
    _check_pool(data.class_counts(), "clean set")
    summary: dict = {"pool": len(data)}
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    if approved is not None:
        order = order[approved.bool()[order]]
        summary["approved"] = len(order)
    k_classes = data.num_classes
    left = torch.bincount(data.y[order], minlength=k_classes)  # items of each class not walked yet
    found = torch.zeros(k_classes, dtype=torch.long)  # usable items of each class found so far
    usable, predicted, correct = [], 0, 0
    start = 0
    while start < len(order):
        need = (found < samples_per_class) & (left > 0)
        if not bool(need.any()):
            break
        # The next `batch_size` items of classes that still need samples: an item of a class that has N already
        # can never be chosen, so it is not predicted (a rare class no longer drags the whole pool through).
        window = order[start:start + 8 * batch_size]
        wanted = need[data.y[window]].nonzero().squeeze(1)[:batch_size]
        end = int(wanted[-1]) + 1 if len(wanted) == batch_size else len(window)
        left -= torch.bincount(data.y[window[:end]], minlength=k_classes)
        start += end
        idx = window[wanted]
        if not keep_incorrect:
            x = data.x[idx] if isinstance(data, Dataset) else None
            pred = predict(model, x, batch_size) if x is not None else predict_data(model, data.subset(idx), batch_size)
            ok = pred == data.y[idx]
            predicted, correct = predicted + len(idx), correct + int(ok.sum())
            idx = idx[ok]
        usable.append(idx)
        found += torch.bincount(data.y[idx], minlength=k_classes)
    if not keep_incorrect:
        summary.update(predicted=predicted, correct=correct, pool_accuracy=correct / predicted if predicted else 0.0)
        if correct == 0:
            raise DataError("the model predicts none of the clean samples correctly; nothing to refine on",
                            hint="check that the data matches the model (classes, input scaling), or --keep-incorrect")
    _check_pool(found, "set of correctly predicted" + (" approved" if approved is not None else "") + " samples")
    usable = torch.cat(usable)

    n_val_total = math.ceil(val_fraction * samples_per_class)
    n_fit_total = samples_per_class - n_val_total
    fit_idx, val_idx, fit_counts, val_counts = [], [], [], []
    per_class, missing = {}, []
    for k in range(k_classes):
        members = usable[data.y[usable] == k][:samples_per_class]
        if len(members) == 0:
            missing.append(data.class_names[k])
            continue
        n_val = math.ceil(val_fraction * len(members))
        if len(members) - n_val < 1:
            raise DataError(
                f"class '{data.class_names[k]}' has only {len(members)} usable sample(s); need at least 2 "
                "(one to fit, one to validate)",
                hint="add approved samples of that class, or drop the class from the clean set",
            )
        val_idx.append(members[:n_val])
        fit_idx.append(members[n_val:])
        val_counts.append(_multiplicities(n_val, n_val_total, generator))
        fit_counts.append(_multiplicities(len(members) - n_val, n_fit_total, generator))
        per_class[data.class_names[k]] = {"unique": len(members), "val_unique": n_val}
    fit = take(data, torch.cat(fit_idx))
    val = take(data, torch.cat(val_idx))
    summary.update(
        samples_per_class=samples_per_class,
        classes=len(per_class),
        fit_unique=len(fit),
        val_unique=len(val),
        fit_size=int(torch.cat(fit_counts).sum()),
        val_size=int(torch.cat(val_counts).sum()),
        per_class=per_class,
        missing_classes=missing,
        seed=seed,
    )
    return RefinementSplit(fit, torch.cat(fit_counts), val, torch.cat(val_counts), summary)


@torch.inference_mode()
def weighted_accuracy(model: nn.Module, data: Dataset, counts: torch.Tensor, batch_size: int = 256) -> float:
    """Accuracy on the oversampled set that `counts` describes (each item weighted by its multiplicity)."""
    correct = (predict(model, data.x, batch_size) == data.y).double()
    return float((correct * counts.double()).sum() / counts.double().sum())


def approved_by_relevance(model: nn.Module, pool: Dataset, min_relevance: float) -> torch.Tensor:
    """EGEM's sample approval: keep an item when at least `min_relevance` of its |LRP| lies inside its mask, which
    marks the RELEVANT region (the pool's masks, from --approve-mask); items without a mask are not approved."""
    from modelfix.explain.lrp import relevance_share

    if not 0.0 <= min_relevance <= 1.0:
        raise DataError(f"--min-relevance must be in [0, 1], got {min_relevance}")
    return pool.has_mask & (relevance_share(model, pool, pool.mask) >= min_relevance)


def split_for_repair(model: nn.Module, pool: Dataset, samples_per_class: int = 700, keep_incorrect: bool = False,
                     min_relevance: float | None = None, seed: int = 0, batch_size: int = 256) -> RefinementSplit:
    """The refinement split every post-hoc method starts from: approval (when `min_relevance` is given), then
    `refinement_split`."""
    if min_relevance is not None and isinstance(pool, ImageSource):
        pool = to_dataset(pool)  # approval weighs every item's relevance inside its mask: whole tensors
    approved = None if min_relevance is None else approved_by_relevance(model, pool, min_relevance)
    split = refinement_split(model, pool, samples_per_class=samples_per_class, seed=seed,
                             keep_incorrect=keep_incorrect, approved=approved, batch_size=batch_size)
    split.summary["warnings"] = [
        f"class '{name}' has no usable sample in the clean pool: the repair cannot see it (add approved samples of it)"
        for name in split.summary["missing_classes"]]
    if approved is not None:
        split.summary["approval"] = {"min_relevance": min_relevance, "missing_masks": int((~pool.has_mask).sum())}
    return split
