"""Accuracy on clean and poisoned data: per class, per group, macro-group and worst-group, and the drops.

Definitions (R4's convention, groups default to the true label):
- macro-group accuracy = the unweighted mean over groups of each group's accuracy (groups with no items skipped);
- worst-group accuracy = the minimum over those groups;
- F1 (two-class tasks only) = F1 of class index 1 as the positive class.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from . import distributed
from .data import Artifact, Dataset, ImageSource, batches
from .data.poison import poisoned_chunks
from .errors import ModelfixError
from .progress import progress_bar

LABEL_MODES = ("correlated", "random", "none")


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Arg-max predictions for a whole tensor, batch by batch, in eval mode (state restored afterwards).

    A net with 2-D convolutions runs in the channels-last layout for the call (weights converted and converted
    back; the logits agree to float rounding): torch's CPU max-pool and convs are faster there (tap-cnn predicts
    2.1× faster, docs/benchmarks.md "Performance"). Under torchrun each process predicts its block of the rows
    (`distributed.shard_indices`) and every process gets the whole vector back, so every count and metric computed
    from it equals the one-process value exactly."""
    rows = distributed.shard_indices(len(x))
    parts = (x[rows.start + start: rows.start + min(start + batch_size, len(rows))]
             for start in range(0, len(rows), batch_size))
    return distributed.concat_shards(predict_batches(model, parts))


def predict_batches(model: nn.Module, parts) -> torch.Tensor:
    """Arg-max predictions of an iterable of image batches, concatenated (eval mode, channels-last as `predict`)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    layout = torch.channels_last if convs else torch.contiguous_format
    out = []
    try:
        if convs:
            _convert(model, torch.channels_last)
        with torch.inference_mode():
            for part in parts:
                out.append(model(part.to(device).contiguous(memory_format=layout)).argmax(1).cpu())
    finally:
        if convs:
            _convert(model, torch.contiguous_format)
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def predict_data(model: nn.Module, data: Dataset | ImageSource, batch_size: int = 512) -> torch.Tensor:
    """`predict` on every item of `data`: the whole tensor of in-memory data, a lazy source streamed batch by
    batch (`modelfix.data.batches`; one batch in memory at a time). The batches are the same slices either way,
    so the predictions are the same. (A lazy source is streamed whole by every process under torchrun.)"""
    if isinstance(data, Dataset):
        return predict(model, data.x, batch_size)
    return predict_batches(model, (batch["x"] for batch in batches(data, batch_size)))


def predict_variants(model: nn.Module, x: torch.Tensor, variants: list, start: int = 0, batch_size: int = 512,
                     on_batch=None) -> list[torch.Tensor]:
    """`[predict(model, x, batch_size)` with each variant applied`]`, sharing every batch's prefix: each variant (a
    callable that changes the model and returns a callable undoing it, e.g. attaching patches) may change only the
    top-level children of `model.net` (an `nn.Sequential`) from index `start` on, so the input normalisation and the
    children before `start` run once per batch and only the rest per variant. The same ops on the same tensors in
    the same layout as `predict`, so the same predictions. `start` 0 (or a net that is not a Sequential) runs the
    whole net per variant."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    net = model.net
    children = list(net._modules.values()) if isinstance(net, nn.Sequential) and start > 0 else []
    convs = any(isinstance(m, nn.Conv2d) for m in model.modules())
    layout = torch.channels_last if convs else torch.contiguous_format
    rows = distributed.shard_indices(len(x))
    outs = [torch.empty(len(rows), dtype=torch.long) for _ in variants]
    try:
        if convs:
            _convert(model, torch.channels_last)
        with torch.inference_mode():
            for first in range(0, len(rows), batch_size):
                part = x[rows.start + first : rows.start + min(first + batch_size, len(rows))]
                z = part.to(device).contiguous(memory_format=layout)
                z = (z - model.mean) / model.std
                for child in children[:start]:
                    z = child(z)
                for out, variant in zip(outs, variants):
                    undo = variant()
                    try:
                        logits = z
                        for child in children[start:]:
                            logits = child(logits)
                        logits = logits if children else net(z)
                    finally:
                        undo()
                    out[first : first + batch_size] = logits.argmax(1).cpu()
                if on_batch is not None:
                    on_batch()
    finally:
        if convs:
            _convert(model, torch.contiguous_format)
        model.train(was_training)
    return [distributed.concat_shards(out) for out in outs]


def _convert(model: nn.Module, layout: torch.memory_format) -> None:
    """The weights in `layout`, made outside inference mode even when the caller is in it: weights created there
    would be inference tensors, and the model could no longer be trained."""
    with torch.inference_mode(False):
        model.to(memory_format=layout)


