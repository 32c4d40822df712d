"""`discover`: explain a model's evidence for each class, cluster the heatmaps and rank the clusters by how
suspicious they are (docs/discover.md). The model is left bit-identical (the explainers promise it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ModelfixError
from ..explain.attribution import attribute, check_method, composite_name, default_composite, relevance_maps
from ..progress import progress_bar
from .cluster import embed_2d, heatmap_features, spectral_clusters
from .score import ClusterScore, score_clusters

SCHEMA = "modelfix.discover/v1"
THRESHOLD = 0.8  # a cluster at or above this score is "suspicious" (docs/discover.md). Checked on seed-1 validation
# models (decoy-digits mlp, tagged-digits egem-cnn; shortcut and clean), not on the benchmark's seed-0 models: clusters
# without the artifact at most 0.74, artifact clusters 0.90–0.99 (decoy-digits class 5, whose patch holds 6 % of its
# relevance: 0.50–0.68)
MIN_ITEMS = 3


@dataclass
class Cluster:
    id: int
    members: list[int]  # dataset indices, ascending
    score: ClusterScore

    @property
    def size(self) -> int:
        return len(self.members)


@dataclass
class ClassClusters:
    """The clusters of one class: `items` (dataset indices, ascending) explained, their signed relevance maps
    (N×H×W), features, cluster labels, the Laplacian's first eigenvalues, the 2-D embedding, and the clusters
    ranked by score (highest first)."""

    cls: int
    name: str
    items: Tensor
    maps: Tensor
    features: Tensor
    labels: np.ndarray
    eigenvalues: np.ndarray
    embedding: np.ndarray
    clusters: list[Cluster] = field(default_factory=list)

    def cluster(self, cid: int) -> Cluster:
        for c in self.clusters:
            if c.id == cid:
                return c
        raise ModelfixError(f"--export: class {self.name} has no cluster {cid} "
                            f"(clusters {', '.join(str(c.id) for c in sorted(self.clusters, key=lambda c: c.id))})")


@dataclass
class DiscoverResult:
    classes: list[ClassClusters]
    settings: dict
    seconds: dict

    def for_class(self, cls: int) -> ClassClusters:
        for entry in self.classes:
            if entry.cls == cls:
                return entry
        raise ModelfixError(f"--export: class {cls} was not explained (classes "
                            f"{', '.join(e.name for e in self.classes)})", hint="add it to --classes")

    def candidates(self, threshold: float = THRESHOLD) -> list[tuple[ClassClusters, Cluster]]:
        """Every cluster scoring at least `threshold`, highest first."""
        found = [(e, c) for e in self.classes for c in e.clusters if c.score.score >= threshold]
        return sorted(found, key=lambda ec: -ec[1].score.score)

    def to_dict(self) -> dict:
        """clusters.json (without the maps): per class the items, labels, embedding and ranked clusters."""
        classes = []
        for e in self.classes:
            classes.append({
                "class": e.cls, "name": e.name, "n": len(e.items), "items": e.items.tolist(),
                "n_clusters": len(e.clusters), "eigenvalues": [float(v) for v in e.eigenvalues],
                "labels": e.labels.tolist(), "embedding": np.round(e.embedding, 4).tolist(),
                "clusters": [{"id": c.id, "rank": rank, "size": c.size, "score": c.score.score,
                              "suspicious": c.score.score >= THRESHOLD, **c.score.parts(), "members": c.members}
                             for rank, c in enumerate(e.clusters)]})
        top = [{"class": e.cls, "name": e.name, "cluster": c.id, "score": c.score.score, "size": c.size}
               for e, c in self.candidates()]
        return {"schema": SCHEMA, "settings": self.settings, "threshold": THRESHOLD, "candidates": top,
                "classes": classes, "seconds": self.seconds}


def pick_items(data, cls: int, max_items: int, seed: int) -> Tensor:
    """Up to `max_items` items labelled `cls`, a seeded sample (all when fewer), in ascending dataset order."""
    idx = torch.nonzero(data.y == cls).flatten()
    if len(idx) > max_items:
        order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed + cls))
        idx = idx[order[:max_items]].sort().values
    return idx


def check_settings(max_items: int, size: int, neighbors: int, max_clusters: int, embedding: str) -> None:
    if max_items < MIN_ITEMS:
        raise ModelfixError(f"--max-items must be at least {MIN_ITEMS} to cluster, not {max_items}")
    for option, value in (("--size", size), ("--neighbors", neighbors), ("--max-clusters", max_clusters)):
        if value < 1:
            raise ModelfixError(f"{option} must be at least 1, not {value}")
    if embedding not in ("tsne", "spectral"):
        raise ModelfixError(f"--embedding must be tsne or spectral, not '{embedding}'")


def resolve_classes(data, classes) -> list[int]:
    """The class indices to explain: `classes` (indices or names; each must hold items), or every class with items."""
    names = list(data.class_names)
    counts = torch.bincount(data.y, minlength=len(names)) if len(data) else torch.zeros(len(names), dtype=torch.long)
    if not classes:
        found = [c for c in range(len(names)) if counts[c] > 0]
        if not found:
            raise ModelfixError("--data holds no items to explain")
        return found
    out = []
    for value in classes:
        text = str(value).strip()
        if text in names:
            cls = names.index(text)
        elif text.isdigit() and int(text) < len(names):
            cls = int(text)
        else:
            raise ModelfixError(f"--classes: '{text}' is not a class of the data (classes: {', '.join(names)})")
        if counts[cls] == 0:
            raise ModelfixError(f"--classes: class {names[cls]} has no items in the data")
        if cls not in out:
            out.append(cls)
    return out


def discover(model: nn.Module, data, classes=None, method: str = "lrp", composite: str | None = None,
             max_items: int = 500, size: int = 14, neighbors: int = 10, max_clusters: int = 8,
             embedding: str = "tsne", batch_size: int = 64, seed: int = 0, progress: bool = True) -> DiscoverResult:
    """Explain, cluster and rank per class (module doc). `classes`: indices or names (default: every class with
    items); each class's own items are explained for that class, up to `max_items` of them."""
    check_method(method)
    check_settings(max_items, size, neighbors, max_clusters, embedding)
    composite = composite or default_composite(model)
    if method == "lrp":
        composite_name(composite)
    wanted = resolve_classes(data, classes)
    names = list(data.class_names)
    picked = {c: pick_items(data, c, max_items, seed) for c in wanted}
    for c, idx in picked.items():
        if len(idx) < MIN_ITEMS:
            raise ModelfixError(f"class {names[c]} has {len(idx)} items: too few to cluster (at least {MIN_ITEMS}; "
                                f"--max-items and the data bound it)", hint="drop it from --classes or add items")
    started = time.perf_counter()
    maps, features = {}, {}
    with progress_bar(progress) as bar:
        task = bar.add_task("explaining", total=sum(len(i) for i in picked.values()))
        for c, idx in picked.items():
            for start in range(0, len(idx), 256):
                part = idx[start:start + 256]
                attr = attribute(model, data.x[part], data.y[part], method=method, composite=composite,
                                 batch_size=batch_size, seed=seed, shard=True)  # split across torchrun processes
                maps.setdefault(c, []).append(relevance_maps(attr))
                bar.advance(task, len(part))
            maps[c] = torch.cat(maps[c])
            features[c] = heatmap_features(maps[c], size)
    explained = time.perf_counter() - started
    result = []
    with progress_bar(progress) as bar:
        task = bar.add_task("clustering", total=len(picked))
        for c, idx in picked.items():
            labels, values, affinity = spectral_clusters(features[c], neighbors, max_clusters, seed)
            others = [features[d] for d in picked if d != c]
            scores = score_clusters(features[c], labels, torch.cat(others) if others else None)
            clusters = [Cluster(k, idx[torch.as_tensor(labels == k)].tolist(), s) for k, s in enumerate(scores)]
            clusters.sort(key=lambda cl: (-cl.score.score, cl.id))
            result.append(ClassClusters(c, names[c], idx, maps[c], features[c], labels, values,
                                        embed_2d(features[c], affinity, embedding, seed), clusters))
            bar.advance(task)
    settings = {"method": method, "composite": composite if method == "lrp" else None, "max_items": max_items,
                "size": size, "neighbors": neighbors, "max_clusters": max_clusters, "embedding": embedding,
                "seed": seed, "classes": wanted}
    clustered = time.perf_counter() - started - explained
    return DiscoverResult(result, settings, {"explain": explained, "cluster": clustered})


def parse_export(text: str, class_names) -> list[tuple[int, int]]:
    """'CLASS:CLUSTER[,CLASS:CLUSTER…]' (class name or index, cluster id) → [(class index, cluster id), …]."""
    names = [str(n) for n in class_names]
    picks = []
    for item in str(text).split(","):
        head, sep, tail = item.strip().rpartition(":")
        if not sep or not tail.strip().isdigit():
            raise ModelfixError(f"--export must be CLASS:CLUSTER (comma-separated, or 'suspicious'), e.g. 8:0, "
                                f"not '{item.strip()}'")
        head = head.strip()
        if head in names:
            cls = names.index(head)
        elif head.isdigit() and int(head) < len(names):
            cls = int(head)
        else:
            raise ModelfixError(f"--export: '{head}' is not a class of the data (classes: {', '.join(names)})")
        picks.append((cls, int(tail)))
    return picks
