"""How suspicious a cluster of heatmaps is (docs/discover.md, "The score").

For a cluster C with mean feature map M_C (each item's positive relevance, pooled and scaled to sum 1) and the
reference map M_ref (the mean over the explained items of the *other* classes; with one class explained, over the
class's other clusters). Not the class's own other clusters when others exist: an artifact on many items of a
class can split into several clusters (by digit position, say), and each would make the region look typical for
the others (measured: 120 tagged-digits 8s split the tagged ones 43/28/26, whose scores fell from 0.9 to 0.5–0.7).

- region R: the fewest cells that hold at least `share` (default 1/2) of M_C's mass (largest cells first);
- compactness = 1 − |R| / cells: the evidence sits in a small part of the image;
- consistency = the share of C's members that put at least half as much of their own relevance in R as M_C does:
  every member uses that region, not just a few strong ones;
- distinctiveness = max(0, 1 − M_ref(R) / M_C(R)): the rest of the data does not use R as much (a digit's strokes
  are typical of every class; a corner tag is not);

score = compactness × consistency × distinctiveness, in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SHARE = 0.5


@dataclass
class ClusterScore:
    score: float
    compactness: float
    consistency: float
    distinctiveness: float
    region: Tensor  # bool cells (flat, like the features)

    def parts(self) -> dict:
        return {"compactness": self.compactness, "consistency": self.consistency,
                "distinctiveness": self.distinctiveness, "region_cells": int(self.region.sum())}


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


def score_cluster(members: Tensor, reference: Tensor, share: float = SHARE) -> ClusterScore:
    """The score of a cluster whose feature rows are `members` (n×P) against the reference map (P, sums to 1)."""
    mean_map = members.double().mean(0)
    region = top_region(mean_map, share)
    inside = members.double()[:, region].sum(1)
    mass = float(mean_map[region].sum())
    compactness = 1.0 - float(region.sum()) / region.numel()
    consistency = float((inside >= 0.5 * mass).double().mean()) if mass > 0 else 0.0
    ref = float(reference.double()[region].sum())
    distinctiveness = max(0.0, 1.0 - ref / mass) if mass > 0 else 0.0
    return ClusterScore(compactness * consistency * distinctiveness, compactness, consistency, distinctiveness,
                        region)


def score_clusters(features: Tensor, labels, others: Tensor | None = None, share: float = SHARE
                   ) -> list[ClusterScore]:
    """One `ClusterScore` per cluster id 0 … max(labels) of one class. The reference is the mean of `others` (the
    other classes' feature rows, each item weighing the same), or without them the mean of the class's other items."""
    labels = torch.as_tensor(labels)
    features = features.double()
    out = []
    for c in range(int(labels.max()) + 1):
        inside = labels == c
        rest = others.double() if others is not None and len(others) else features[~inside]
        reference = rest.mean(0) if len(rest) else torch.zeros(features.shape[1], dtype=torch.float64)
        out.append(score_cluster(features[inside], reference, share))
    return out
