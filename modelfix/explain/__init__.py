"""Explanations of a `Classifier`'s decisions (heatmaps on pixel positions)."""

from modelfix.explain.lrp import conservation, lrp, relevance_share

__all__ = ["conservation", "lrp", "relevance_share"]
