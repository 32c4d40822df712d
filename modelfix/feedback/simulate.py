"""Automated yes/no/maybe feedback from masks, standing in for a person (methods_posthoc.md §6.4).

The paper simulates its users from *relevant* annotations (mouth boxes on CelebA, bird masks on Waterbirds) and,
for DecoyMNIST, from the known artifact corners. modelfix datasets carry the opposite kind of mask,
`data.mask` = 1 on the spurious/artifact pixels, so the rules here are phrased on the artifact; a relevant mask can
be passed in addition for the sample rule's "yes". The thresholds are ours (the paper gives none except the 20 % of
DecoyMNIST) and are returned as a settings dict, for the file header and the report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ModelfixError
from .files import NeuronFeedback, SampleFeedback, sample_ids
from .gallery import TopK, default_patch, patch_box


def _check_share(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ModelfixError(f"{name} must lie in [0, 1], got {value}")
    return value


def _need_masks(data) -> None:
    if not bool(data.has_mask.any()):
        raise ModelfixError("simulated feedback needs artifact masks, but the data has none",
                            hint="use a scenario with an artifact, or pass --masks")


def simulate_neurons(top: TopK, data, patch: int | None = None, min_overlap_pixels: int = 1,
                     max_artifact_share: float = 0.5) -> tuple[NeuronFeedback, dict]:
    """A neuron is "no" (prune) when MORE than `max_artifact_share` of its top-k patches intersect the artifact,
    else "yes" (keep). A patch intersects when its box (`patch_box`, side `patch`, default 2·stride) holds at least
    `min_overlap_pixels` artifact pixels (mask > 0) of that image; an item without a mask never intersects.

    The paper's Waterbirds rule is on the *relevant* mask: yes iff all, or all but one, of the 10 patches
    intersect the bird, no otherwise; its CelebA rule: yes iff all 20 patches contain a mouth. Ours uses the
    artifact mask, which is what modelfix data carries; `max_artifact_share` = 0.5 is a majority vote.
    `top` must come from `top_activations` on this same `data` (its indices are positions in it).
    """
    _need_masks(data)
    share_limit = _check_share("max_artifact_share", max_artifact_share)
    if int(min_overlap_pixels) < 1:
        raise ModelfixError(f"min_overlap_pixels must be at least 1, got {min_overlap_pixels}")
    if top.indices.numel() and int(top.indices.max()) >= len(data):
        raise ModelfixError("the top-k items do not belong to this data (an index is past its end)")
    image_size = (int(data.x.shape[2]), int(data.x.shape[3]))
    side = default_patch(top.map_size, image_size) if patch is None else int(patch)
    artifact = (data.mask[:, 0] > 0) & data.has_mask[:, None, None]
    verdicts, shares = {}, []
    for j in range(top.indices.shape[0]):
        hits = 0
        for item, cell in zip(top.indices[j].tolist(), top.cells[j].tolist()):
            t, l, b, r = patch_box(cell, top.map_size, image_size, side)
            hits += int(artifact[item, t:b, l:r].sum()) >= min_overlap_pixels
        share = hits / max(1, top.indices.shape[1])
        shares.append(share)
        verdicts[j] = "no" if share > share_limit else "yes"
    fb = NeuronFeedback(top.layer or None, verdicts, int(top.indices.shape[0]))
    settings = {"rule": "no if more than max_artifact_share of the top-k patches hold >= min_overlap_pixels "
                        "artifact pixels, else yes",
                "k": int(top.indices.shape[1]), "patch": side, "min_overlap_pixels": int(min_overlap_pixels),
                "max_artifact_share": share_limit, "prune": len(fb.prune), "keep": len(fb.keep)}
    return fb, settings


def attention_share(maps: Tensor, mask: Tensor) -> Tensor:
    """f_n = Σ_hw M_n·m_n / Σ_hw M_n with the N×1×H×W mask area-downsampled to the map grid
    (`adaptive_avg_pool2d`, exact when the sizes divide); NaN where a map sums to zero."""
    small = F.adaptive_avg_pool2d(mask.float(), tuple(maps.shape[1:]))[:, 0]
    maps = maps.double()
    total = maps.sum(dim=(1, 2))
    return (maps * small.double()).sum(dim=(1, 2)) / total


def simulate_samples(maps: Tensor, data, no_above: float = 0.2, yes_relevant_at_least: float = 0.5,
                     relevant_mask: Tensor | None = None) -> tuple[SampleFeedback, dict]:
    """Per sample: "no" if the share f of its saliency map on the artifact exceeds `no_above`; otherwise "yes"
    if `relevant_mask` (N×1×H×W, 1 = relevant) is given and the share on it is at least `yes_relevant_at_least`;
    otherwise "maybe". A map that sums to zero, or an item without an artifact mask, cannot be "no".

    Without a relevant mask this is the paper's DecoyMNIST rule (no if more than 20 % of the input-gradient
    attention lies on the corner squares, maybe otherwise, no "yes"). `maps` are N×h×w, non-negative.
    """
    _need_masks(data)
    no_above = _check_share("no_above", no_above)
    yes_at = _check_share("yes_relevant_at_least", yes_relevant_at_least)
    n = len(data)
    if maps.dim() != 3 or maps.shape[0] != n:
        raise ModelfixError(f"saliency maps must be N×h×w with N = {n}, got shape {tuple(maps.shape)}")
    if bool((maps < 0).any()) or not bool(torch.isfinite(maps).all()):
        raise ModelfixError("saliency maps must be finite and non-negative (Grad-CAM after ReLU, |gradient|)")
    artifact = attention_share(maps, data.mask * data.has_mask[:, None, None, None])
    relevant = None
    if relevant_mask is not None:
        if tuple(relevant_mask.shape) != tuple(data.mask.shape):
            raise ModelfixError(f"relevant mask must have shape {tuple(data.mask.shape)}, "
                                f"got {tuple(relevant_mask.shape)}")
        relevant = attention_share(maps, relevant_mask)
    ids = sample_ids(data)
    verdicts = {}
    for i in range(n):
        if bool(artifact[i] > no_above):  # NaN (an all-zero map) compares false
            verdicts[ids[i]] = "no"
        elif relevant is not None and bool(relevant[i] >= yes_at):
            verdicts[ids[i]] = "yes"
        else:
            verdicts[ids[i]] = "maybe"
    fb = SampleFeedback(verdicts, source="simulated feedback")
    values = list(verdicts.values())
    settings = {"rule": "f = sum(M*mask)/sum(M), mask area-downsampled to the map; no if f > no_above; "
                        "yes if the share on the relevant mask >= yes_relevant_at_least; else maybe",
                "no_above": no_above, "yes_relevant_at_least": yes_at if relevant is not None else None,
                "map_size": list(maps.shape[1:]), **{v: values.count(v) for v in ("yes", "no", "maybe")}}
    return fb, settings


def corner_region(data, size: int = 4):
    """`data` with its mask replaced by the four size×size corner squares of every image: the region the CRAYON
    paper's DecoyMNIST rule scores ("no if more than 20 % of the attention lies in the four 4×4 corners"), which
    covers every place the decoy patch can sit, not just where it sits in that image."""
    _, _, h, w = data.x.shape
    if not 1 <= int(size) <= min(h, w) // 2:
        raise ModelfixError(f"--corner-size must be between 1 and {min(h, w) // 2} for {h}×{w} images, not {size}")
    s = int(size)
    mask = torch.zeros(len(data), 1, h, w)
    for rows in (slice(0, s), slice(h - s, h)):
        for cols in (slice(0, s), slice(w - s, w)):
            mask[:, :, rows, cols] = 1
    return data.with_(mask=mask, has_mask=torch.ones(len(data), dtype=torch.bool))
