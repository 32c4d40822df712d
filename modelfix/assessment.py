"""The evidence a repair report shows: the model before and after the repair on the same test data — accuracy clean
and fully poisoned (`evaluate`), how much each looks at the artifact (`explain.reliance`) and the heatmaps of the same
samples (`explain.attribution`) — plus the selection trace as rows a chart can plot.

Every repair command calls `assess` when `--report DIR` is given; the keys it returns are the ones
`report_html.render_html` draws (`evaluation`, `reliance`, `heatmaps`). Heatmaps use the input gradient by default:
it works for every architecture, costs one backward pass, and is what the guided fine-tunes penalise.
"""

from __future__ import annotations

import base64

from torch import nn

from .data import Dataset, parse_artifact, poison
from .evaluate import evaluate

HEATMAP_ITEMS = 6
RELIANCE_ITEMS = 128
EXPLAIN_METHOD = "gradient"


def _heatmaps(models: dict[str, nn.Module], data: Dataset, method: str) -> dict:
    """The same items explained by every model (target: the true label), as base64 PNGs, each map scaled by its own
    largest |value| (the colours compare where a model looks, not how strongly)."""
    from .explain.attribution import attribute, default_composite, relevance_maps
    from .explain.heatmap import colorize, image_png_bytes, png_bytes

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    items = [{"index": int(i), "label": data.class_names[int(data.y[i])] if data.class_names else str(int(data.y[i])),
              "input": b64(image_png_bytes(data.x[i]))} for i in range(len(data))]
    for name, model in models.items():
        composite = default_composite(model)
        maps = relevance_maps(attribute(model, data.x, data.y, method=method, composite=composite))
        for item, rgb in zip(items, colorize(maps)):
            item[name] = b64(png_bytes(rgb))
    return {"method": method, "target": "true label", "items": items}


def assess(after: nn.Module, data: Dataset, artifact=None, before: nn.Module | None = None, labels: str = "random",
           seed: int = 0, method: str = EXPLAIN_METHOD, heatmap_items: int = HEATMAP_ITEMS,
           reliance_items: int = RELIANCE_ITEMS, batch_size: int = 512) -> dict:
    """Before/after evidence on `data` (module docstring). With an artifact: poison levels 0 and 1 (`labels` mode,
    `seed`) and heatmaps of items with the artifact pasted; without one: level 0 only and clean heatmaps.
    `before` None (a model trained from scratch) gives the `after` column alone."""
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
    subset = data.subset(slice(0, min(reliance_items, len(data))))
    if artifact is not None or bool(subset.has_mask.any()):
        reliance = {"method": method, "items": len(subset), "target": "true label"}
        for name, model in models.items():
            composite = default_composite(model)

            def explainer(x, targets, model=model, composite=composite):
                return relevance_maps(attribute(model, x, targets, method=method, composite=composite))

            reliance[name] = reliance_by_level(model, subset, artifact, levels, (labels,), explainer, seed=seed)
        result["reliance"] = reliance
    shown = data.subset(slice(0, min(heatmap_items, len(data))))
    if artifact is not None:
        shown = poison(shown, artifact, 1.0, labels, seed=seed)
    result["heatmaps"] = _heatmaps(models, shown, method)
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
