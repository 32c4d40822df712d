"""The evidence a repair report shows: the model before and after the repair on the same test data — accuracy clean
and fully poisoned (`evaluate`), how much each looks at the artifact (`explain.reliance`) and the heatmaps of the same
samples (`explain.attribution`) — plus the selection trace as rows a chart can plot.

Every repair command calls `assess` when `--report DIR` is given; the keys it returns are the ones
`report_html.render_html` draws (`evaluation`, `reliance`, `heatmaps`). Heatmaps use the input gradient by default:
it works for every architecture, costs one backward pass, and is what the guided fine-tunes penalise.
"""

from __future__ import annotations

import base64

import torch
from torch import Tensor, nn

from .data import Dataset, ImageSource, parse_artifact, poison, take
from .evaluate import evaluate

HEATMAP_ITEMS = 6
RELIANCE_ITEMS = 128
EXPLAIN_METHOD = "gradient"


def balanced_indices(labels: Tensor, n: int) -> list[int]:
    """`n` item indices spread over the classes: the first item of each class in class order, then the second of
    each, and so on (classes that run out are skipped), so a report's heatmaps show every class before any twice.
    Returned in that round-robin order."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels.tolist()):
        by_class.setdefault(int(y), []).append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen, depth = [], 0
    while len(chosen) < n and any(depth < len(q) for q in queues):
        chosen += [q[depth] for q in queues if depth < len(q)][: n - len(chosen)]
        depth += 1
    return chosen


def _class_name(data: Dataset, y: int) -> str:
    return data.class_names[y] if data.class_names and 0 <= y < len(data.class_names) else str(y)


def heatmaps_of(models: dict[str, nn.Module], data: Dataset, method: str) -> dict:
    """The same items explained by every model (target: each item's label `data.y`), as base64 PNGs, each map
    scaled by its own largest |value| (the colours compare where a model looks, not how strongly; the scale goes
    into `scales`). Items with a mask have the artifact outlined on the input tile. Each item names the class
    explained (`explained`); `label` starts as the same name and callers that explain another class than the
    true one overwrite it with the true class."""
    from .explain.attribution import attribute, default_composite, relevance_maps
    from .explain.heatmap import colorize, image_png_bytes, png_bytes

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    items = []
    for i in range(len(data)):
        name = _class_name(data, int(data.y[i]))
        mask = data.mask[i] if bool(data.has_mask[i]) else None
        items.append({"index": int(i), "label": name, "explained": name, "scales": {},
                      "input": b64(image_png_bytes(data.x[i], mask=mask))})
    for name, model in models.items():
        composite = default_composite(model)
        maps = relevance_maps(attribute(model, data.x, data.y, method=method, composite=composite))
        scales = maps.detach().abs().flatten(1).amax(1).tolist()
        for item, rgb, scale in zip(items, colorize(maps), scales):
            item[name] = b64(png_bytes(rgb))
            item["scales"][name] = float(scale)
    return {"method": method, "target": "true label", "cmap": "bwr", "items": items}




def _heatmap_items(data: Dataset | ImageSource, artifact, labels: str, seed: int, n: int) -> tuple[Dataset, list[int], list[str]]:
    """Up to `n` class-balanced items (`balanced_indices`), each shown clean and, with an artifact, poisoned (the
    same image with the artifact pasted, `labels` mode), interleaved clean, poisoned, clean, …: `(items, their
    positions in data, "clean"/"poisoned" per item)`."""
    idx = balanced_indices(data.y, n)
    clean = take(data, torch.tensor(idx, dtype=torch.long))
    if artifact is None:
        return clean, idx, ["clean"] * len(idx)
    poisoned = poison(clean, artifact, 1.0, labels, seed=seed)
    twice = clean.subset(torch.arange(len(idx)).repeat_interleave(2))  # labels, groups, names of each item twice

    def interleave(a: Tensor, b: Tensor) -> Tensor:
        return torch.stack([a, b], dim=1).flatten(0, 1)

    both = twice.with_(x=interleave(clean.x, poisoned.x), mask=interleave(clean.mask, poisoned.mask),
                               has_mask=interleave(clean.has_mask, poisoned.has_mask))
    return both, [i for i in idx for _ in (0, 1)], ["clean", "poisoned"] * len(idx)


def assess(after: nn.Module, data: Dataset | ImageSource, artifact=None, before: nn.Module | None = None, labels: str = "random",
           seed: int = 0, method: str = EXPLAIN_METHOD, heatmap_items: int = HEATMAP_ITEMS,
           reliance_items: int = RELIANCE_ITEMS, batch_size: int = 512) -> dict:
    """Before/after evidence on `data` (module docstring). With an artifact: poison levels 0 and 1 (`labels` mode,
    `seed`) and heatmaps of `heatmap_items` class-balanced items, each clean and with the artifact pasted; without
    one: level 0 only and clean heatmaps.
    `before` None (a model trained from scratch) gives the `after` column alone. A lazy source is streamed by the
    evaluation; only the `reliance_items` and `heatmap_items` explained are decoded (`take`)."""
    from .explain.attribution import attribute, default_composite, relevance_maps
    from .explain.reliance import reliance_by_level

    artifact = parse_artifact(artifact) if artifact is not None else None
    models = {"before": before, "after": after} if before is not None else {"after": after}
    levels = (0.0, 1.0) if artifact is not None else (0.0,)
    result = {"evaluation": {"data": data.name, "n": len(data), "artifact": str(artifact) if artifact else None,
                             "labels": labels, "seed": seed}}
    for name, model in models.items():
        run = evaluate(model, data, artifact, levels=levels, labels=(labels,), seed=seed, batch_size=batch_size,
                       progress=False)
        result["evaluation"][name] = {"levels": run["levels"], "drops": run["drops"]}
    subset = take(data, range(min(reliance_items, len(data))))
    if artifact is not None or bool(subset.has_mask.any()):
        reliance = {"method": method, "items": len(subset), "target": "true label"}
        for name, model in models.items():
            composite = default_composite(model)

            def explainer(x, targets, model=model, composite=composite):
                return relevance_maps(attribute(model, x, targets, method=method, composite=composite))

            reliance[name] = reliance_by_level(model, subset, artifact, levels, (labels,), explainer, seed=seed)
        result["reliance"] = reliance
    shown, positions, copies = _heatmap_items(data, artifact, labels, seed, heatmap_items)
    heatmaps = heatmaps_of(models, shown, method)
    for item, position, copy in zip(heatmaps["items"], positions, copies):
        item["index"], item["copy"] = position, copy
    result["heatmaps"] = heatmaps
    return result


def selection_rows(values, scores, chosen, passed=None) -> list[dict]:
    """Selection-trace rows `{value, score, chosen, passed}` for the report's plot (None values are kept: the
    page leaves them off the plot but lists them)."""
    rows = []
    for i, (value, score) in enumerate(zip(values, scores)):
        row = {"value": value, "score": score, "chosen": i == chosen}
        if passed is not None:
            row["passed"] = bool(passed[i])
        rows.append(row)
    return rows


def accuracy_table(assessment: dict) -> list[str]:
    """Markdown lines: accuracy before/after at each poison level (the report.md twin of the HTML table)."""
    evaluation = assessment.get("evaluation") or {}
    phases = [p for p in ("before", "after") if p in evaluation]
    if not phases:
        return []
    first = evaluation[phases[0]]["levels"]
    lines = [f"## Before and after on `{evaluation.get('data')}` ({evaluation.get('n')} items, artifact "
             f"`{evaluation.get('artifact')}`, labels {evaluation.get('labels')})", "",
             "| poison | " + " | ".join(f"{p} accuracy % | {p} worst-group %" for p in phases) + " |",
             "|---:|" + "---:|---:|" * len(phases)]
    for i, row in enumerate(first):
        cells = []
        for p in phases:
            r = evaluation[p]["levels"][i]
            cells += [f"{100 * r['accuracy']:.2f}", f"{100 * r['worst_group_accuracy']:.2f}"]
        lines.append(f"| {row['level']:g} | " + " | ".join(cells) + " |")
    reliance = assessment.get("reliance")
    if reliance:
        lines += ["", f"Relevance mass in the artifact region ({reliance['method']}, first {reliance['items']} items, %): "
                  + "; ".join(f"{p}: " + ", ".join(f"poison {r['level']:g} {100 * r['relevance_mass']:.2f}"
                                                   for r in reliance[p]) for p in phases if p in reliance)]
    return lines + [""]
