"""Find shortcuts nobody told us about: SpRAy-style clustering of explanations (docs/discover.md).

`discover` explains, clusters and ranks; `export_clusters` turns chosen clusters into repair inputs;
`render_html` draws the gallery."""

from .cluster import eigengap, embed_2d, heatmap_features, knn_affinity, spectral_clusters
from .core import (SCHEMA, THRESHOLD, ClassClusters, Cluster, DiscoverResult, discover, parse_export, pick_items,
                   resolve_classes)
from .export import cluster_region, export_clusters, region_channels
from .gallery import embedding_svg, render_html
from .score import ClusterScore, score_cluster, score_clusters, top_region

__all__ = ["eigengap", "embed_2d", "heatmap_features", "knn_affinity", "spectral_clusters", "SCHEMA", "THRESHOLD",
           "ClassClusters", "Cluster", "DiscoverResult", "discover", "parse_export", "pick_items",
           "resolve_classes", "cluster_region", "export_clusters", "region_channels", "embedding_svg",
           "render_html", "ClusterScore", "score_cluster", "score_clusters", "top_region"]
