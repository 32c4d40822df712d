"""Artifact reliance: how much of an explanation falls on the artifact, per item and per poison level.

A model that uses a shortcut puts its relevance on the artifact; a repaired one should not. Three mask-based
localisation scores (the ones Quantus calls RelevanceMassAccuracy, PointingGame and, close to, TopKIntersection)
are computed here on pixel relevance maps `R` (N×H×W) and artifact masks `M` (N×H×W, 1 = artifact):

- relevance mass (Arras, Osman & Samek 2022, "CLEVR-XAI", Information Fusion 81, "relevance mass accuracy"),
  on absolute relevance: `Σ|R|·M / Σ|R|`;
- top-quartile overlap (Zhang, Williams & Toni 2024, TAP, AAAI; their `explanation_overlap.py`): the set `T` of
  the 25 % pixels with the largest `|R|`, recall `|T ∩ M| / |M|` and precision `|T ∩ M| / |T|`;
- pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop", IJCV): the pixel with
  the largest `|R|` lies in `M`.

Higher means more reliance on the artifact for all three. Masks are binarised at 0.5 (the data's masks are 0/1).
The explainer is a callable `(x, targets) -> maps`, so any attribution method plugs in without this module
importing it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .. import distributed
from ..data import Artifact, Dataset, parse_artifact, poison
from ..errors import ModelfixError
from ..evaluate import LABEL_MODES, predict
from ..progress import progress_bar

Explainer = Callable[[Tensor, Tensor], Tensor]

QUARTILE = 0.25

DEFINITIONS = {
    "relevance": "|R| per pixel, summed over channels when a map has several",
    "relevance_mass": "share of absolute relevance inside the artifact mask, sum|R|*M / sum|R| "
                      "(Arras et al. 2022); 0 for an all-zero map",
    "top_quartile_recall": "share of the artifact mask covered by the top 25 % pixels by |R| (TAP's overlap "
                           "check); items with an empty mask skipped",
    "top_quartile_precision": "share of the top 25 % pixels by |R| that lie on the artifact",
    "pointing_game": "share of items whose largest-|R| pixel lies on the artifact (Zhang et al. 2018)",
    "mask_share": "mean share of the image area the artifact mask covers: the chance level of relevance mass, "
                  "top-quartile precision and pointing game (a map spread evenly, or a random pixel)",
}

REGIONS = {
    "footprint": "level 0: clean images, measured where the artifact would be pasted (the baseline)",
    "pasted": "the poisoned items, measured on the pasted artifact",
    "data masks": "the data's own masks (no artifact given)",
}


# ---- metrics on maps -------------------------------------------------------------------------------------------


def _flatten(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """`(|R|, M)` as float64 N×P and bool N×P; maps and masks may be N×H×W or N×1×H×W."""
    maps = torch.as_tensor(maps).detach()
    masks = torch.as_tensor(masks).detach()
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.dim() != 3 or masks.shape != maps.shape:
        raise ValueError(f"maps and masks must both be N×H×W (or N×1×H×W), got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)}")
    magnitude = maps.abs().double().reshape(len(maps), -1)
    inside = (masks.to(maps.device) > 0.5).reshape(len(masks), -1)
    return magnitude, inside


def relevance_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Per item the share of absolute relevance inside the mask, `Σ|R|·M / Σ|R|` (float64 N).

    Arras et al. 2022 ("relevance mass accuracy", Quantus `RelevanceMassAccuracy`) on `|R|`, so relevance of either
    sign on the artifact counts as reliance. An all-zero map gives 0, never NaN: no relevance, no reliance.
    """
    magnitude, inside = _flatten(maps, masks)
    total = magnitude.sum(1)
    within = (magnitude * inside).sum(1)
    return torch.where(total > 0, within / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(total))


