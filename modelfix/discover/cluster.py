"""SpRAy's clustering step: heatmaps → comparable features → k-nearest-neighbour graph → spectral clusters, the
number of clusters read off the eigengap of the graph Laplacian, and a 2-D embedding for the picture.

Features are the absolute relevance (evidence for or against the class), area-pooled to `size`×`size` and scaled to
sum 1 per item, so two items compare by *where* their evidence lies, not by how much of it there is or its sign. Not
the positive part alone: on decoy-digits the dark patches of classes 5–9 carry 6–20 % of the |relevance| but almost
none of the positive relevance (the model reads a dim patch as less evidence *against* the class), so with positive
features those classes cluster by digit only (measured on a validation model, seed 1). The clustering
compares their square roots (Hellinger distance): a small region holding a large share of the evidence (a tag)
then counts more than the many small differences a shifted digit makes (measured on tagged-digits: with plain
Euclidean distance the tagged 8s split by digit position into 5 clusters; with the square root they form one).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ModelfixError


def heatmap_features(maps: Tensor, size: int = 14) -> Tensor:
    """N×H×W signed relevance → N×(size·size) float64 rows of |relevance| summing to 1 (an all-zero map stays
    zero)."""
    if maps.dim() != 3:
        raise ValueError(f"expected N×H×W maps, got shape {tuple(maps.shape)}")
    magnitude = maps.detach().double().abs()[:, None]
    small = F.adaptive_avg_pool2d(magnitude, min(size, maps.shape[1], maps.shape[2]))[:, 0].flatten(1)
    total = small.sum(1, keepdim=True)
    return torch.where(total > 0, small / total.clamp_min(1e-300), small)


def knn_affinity(features: Tensor, neighbors: int):
    """Symmetric 0/1 k-nearest-neighbour graph (scipy sparse, float64): an edge when either item is among the
    other's `neighbors` nearest (Euclidean), 1 when both are."""
    from sklearn.neighbors import kneighbors_graph

    graph = kneighbors_graph(features.numpy(), n_neighbors=neighbors, mode="connectivity", include_self=False)
    return (0.5 * (graph + graph.T)).tocsr()


def laplacian_spectrum(affinity, count: int) -> np.ndarray:
    """The `count` smallest eigenvalues of the normalised graph Laplacian, ascending (dense: N is a few hundred)."""
    from scipy.sparse.csgraph import laplacian

    values = np.linalg.eigvalsh(laplacian(affinity, normed=True).toarray())
    return np.clip(values[:count], 0.0, 2.0)


def eigengap(values: np.ndarray, max_clusters: int) -> int:
    """k = the position of the largest gap λ_{k+1} − λ_k among the first `max_clusters` + 1 eigenvalues (von
    Luxburg's heuristic; k connected components give k zero eigenvalues and then a jump)."""
    values = np.asarray(values[:max_clusters + 1], dtype=np.float64)
    if len(values) < 2:
        return 1
    return int(np.argmax(np.diff(values))) + 1


def spectral_clusters(features: Tensor, neighbors: int = 10, max_clusters: int = 8, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, object]:
    """(labels N, Laplacian eigenvalues, affinity) for the rows of `features`. Cluster ids are renumbered by size,
    largest first (ties: the one holding the lower item), so the same input gives the same ids."""
    n = len(features)
    if n < 3:
        raise ModelfixError(f"{n} items cannot be clustered: at least 3 are needed")
    neighbors = max(1, min(neighbors, n - 1))
    affinity = knn_affinity(features.clamp_min(0).sqrt(), neighbors)
    values = laplacian_spectrum(affinity, min(max_clusters + 1, n))
    k = min(eigengap(values, max_clusters), n - 1)
    if k == 1:
        return np.zeros(n, dtype=np.int64), values, affinity
    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():  # a disconnected graph is expected here: its components are the clusters
        warnings.simplefilter("ignore")
        raw = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                                 assign_labels="kmeans", n_init=10).fit_predict(affinity)
    ids = sorted(set(raw.tolist()), key=lambda c: (-(raw == c).sum(), int(np.flatnonzero(raw == c)[0])))
    renumber = {c: i for i, c in enumerate(ids)}
    return np.array([renumber[c] for c in raw], dtype=np.int64), values, affinity


def embed_2d(features: Tensor, affinity=None, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """N×2 coordinates for the picture: t-SNE of the features, or the spectral embedding of `affinity`."""
    n = len(features)
    if n < 3:
        return np.zeros((n, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "spectral":
            from sklearn.manifold import spectral_embedding

            return spectral_embedding(affinity, n_components=2, random_state=seed, drop_first=True)
        if method == "tsne":
            from sklearn.manifold import TSNE

            return TSNE(n_components=2, perplexity=float(min(30, (n - 1) / 3)), init="pca", random_state=seed,
                        max_iter=500).fit_transform(features.clamp_min(0).sqrt().numpy())
    raise ModelfixError(f"--embedding must be tsne or spectral, not '{method}'")
