"""index.html of `modelfix discover`: per class the 2-D embedding coloured by cluster (inline SVG), and per
cluster its score, size, mean heatmap and some members with their heatmaps. Self-contained (PNGs as data URIs),
no script; every text that comes from the data or the user is escaped."""

from __future__ import annotations

import base64
import html

import numpy as np
import torch

from ..explain.heatmap import colorize, image_png_bytes, png_bytes
from .core import THRESHOLD, DiscoverResult

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
SHOWN = 8  # members shown per cluster: the ones whose heatmap is closest to the cluster's mean


def _img(data: bytes, alt: str, size: int = 56) -> str:
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{src}" alt="{html.escape(alt)}" width="{size}" height="{size}">'


def embedding_svg(points: np.ndarray, labels: np.ndarray, size: int = 260) -> str:
    """A scatter plot as inline SVG: one circle per item, coloured by cluster id."""
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) == 0:
        return ""
    low, high = pts.min(0), pts.max(0)
    span = np.where(high - low > 0, high - low, 1.0)
    xy = 10 + (pts - low) / span * (size - 20)
    circles = "".join(f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="3" fill="{PALETTE[int(k) % len(PALETTE)]}">'
                      f'<title>cluster {int(k)}</title></circle>' for (x, y), k in zip(xy, labels))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img" '
            f'aria-label="2-D embedding of the heatmaps, coloured by cluster">'
            f'<rect width="{size}" height="{size}" fill="#fafafa" stroke="#ccc"/>{circles}</svg>')


def render_html(result: DiscoverResult, data, title: str, value_range=(0.0, 1.0)) -> str:
    low, high = value_range
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(str(result.settings.get('method')))} heatmaps, spectral clusters per class; "
             f"score = compactness × consistency × distinctiveness (docs/discover.md); "
             f"suspicious at ≥ {THRESHOLD}.</p>"]
    candidates = result.candidates()
    if candidates:
        items = "".join(f"<li>class {html.escape(e.name)}, cluster {c.id}: score {c.score.score:.3f}, "
                        f"{c.size} items — export with <code>--export {html.escape(e.name)}:{c.id}</code></li>"
                        for e, c in candidates)
        parts.append(f"<h2>Suspicious clusters</h2><ul>{items}</ul>")
    else:
        parts.append("<h2>Suspicious clusters</h2><p>none at or above the threshold</p>")
    for e in result.classes:
        parts.append(f"<h2>class {html.escape(e.name)} — {len(e.items)} items, {len(e.clusters)} clusters</h2>")
        parts.append(embedding_svg(e.embedding, e.labels))
        legend = " ".join(f'<span style="color:{PALETTE[c.id % len(PALETTE)]}">● {c.id}</span>' for c in
                          sorted(e.clusters, key=lambda c: c.id))
        parts.append(f"<p>{legend}</p><table><tr><th>rank</th><th>cluster</th><th>size</th><th>score</th>"
                     "<th>compact.</th><th>consist.</th><th>distinct.</th><th>mean heatmap</th><th>members</th></tr>")
        for rank, c in enumerate(e.clusters):
            inside = torch.as_tensor(e.labels == c.id)
            maps = e.maps[inside]
            magnitude = maps.abs()  # what the clusters compare (cluster.heatmap_features)
            mean_map = (magnitude / magnitude.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]).mean(0)
            mean_png = png_bytes(colorize(mean_map[None], "bwr", symmetric=True)[0])
            dist = (e.features[inside] - e.features[inside].mean(0)).norm(dim=1)
            shown = torch.argsort(dist)[:SHOWN]
            heats = colorize(maps[shown], "bwr", symmetric=True)
            members = "".join(
                _img(image_png_bytes((data.x[c.members[int(j)]] - low) / (high - low)), f"item {c.members[int(j)]}",
                     40) + _img(png_bytes(heats[n]), f"heatmap of item {c.members[int(j)]}", 40)
                for n, j in enumerate(shown))
            flag = ' style="background:#fde0dc"' if c.score.score >= THRESHOLD else ""
            parts.append(f"<tr{flag}><td>{rank + 1}</td><td>{c.id}</td><td>{c.size}</td>"
                         f"<td>{c.score.score:.3f}</td><td>{c.score.compactness:.2f}</td>"
                         f"<td>{c.score.consistency:.2f}</td><td>{c.score.distinctiveness:.2f}</td>"
                         f"<td>{_img(mean_png, 'mean heatmap', 72)}</td><td>{members}</td></tr>")
        parts.append("</table>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ddd;padding:4px;vertical-align:middle}img{image-rendering:pixelated;margin:1px}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
