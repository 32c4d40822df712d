"""Report charts as PNG bytes, drawn with matplotlib when it is installed (the optional `[report]` extra).

Every chart function returns `None` without matplotlib, and the HTML report then shows its tables only. The
figures are built with the object-oriented API (`Figure` + the Agg canvas), never through `pyplot`: nothing
touches the user's backend choice or pyplot's global figure list, and no figure outlives its call.
Accuracies and other shares come in as fractions in [0, 1] and are drawn in percent.
"""

from __future__ import annotations

import io
import math


def has_matplotlib() -> bool:
    """Whether matplotlib can be imported (the charts are drawn) or not (the reports show tables only)."""
    return _matplotlib() is not None


def _matplotlib():
    """`(Figure, FigureCanvasAgg)`, or None when matplotlib is missing or broken."""
    try:
        import matplotlib  # noqa: F401  (first, so that a missing package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _png(fig, canvas_cls) -> bytes:
    canvas_cls(fig)
    buffer = io.BytesIO()
    # No "Software" text chunk: the bytes depend on the figure only (and the page names no outside address).
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _number(value) -> float | None:
    """A finite float, or None for missing, NaN, infinite and non-numeric values (they are drawn as gaps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _grouped_bars(series: dict[str, dict[str, float]], title: str, ylabel: str) -> bytes | None:
    """One group of bars per category (the inner keys, in order of first appearance), one bar per series."""
    mpl = _matplotlib()
    if mpl is None:
        return None
    figure_cls, canvas_cls = mpl
    categories = list(dict.fromkeys(c for values in series.values() for c in values))
    n_series = max(len(series), 1)
    width = 0.8 / n_series
    fig = figure_cls(figsize=(max(4.0, 1.5 + 0.9 * len(categories) * max(1, n_series / 2)), 3.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n_series - 1) / 2) * width for j in range(len(categories))]
        heights = [_number(values.get(c)) for c in categories]
        bars = ax.bar(xs, [0.0 if h is None else 100 * h for h in heights], width, label=str(name))
        ax.bar_label(bars, labels=["–" if h is None else f"{100 * h:.1f}" for h in heights], fontsize=7, padding=1)
    ax.set_xticks(range(len(categories)))
    long_names = any(len(str(c)) > 12 for c in categories)
    ax.set_xticklabels([str(c) for c in categories], rotation=20 if long_names else 0,
                       ha="right" if long_names else "center", fontsize=8)
    ax.set_ylim(0, 112)  # room for the value labels above a 100 % bar
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _png(fig, canvas_cls)


def accuracy_bars(groups: dict[str, dict[str, float]], title: str) -> bytes | None:
    """Grouped bars in percent: `groups` maps a series to {category: fraction}, e.g.
    `{"before": {"clean": 0.98, "poison 1 random": 0.41}, "after": {...}}`, or one series for an evaluate run.
    Missing or NaN values are drawn as empty bars labelled "–"."""
    return _grouped_bars(groups, title, "accuracy %")


def comparison_bars(runs: dict[str, dict[str, float]], title: str | None = None) -> bytes | None:
    """The merged report's chart: one group of bars per run, one bar per metric (fractions, drawn in percent),
    e.g. `{"shortcut": {"clean": 0.98, "poisoned": 0.12}, "egem": {...}}`."""
    metrics = list(dict.fromkeys(m for values in runs.values() for m in values))
    by_metric = {m: {run: values.get(m) for run, values in runs.items()} for m in metrics}
    return _grouped_bars(by_metric, title or "per run", "%")


def log_scale(values: list[float]) -> bool:
    """A log axis for values that are all positive and span more than a factor 10."""
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


def selection_plot(rows: list[dict], parameter: str, score_name: str, percent: bool = False) -> bytes | None:
    """The selection trace: `score` against `value` for each row, the chosen row marked with a star.

    Rows with `"passed": false` (outside the slack) are drawn hollow. The x axis is logarithmic when every value
    is positive and they span more than a factor 10 (λ and α searches double or bisect on a log scale). Rows
    without a numeric value or score (e.g. a fine-tune's λ-free run) are left out. `percent` draws scores × 100.
    """
    mpl = _matplotlib()
    if mpl is None:
        return None
    figure_cls, canvas_cls = mpl
    scale = 100.0 if percent else 1.0
    points = sorted((_number(r.get("value")), _number(r.get("score")) * scale, bool(r.get("chosen")),
                     r.get("passed", True) is not False)
                    for r in rows if _number(r.get("value")) is not None and _number(r.get("score")) is not None)
    fig = figure_cls(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.add_subplot()
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, color="0.6", linewidth=1, zorder=1)
        for filled in (True, False):
            chosen = [(x, y) for x, y, _, passed in points if passed == filled]
            if chosen:
                ax.scatter(*zip(*chosen), s=22, zorder=2, color="tab:blue" if filled else "white",
                           edgecolors="tab:blue", label="within slack" if filled else "outside slack")
        best = [(x, y) for x, y, is_chosen, _ in points if is_chosen]
        if best:
            ax.scatter(*zip(*best), s=140, marker="*", color="tab:red", zorder=3, label="chosen")
        if log_scale(xs):
            ax.set_xscale("log")
        if any(not p[3] for p in points) or best:
            ax.legend(fontsize=8, frameon=False)
    ax.set_xlabel(parameter)
    ax.set_ylabel(f"{score_name} %" if percent else score_name)
    ax.set_title(f"selection of {parameter}", fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig, canvas_cls)