def _rates(correct: torch.Tensor, index: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-index accuracy and count, from one bincount each (no Python loop over items)."""
    count = torch.bincount(index, minlength=size)
    hits = torch.bincount(index, weights=correct.double(), minlength=size)
    return hits / count.clamp(min=1), count


def metrics(pred: torch.Tensor, data: Dataset) -> dict:
    """All metrics of one prediction vector against the dataset's labels and groups."""
    y, group = data.y, data.group
    correct = pred == y
    k = data.num_classes
    per_class, class_count = _rates(correct, y, k)
    n_groups = max(len(data.group_names), int(group.max()) + 1 if len(group) else 0)
    per_group, group_count = _rates(correct, group, n_groups)
    present = group_count > 0
    group_names = list(data.group_names) + [str(i) for i in range(len(data.group_names), n_groups)]
    result = {
        "n": len(y),
        "accuracy": float(correct.double().mean()) if len(y) else float("nan"),
        "per_class": {name: (float(per_class[i]) if class_count[i] else None) for i, name in enumerate(data.class_names)},
        "per_group": {group_names[i]: float(per_group[i]) for i in range(n_groups) if present[i]},
        "macro_group_accuracy": float(per_group[present].mean()) if present.any() else float("nan"),
        "worst_group_accuracy": float(per_group[present].min()) if present.any() else float("nan"),
        "worst_group": group_names[int(torch.where(present, per_group, torch.inf).argmin())] if present.any() else None,
    }
    if k == 2:
        tp = int(((pred == 1) & (y == 1)).sum())
        fp = int(((pred == 1) & (y == 0)).sum())
        fn = int(((pred == 0) & (y == 1)).sum())
        result["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return result


def evaluate(
    model: nn.Module,
    data: Dataset | ImageSource,
    artifact: Artifact | None = None,
    levels: tuple[float, ...] = (0.0,),
    labels: str | tuple[str, ...] = "random",
    seed: int = 0,
    batch_size: int = 512,
    progress: bool = True,
) -> dict:
    """Metrics at every poison level (and, for levels above 0, every label mode) on the same seeded data, and
    the drops from the first row to the others. With labels=("correlated", "random") a decoy model shows its
    shortcut in one table: accuracy when the artifact encodes the true label against a random one.

    Only the items a level poisons are predicted again; the rest reuse the clean predictions. A lazy source is
    streamed: one pass for the clean predictions, and per level one pass over the items it poisons, the artifact
    pasted on each batch after the source's transform (`poisoned_chunks`).
    """
    modes = (labels,) if isinstance(labels, str) else tuple(labels)
    if len(data) == 0:
        raise ModelfixError("the evaluation data is empty")
    for mode in modes:
        if mode not in LABEL_MODES:
            raise ModelfixError(f"--labels must be one of {', '.join(LABEL_MODES)}, not '{mode}'")
    if not modes:
        raise ModelfixError("--labels needs at least one mode")
    for level in levels:
        if not 0.0 <= level <= 1.0:
            raise ModelfixError(f"--poison levels must lie in [0, 1], got {level}")
    if artifact is None and any(level > 0 for level in levels):
        raise ModelfixError("--poison above 0 needs an artifact", hint="pass --artifact SPEC, e.g. corner-patch")
    start = time.perf_counter()
    rows = []
    with progress_bar(enabled=progress) as bar:
        runs = [(level, None) if level == 0 else (level, mode) for level in levels for mode in modes]
        runs = list(dict.fromkeys(runs))  # level 0 once, whatever the modes
        task = bar.add_task("evaluate", total=len(runs))
        clean_pred = predict_data(model, data, batch_size)
        for level, mode in runs:
            bar.update(task, description=f"evaluate poison {level:g}" + (f" ({mode})" if mode else ""))
            if level == 0:
                pred, n_poisoned = clean_pred, 0
            else:
                # The poisoned items alone, chunk by chunk (the same items and pixels as `poison`, without a
                # poisoned copy of the whole set: that copy cost as much as the MLP's forward pass).
                pred, hits = clean_pred.clone(), []
                chunks = poisoned_chunks(data, artifact, level, labels=mode, seed=seed, batch_size=batch_size)
                if isinstance(data, Dataset):
                    for hit, x_hit, _ in chunks:
                        pred[hit] = predict(model, x_hit, batch_size)
                        hits.append(hit)
                else:  # batch by batch from the stream, the model converted to channels-last once
                    def images(chunks=chunks, hits=hits):
                        for hit, x_hit, _ in chunks:
                            hits.append(hit)
                            yield x_hit

                    pasted = predict_batches(model, images())
                    if hits:
                        pred[torch.cat(hits)] = pasted
                n_poisoned = sum(len(hit) for hit in hits)
            rows.append({"level": level, "labels": mode, "n_poisoned": n_poisoned, **metrics(pred, data)})
            bar.advance(task)
    drops = [
        {
            "from": rows[0]["level"],
            "to": row["level"],
            "labels": row["labels"],
            "accuracy": rows[0]["accuracy"] - row["accuracy"],
            "macro_group_accuracy": rows[0]["macro_group_accuracy"] - row["macro_group_accuracy"],
            "worst_group_accuracy": rows[0]["worst_group_accuracy"] - row["worst_group_accuracy"],
        }
        for row in rows[1:]
    ]
    return {
        "levels": rows,
        "drops": drops,
        "settings": {"artifact": str(artifact) if artifact else None, "labels": list(modes), "seed": seed},
        "definitions": {
            "macro_group_accuracy": "unweighted mean over groups of per-group accuracy",
            "worst_group_accuracy": "minimum over groups of per-group accuracy",
            "groups": "true label unless the data names other groups",
            "f1": "F1 of class index 1 (two-class tasks only)",
        },
        "seconds": time.perf_counter() - start,
    }
