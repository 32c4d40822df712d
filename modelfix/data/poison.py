"""The one poisoning entry point: paste an artifact on an exact, seeded share of a dataset.

Training data, evaluation at each `--poison` level, and the benchmarks all go through `poison`, so the same seed
gives the same poisoned items and the same artifact placements everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..errors import ArtifactSpecError, DataError
from .artifacts import Artifact, parse_artifact
from .dataset import Dataset
from .source import ImageSource
from .stream import batches

LABEL_MODES = ("correlated", "random", "none")
CHUNK = 8192  # items pasted per call (the artifact draws its randomness once per call)


def _plan(data, artifact, level, labels: str, seed: int):
    """(artifact, chosen item indices sorted, their colour labels or None, the generator after those draws)."""
    artifact = parse_artifact(artifact)
    try:
        level = float(level)
    except (TypeError, ValueError):
        raise DataError(f"poison level must be a number in [0, 1], got {level!r}") from None
    if not (math.isfinite(level) and 0.0 <= level <= 1.0):
        raise DataError(f"poison level must lie in [0, 1], got {level}")
    if labels not in LABEL_MODES:
        raise DataError(f"poison labels must be one of {', '.join(LABEL_MODES)}, not '{labels}'")

    if artifact.target is not None and not 0 <= artifact.target < len(data.class_names):
        # otherwise no item is eligible and the "poisoned" data silently equals the clean data
        raise ArtifactSpecError(f"artifact target {artifact.target} is not a class of the data "
                                f"(classes 0 to {len(data.class_names) - 1})")
    gen = torch.Generator().manual_seed(int(seed))
    n = len(data)
    if labels == "correlated" and artifact.target is not None:
        eligible = torch.nonzero(data.y == artifact.target).flatten()
    else:
        eligible = torch.arange(n)
    k = round(level * len(eligible))
    perm = torch.randperm(len(eligible), generator=gen)
    chosen = eligible[perm[:k]].sort().values

    colours = None
    if artifact.label_coloured:
        if labels == "correlated":
            colours = data.y[chosen]
        elif labels == "random":
            colours = torch.randint(0, len(data.class_names), (k,), generator=gen)
    return artifact, chosen, colours, gen


def poisoned_chunks(data: Dataset | ImageSource, artifact: Artifact | str | dict, level: float,
                    labels: str = "correlated", seed: int = 0,
                    batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices, images, footprints) of the items `poison` pastes on, CHUNK items at a time in index order: a
    pasted copy of those items only and their footprints (bool n×1×H×W). `evaluate` predicts these without
    copying the rest of the dataset; `poison` writes them into its copy. The same items, draws and pixels as
    `poison` (whose docstring has the rules); bad arguments are refused here, before the first chunk.

    A lazy `ImageSource` is read `batch_size` items at a time (each chunk's draws made at once, pasted batch by
    batch: the same pixels as the in-memory chunk), so memory holds one batch, never a chunk."""
    if isinstance(data, ImageSource):
        return ((b["index"], b["pasted"], b["footprint"])
                for b in pasted_batches(data, artifact, level, labels, seed, batch_size))
    artifact, chosen, colours, gen = _plan(data, artifact, level, labels, seed)

    def chunks():
        # One generator call per CHUNK items, as always (the artifact's draws depend on it). Each chunk is one
        # copy of its images; the artifact writes only its own pixels into it.
        for start in range(0, len(chosen), CHUNK):
            idx = chosen[start:start + CHUNK]
            x = data.x[idx]
            footprint = artifact.paste_(x, None if colours is None else colours[start:start + CHUNK], gen)
            yield idx, x, footprint

    return chunks()


def pasted_batches(source: ImageSource, artifact: Artifact | str | dict, level: float, labels: str = "correlated",
                   seed: int = 0, batch_size: int = 256, keep_clean: bool = False) -> Iterator[dict]:
    """The poisoned items of a lazy source, `batch_size` at a time in index order: dicts `index`, `pasted`
    (the images after the source's transform, the artifact pasted on them), `footprint` and, with `keep_clean`,
    `x` (the same images without it). Pasting follows the transform, so the artifact lands on the model's pixels
    exactly as it does on in-memory data (a resize would blur a pasted patch and move it off its mask)."""
    artifact, chosen, colours, gen = _plan(source, artifact, level, labels, seed)

    def stream():
        for start in range(0, len(chosen), CHUNK):
            idx = chosen[start:start + CHUNK]
            drawn = artifact.draw(len(idx), gen)  # the chunk's draws, as one paste_ on the chunk makes them
            for batch in batches(source.subset(idx), batch_size):
                pos = batch["index"]  # positions within the chunk
                x = batch["x"]
                pasted = x.clone() if keep_clean else x
                footprint = artifact.paste_drawn_(pasted, None if colours is None else colours[start:start + CHUNK][pos],
                                                  tuple(d[pos] for d in drawn))
                yield {"index": idx[pos], "pasted": pasted, "footprint": footprint,
                       **({"x": x} if keep_clean else {})}

    return stream()


def poison(data: Dataset, artifact: Artifact | str | dict, level: float, labels: str = "correlated",
           seed: int = 0) -> Dataset:
    """A new dataset with `artifact` pasted on exactly round(level · n_eligible) items chosen by a seeded permutation.

    - `correlated`: a label-coloured artifact encodes each item's true label; an artifact with a `target` class is
      eligible only on items of that class (how training data is built);
    - `random`: a label-coloured artifact encodes a uniformly random label in [0, K) (1 in K still matches);
      `target` is ignored;
    - `none`: a label-coloured artifact uses its fixed colour; `target` is ignored.

    The returned mask is the artifact's footprint on poisoned items and the original mask elsewhere; `has_mask`
    is set on poisoned items; `info["poisoned"]` is the boolean vector, `info["artifact"]` the spec and
    `info["poison"]` the settings. One `torch.Generator(seed)` draws, in order, the permutation, the random
    colours and the artifact's own randomness (corners). The input dataset is never modified.
    """
    artifact = parse_artifact(artifact)
    x, mask, has_mask = data.x.clone(), data.mask.clone(), data.has_mask.clone()
    poisoned = torch.zeros(len(data), dtype=torch.bool)
    for idx, x_part, footprint in poisoned_chunks(data, artifact, level, labels, seed):
        x[idx] = x_part
        mask[idx] = footprint.to(mask.dtype)
        poisoned[idx] = True
    has_mask |= poisoned

    info = {key: value for key, value in data.info.items() if key != "checksum"}
    info["poisoned"] = poisoned
    info["artifact"] = str(artifact)
    info["poison"] = {"level": float(level), "labels": labels, "seed": int(seed)}
    return Dataset(x=x, y=data.y, mask=mask, has_mask=has_mask, group=data.group, class_names=data.class_names,
                   group_names=data.group_names, name=data.name, info=info)
