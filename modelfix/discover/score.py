"""How suspicious a cluster of heatmaps is (docs/discover.md, "The score").

For a cluster C with mean feature map M_C (each item's |relevance|, pooled and scaled to sum 1) and a reference map
M_ref:

- region R: the fewest cells that hold at least `share` (default 1/2) of the *excess* max(0, M_C − M_ref) (largest
  cells first): where C puts more evidence than the reference does;
- compactness = 1 − |R| / cells: that excess sits in a small part of the image;
- consistency = the share of C's members that put at least half as much of their own relevance in R as M_C does:
  every member uses that region, not just a few strong ones;
- distinctiveness = max(0, 1 − M_ref(R) / M_C(R)): the reference does not use R as much;

where M_ref is first spread to each cell's 3×3 neighbourhood (its maximum there, `spread`): a region right next to
where the reference looks (a stroke shifted by a cell) is not distinctive.

score = compactness × consistency × distinctiveness, in [0, 1]. Two references are tried and the higher score is
kept: the mean over the explained items of the *other classes* (a tag on some items of one class: the other classes
do not look there, even when the tag's items split into several clusters of their own class), and the mean over the
class's *other clusters* (an artifact on every item of every class, as DecoyMNIST's corner patch: each class looks at
the corners, but one corner cluster's items look at that corner and the class's other clusters do not). The region
comes from the excess, not from M_C itself, so an artifact holding a small share of a class's evidence (a dark
patch: LRP's relevance scales with the input) still defines the region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SHARE = 0.5


@dataclass
class ClusterScore:
    score: float
    compactness: float
    consistency: float
    distinctiveness: float
    region: Tensor  # bool cells (flat, like the features)
    reference: str = "other classes"  # which reference gave the score: "other classes" or "other clusters"

    def parts(self) -> dict:
        return {"compactness": self.compactness, "consistency": self.consistency,
                "distinctiveness": self.distinctiveness, "region_cells": int(self.region.sum()),
                "reference": self.reference}


def top_region(mean_map: Tensor, share: float = SHARE) -> Tensor:
    """Bool mask of the fewest entries of `mean_map` (≥ 0) holding at least `share` of its sum (ties: lower index)."""
    flat = mean_map.flatten().double()
    total = float(flat.sum())
    region = torch.zeros(flat.shape, dtype=torch.bool)
    if total <= 0:
        return region.reshape(mean_map.shape)
    order = torch.sort(flat, descending=True, stable=True).indices
    count = int(torch.searchsorted(torch.cumsum(flat[order], 0), share * total * (1 - 1e-12))) + 1
    region[order[:min(count, len(flat))]] = True
    return region.reshape(mean_map.shape)


def spread(flat_map: Tensor) -> Tensor:
    """A flat square map (P = s·s cells) → each cell the largest value of its 3×3 neighbourhood: the reference counts
    as using a cell when it uses the cell or one next to it, so a stroke shifted by a cell is not distinctive."""
    size = int(round(len(flat_map) ** 0.5))
    if size * size != len(flat_map):
        return flat_map
    square = flat_map.reshape(1, 1, size, size)
    return F.max_pool2d(square, 3, stride=1, padding=1).flatten()


def score_cluster(members: Tensor, reference: Tensor, share: float = SHARE, name: str = "other classes"
                  ) -> ClusterScore:
    """The score of a cluster whose feature rows are `members` (n×P) against the reference map (P, sums to 1)."""
    mean_map = members.double().mean(0)
    ref_map = spread(reference.double())
    region = top_region((mean_map - ref_map).clamp_min(0), share)
    inside = members.double()[:, region].sum(1)
    mass = float(mean_map[region].sum())
    compactness = 1.0 - float(region.sum()) / region.numel()
    consistency = float((inside >= 0.5 * mass).double().mean()) if mass > 0 else 0.0
    distinctiveness = max(0.0, 1.0 - float(ref_map[region].sum()) / mass) if mass > 0 else 0.0
    return ClusterScore(compactness * consistency * distinctiveness, compactness, consistency, distinctiveness,
                        region, name)


def score_clusters(features: Tensor, labels, others: Tensor | None = None, share: float = SHARE
                   ) -> list[ClusterScore]:
    """One `ClusterScore` per cluster id 0 … max(labels) of one class: the higher of the scores against the mean of
    `others` (the other classes' feature rows, each item weighing the same) and against the mean of the class's
    other clusters (module doc); with neither, an all-zero reference."""
    labels = torch.as_tensor(labels)
    features = features.double()
    out = []
    for c in range(int(labels.max()) + 1):
        inside = labels == c
        references = []
        if others is not None and len(others):
            references.append(("other classes", others.double().mean(0)))
        if bool((~inside).any()):
            references.append(("other clusters", features[~inside].mean(0)))
        if not references:
            references.append(("none", torch.zeros(features.shape[1], dtype=torch.float64)))
        scores = [score_cluster(features[inside], ref, share, name) for name, ref in references]
        out.append(max(scores, key=lambda s: s.score))  # ties: the first (other classes)
    return out