def top_quartile_overlap(maps: Tensor, masks: Tensor, fraction: float = QUARTILE) -> tuple[Tensor, Tensor]:
    """Per item `(recall, precision)` (float64 N each) of the top-`fraction` pixels `T` by `|R|` against the mask:
    recall `|T ∩ M| / |M|`, precision `|T ∩ M| / |T|`.

    `T` holds the first `k = ceil(fraction·H·W)` pixels of a stable descending sort of `|R|`, so ties go to the
    pixel earlier in row-major order; pixels with `|R| = 0` never enter `T` (they carry no relevance, and a
    tie-break among them would favour the top rows), so `|T| ≤ k`. The TAP paper's `explanation_overlap.py`
    thresholds at the `1 − fraction` quantile with a strict `>`, which likewise leaves zero-relevance pixels out;
    it reports the decoy's coverage by the *remaining* pixels, i.e. `1 − recall` here.

    An empty mask gives recall NaN (the aggregator skips it); an all-zero map gives precision 0.
    """
    fraction = float(fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    magnitude, inside = _flatten(maps, masks)
    n, p = magnitude.shape
    k = min(p, math.ceil(round(fraction * p, 6)))  # round first: 0.1·30 is 3.0000000000000004 in floats
    order = torch.sort(magnitude, dim=1, descending=True, stable=True).indices[:, :k]
    top = torch.zeros_like(inside).scatter_(1, order, True) & (magnitude > 0)
    hits = (top & inside).sum(1).double()
    size = inside.sum(1).double()
    chosen = top.sum(1).double()
    recall = torch.where(size > 0, hits / size.clamp_min(1), torch.full_like(hits, math.nan))
    precision = torch.where(chosen > 0, hits / chosen.clamp_min(1), torch.zeros_like(hits))
    return recall, precision


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Per item whether the largest-`|R|` pixel lies in the mask (bool N); Zhang et al. 2018, Quantus
    `PointingGame`.

    As in Quantus, a tie for the maximum is a hit when any of the tied pixels lies in the mask; an all-zero map
    points nowhere and is a miss.
    """
    magnitude, inside = _flatten(maps, masks)
    peak = magnitude.max(1, keepdim=True).values
    return ((magnitude == peak) & inside).any(1) & (peak[:, 0] > 0)


# ---- over a dataset --------------------------------------------------------------------------------------------


def _targets(targets: str | int, y: Tensor, x: Tensor, predict_fn: Callable[[Tensor], Tensor] | None) -> Tensor:
    if isinstance(targets, int) and not isinstance(targets, bool):
        return torch.full_like(y, targets)
    if targets == "true":
        return y
    if targets == "pred":
        if predict_fn is None:
            raise ModelfixError("explaining the predicted class needs the model's predictions (predict_fn)")
        return torch.as_tensor(predict_fn(x)).long().cpu()
    raise ModelfixError(f"the explained class must be 'true', 'pred' or a class index, not '{targets}'")


def _pixel_maps(maps: Tensor, x: Tensor) -> Tensor:
    """The explainer's output as N×H×W maps; N×C×H×W maps are reduced to `Σ_c |R_c|` (as TAP's overlap script
    and `lrp.relevance_share` do)."""
    maps = torch.as_tensor(maps).detach()
    n, _, h, w = x.shape
    if maps.dim() == 4:
        maps = maps.abs().sum(1)
    if tuple(maps.shape) != (n, h, w):
        raise ValueError(f"the explainer must return maps N×H×W or N×C×H×W for a batch {tuple(x.shape)}, "
                         f"got {tuple(maps.shape)}")
    return maps.cpu()


def _summary(n: int, mass: float, recall_sum: float, recall_n: int, precision: float, pointing: float,
             area: float = math.nan) -> dict:
    """Means over the items used (recall over the items with a non-empty mask); NaN where nothing was measured."""
    return {
        "n": n,
        "relevance_mass": mass / n if n else math.nan,
        "top_quartile_recall": recall_sum / recall_n if recall_n else math.nan,
        "top_quartile_precision": precision / n if n else math.nan,
        "pointing_game": pointing / n if n else math.nan,
        "mask_share": area / n if n else math.nan,
        "definitions": dict(DEFINITIONS),
    }


def _measure(data: Dataset, explainer: Explainer, targets: str | int, predict_fn, batch_size: int,
             progress: bool, label: str) -> dict:
    """The reliance sums over every item of `data` (all of them are taken to carry a mask). Under torchrun each
    process measures its block of whole batches (`distributed.batch_block`) and the per-batch sums of every process
    are added in batch order, as one process adds them: the same numbers exactly."""
    rows = distributed.batch_block(len(data), batch_size)
    sums = []  # per batch: relevance mass, recall sum, recall count, precision, pointing game, mask area
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(label, total=len(rows))
        part = data if len(rows) == len(data) else data.subset(slice(rows.start, rows.stop))
        for batch in part.batches(batch_size):
            x = batch["x"]
            maps = _pixel_maps(explainer(x, _targets(targets, batch["y"], x, predict_fn)), x)
            recall, prec = top_quartile_overlap(maps, batch["mask"])
            known = ~recall.isnan()
            sums.append((float(relevance_mass(maps, batch["mask"]).sum()), float(recall[known].sum()),
                         int(known.sum()), float(prec.sum()), float(pointing_game(maps, batch["mask"]).sum()),
                         float(_flatten(maps, batch["mask"])[1].double().mean(1).sum())))
            bar.advance(task, len(x))
    mass = recall_sum = precision = pointing = area = 0.0
    recall_n = 0
    for batch_mass, batch_recall, batch_known, batch_precision, batch_pointing, batch_area in \
            distributed.gather_lists(sums):
        mass += batch_mass
        recall_sum += batch_recall
        recall_n += batch_known
        precision += batch_precision
        pointing += batch_pointing
        area += batch_area
    return _summary(len(data), mass, recall_sum, recall_n, precision, pointing, area)


def reliance(data: Dataset, explainer: Explainer, targets: str | int = "true",
             predict_fn: Callable[[Tensor], Tensor] | None = None, batch_size: int = 64,
             progress: bool = False) -> dict:
    """Mean artifact reliance of `explainer`'s maps over the items of `data` that have a mask (`data.has_mask`).

    `explainer(x, targets)` gets a pixel-space batch and one class per item (`targets="true"`: the labels;
    `"pred"`: `predict_fn(x)`; an int: that class) and returns N×H×W maps (N×C×H×W maps are reduced by
    `Σ_c |R_c|`). Returns `{"n", "relevance_mass", "top_quartile_recall", "top_quartile_precision",
    "pointing_game", "definitions"}`: means over the items used; the recall skips items whose mask is empty.
    """
    used = data if bool(data.has_mask.all()) else data.subset(data.has_mask)
    if len(used) == 0:
        raise ModelfixError(f"--explain needs artifact masks, but none of the {len(data)} items has one",
                            hint="poison the data (--poison LEVEL --artifact SPEC) or pass --masks DIR")
    return _measure(used, explainer, targets, predict_fn, batch_size, progress, "artifact reliance")


def reliance_by_level(model: nn.Module, data: Dataset, artifact: Artifact | str | dict | None,
                      levels: tuple[float, ...], labels: str | tuple[str, ...], explainer: Explainer, seed: int = 0,
                      targets: str | int = "true", batch_size: int = 64, progress: bool = False) -> list[dict]:
    """`reliance` at every poison level (and, above 0, every label mode), on the items `evaluate` scores there.

    The runs, their order and the poisoning calls are `evaluate`'s: `poison(data, artifact, level, labels=mode,
    seed=seed)`, level 0 once whatever the modes. Above 0 the metrics are measured on the poisoned items
    (`info["poisoned"]`) against the pasted artifact's mask; a level that poisons no item gives `n = 0` and NaN.

    At level 0 nothing is pasted, so the metrics are measured on the clean images against the artifact's
    *footprint*: the mask `poison(data, artifact, 1.0, labels="none", seed=seed)` returns for every item (the
    artifact objects expose their footprint only through `apply`, and going through `poison` draws the random
    corners exactly as a poisoning would; with labels "none" and "correlated" the draws coincide, so for an
    artifact without `target` the footprint is where level 1 "correlated" pastes it). This is the baseline: the
    relevance a clean image already has in that region. Without an artifact, level 0 uses the data's own masks.

    `model` gives the explained class when `targets="pred"`. Each row: `{"level", "labels", "region", **reliance}`.
    """
    modes = (labels,) if isinstance(labels, str) else tuple(labels)
    if not modes:
        raise ModelfixError("--labels needs at least one mode")
    for mode in modes:
        if mode not in LABEL_MODES:
            raise ModelfixError(f"--labels must be one of {', '.join(LABEL_MODES)}, not '{mode}'")
    for level in levels:
        if not 0.0 <= level <= 1.0:
            raise ModelfixError(f"--poison levels must lie in [0, 1], got {level}")
    if artifact is None and any(level > 0 for level in levels):
        raise ModelfixError("--poison above 0 needs an artifact", hint="pass --artifact SPEC, e.g. corner-patch")
    artifact = None if artifact is None else parse_artifact(artifact)
    # predict runs in inference mode; the clone is an ordinary tensor that an explainer may use under autograd.
    predict_fn = (lambda x: predict(model, x, batch_size).clone()) if targets == "pred" else None
    runs = list(dict.fromkeys((level, None) if level == 0 else (level, mode) for level in levels for mode in modes))
    rows = []
    for level, mode in runs:
        label = f"reliance at poison {level:g}" + (f" ({mode})" if mode else "")
        if level == 0 and artifact is None:
            region = "data masks"
            result = reliance(data, explainer, targets, predict_fn, batch_size, progress)
        elif level == 0:
            region = "footprint"
            footprint = poison(data, artifact, 1.0, labels="none", seed=seed).mask
            clean = data.with_(mask=footprint, has_mask=torch.ones(len(data), dtype=torch.bool))
            result = _measure(clean, explainer, targets, predict_fn, batch_size, progress, label)
        else:
            region = "pasted"
            poisoned = poison(data, artifact, level, labels=mode, seed=seed)
            hit = poisoned.info["poisoned"]
            if hit.any():
                result = _measure(poisoned.subset(hit), explainer, targets, predict_fn, batch_size, progress, label)
            else:
                result = _summary(0, 0.0, 0.0, 0, 0.0, 0.0)
        result["definitions"]["region"] = REGIONS[region]
        rows.append({"level": level, "labels": mode, "region": region, **result})
    return rows
