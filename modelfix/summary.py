"""The headline numbers of results documents: a run's verdict (before → after) and the comparison of several runs
(`modelfix report DIR… -o OUT`).

A results document describes a model by metric rows, one per poison level and label mode (`evaluation.after.levels`
for a repair — the repaired model — or `levels` for an evaluate run). The *headline condition* is the highest poison
level in the label mode that reveals a shortcut best: `random` (the artifact says a random class), then `none`, then
`correlated` (the artifact agrees with the label, so it helps a shortcut and the gap comes out negative). Every
condition is still kept and shown; the headline only picks what comes first.

Worst-group and worst-class accuracy are recomputed from each row's `per_group` / `per_class` numbers, so a run
that stored no `worst_group_accuracy` (or a stale one) is summarised from what it measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .errors import ModelfixError
from .markup import escape_md, md_code, number, pct

SCHEMA = "modelfix.comparison/v1"
LABEL_PREFERENCE = ("random", "none", "correlated")

DEFINITIONS = {
    "condition": "a poison level with its label mode; 'poisoned at 1 random' pastes the artifact on every item, "
                 "encoding a random class",
    "clean_accuracy": "accuracy at poison level 0",
    "poisoned_accuracy": "accuracy under the condition",
    "gap": "clean_accuracy minus poisoned_accuracy (the shortcut's cost, in percentage points; negative when the "
           "artifact helps, as with correlated labels)",
    "worst_group_accuracy": "the lowest per-group accuracy under the condition (from the run's per-group numbers)",
    "relevance_mass": "share of absolute relevance on the artifact under the condition (where measured; "
                      "reliance.after for repairs)",
    "model": "the model the numbers are of: the output file for a repair, the evaluated file otherwise",
}


# ---- rows of one document --------------------------------------------------------------------------------------


def _dict_rows(block) -> list[dict]:
    return [r for r in block if isinstance(r, dict)] if isinstance(block, list) else []


def metric_rows(doc: dict, phase: str = "after") -> tuple[str | None, list[dict]]:
    """`(source, rows)`: the metric rows of `phase` of a repair (`evaluation.<phase>.levels`), else an evaluate
    run's `levels` (for any phase but "before"); `(None, [])` when the document has neither."""
    evaluation = doc.get("evaluation")
    block = evaluation.get(phase) if isinstance(evaluation, dict) else None
    if isinstance(block, dict) and isinstance(block.get("levels"), list):
        return f"evaluation.{phase}", _dict_rows(block["levels"])
    if phase != "before" and isinstance(doc.get("levels"), list):
        return "levels", _dict_rows(doc["levels"])
    return None, []


def reliance_rows(doc: dict, phase: str = "after") -> list[dict]:
    """Reliance rows of `phase`: a list, evaluate's `{…, "levels": rows}`, or a repair's `{phase: rows}`."""
    block = doc.get("reliance")
    if isinstance(block, dict) and "levels" not in block:
        block = block.get(phase)
    if isinstance(block, dict):
        block = block.get("levels")
    return _dict_rows(block)


def condition(row: dict) -> tuple[float, str | None]:
    return number(row.get("level")) or 0.0, row.get("labels") or None


def _preference(cond: tuple[float, str | None]) -> tuple:
    """Sort key: preferred label modes first, then the highest level first."""
    level, labels = cond
    rank = LABEL_PREFERENCE.index(labels) if labels in LABEL_PREFERENCE else len(LABEL_PREFERENCE)
    return rank, str(labels), -level


def poisoned_conditions(rows: list[dict]) -> list[tuple[float, str | None]]:
    """The conditions with a poison level above 0, headline first (module docstring)."""
    return sorted({condition(r) for r in rows if condition(r)[0] > 0}, key=_preference)


def find_row(rows: list[dict], cond: tuple[float, str | None]) -> dict | None:
    level, labels = cond
    return next((r for r in rows if condition(r) == (level, labels) or (level == 0 and condition(r)[0] == 0)), None)


def lowest(values) -> tuple[float | None, str | None]:
    """`(accuracy, name)` of the lowest numeric entry of a `{name: accuracy}` dict; `(None, None)` if none."""
    known = [(v, str(k)) for k, v in (values or {}).items() if number(v) is not None] if isinstance(values, dict) else []
    if not known:
        return None, None
    value, name = min(known, key=lambda item: item[0])
    return float(value), name


def worst_group(row: dict | None) -> tuple[float | None, str | None]:
    """Worst-group accuracy and group of a row, from `per_group` (else its stored `worst_group_accuracy`)."""
    if row is None:
        return None, None
    value, name = lowest(row.get("per_group"))
    if value is None:
        value, name = number(row.get("worst_group_accuracy")), row.get("worst_group")
    return value, None if name is None else str(name)


def worst_class(row: dict | None) -> tuple[float | None, str | None]:
    """Worst-class accuracy and class of a row, from `per_class` (else the worst group: groups default to the
    label)."""
    value, name = lowest((row or {}).get("per_class"))
    return (value, name) if value is not None else worst_group(row)


# ---- the verdict of one run ------------------------------------------------------------------------------------


def verdict(doc: dict) -> dict | None:
    """The headline of a report, computed from its metric rows (None without any):

    `{"condition": {"level", "labels"}, "clean_accuracy": {phase: x}, "poisoned_accuracy": {phase: x},
    "gap": {phase: clean − poisoned}, "worst_class": {phase: {"name", "accuracy"}}, "phases": [...]}` with phases
    `before` and `after` for a repair, `after` alone for an evaluate run or a model trained from scratch. The
    worst class is taken under the poisoned condition (where a shortcut bites), at level 0 without one.
    """
    phases = {}
    for phase in ("before", "after"):
        _, rows = metric_rows(doc, phase)
        if rows:
            phases[phase] = rows
    if not phases:
        return None
    conds = poisoned_conditions(phases.get("after") or next(iter(phases.values())))
    cond = conds[0] if conds else None
    out = {"phases": list(phases), "condition": None if cond is None else {"level": cond[0], "labels": cond[1]},
           "clean_accuracy": {}, "poisoned_accuracy": {}, "gap": {}, "worst_class": {}}
    for phase, rows in phases.items():
        clean = find_row(rows, (0.0, None))
        poisoned = find_row(rows, cond) if cond else None
        c = number((clean or {}).get("accuracy"))
        p = number((poisoned or {}).get("accuracy"))
        out["clean_accuracy"][phase] = c
        out["poisoned_accuracy"][phase] = p
        out["gap"][phase] = None if c is None or p is None else c - p
        accuracy, name = worst_class(poisoned or clean)
        out["worst_class"][phase] = {"name": name, "accuracy": accuracy}
    return out


# ---- comparing runs --------------------------------------------------------------------------------------------


def read_results(path: Path) -> dict:
    """`path` (a run folder, or its results.json) → the parsed results, or a one-line error naming the file."""
    path = Path(path)
    file = path if path.is_file() else path / "results.json"
    if not file.is_file():
        raise ModelfixError(f"{path}: no such folder" if not path.exists() else f"{file}: no such file",
                            hint="pass run folders written by `modelfix evaluate -o DIR` or a repair command")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelfixError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ModelfixError(f"{file}: not a UTF-8 text file, so not a modelfix results.json") from None
    except json.JSONDecodeError as exc:
        raise ModelfixError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(results, dict) or not isinstance(results.get("command"), str):
        raise ModelfixError(f"{file}: not a modelfix results.json (no \"command\" key)")
    return results


def run_names(paths: list[Path]) -> list[str]:
    """Each run's folder name; the path as given where two folders share a name."""
    names = [(p.parent if p.is_file() else p).resolve().name or str(p) for p in paths]
    return [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths)]


def load_runs(paths: list[Path]) -> dict[str, dict]:
    """`{run name: results document}` for run folders (or results.json files), in the order given."""
    paths = [Path(p) for p in paths]
    return {name: read_results(path) for name, path in zip(run_names(paths), paths)}


def _model_path(doc: dict) -> str | None:
    """The file the run's numbers are of: a repair's output, else the evaluated model."""
    if doc.get("output") is not None:
        return str(doc["output"])
    model = doc.get("model")
    path = model.get("path") if isinstance(model, dict) else model
    return None if path is None else str(path)


def _measures(rows: list[dict], masses: list[dict], cond: tuple[float, str | None]) -> dict | None:
    clean, poisoned = find_row(rows, (0.0, None)), find_row(rows, cond)
    if poisoned is None:
        return None
    c, p = number((clean or {}).get("accuracy")), number(poisoned.get("accuracy"))
    wg, group = worst_group(poisoned)
    mass = find_row(masses, cond)
    return {"level": cond[0], "labels": cond[1], "accuracy": p, "gap": None if c is None or p is None else c - p,
            "worst_group_accuracy": wg, "worst_group": group,
            "relevance_mass": None if mass is None else number(mass.get("relevance_mass")),
            "chance": None if mass is None else number(mass.get("mask_share"))}


def compare_runs(documents: Mapping[str, dict], paths: Mapping[str, str] | None = None) -> dict:
    """comparison.json for `{run name: results document}` (e.g. `load_runs(paths)`), in the order given.

    Every run is measured under every condition (poison level × label mode) any run was evaluated at;
    `conditions` lists them headline first. Each run row carries its clean accuracy and worst group, `by_condition`
    (accuracy, gap, worst group, relevance mass per condition; null where the run lacks it) and, for a short
    table, the headline fields `poisoned_level`, `poisoned_labels`, `poisoned_accuracy`, `gap`,
    `worst_group_accuracy`, `worst_group`, `relevance_mass` (the first condition the run has).
    """
    paths = paths or {}
    all_rows = {name: metric_rows(doc) for name, doc in documents.items()}
    conds = poisoned_conditions([r for _, rows in all_rows.values() for r in rows])
    runs = []
    for name, doc in documents.items():
        source, rows = all_rows[name]
        masses = reliance_rows(doc)
        clean = find_row(rows, (0.0, None))
        clean_wg, clean_group = worst_group(clean)
        by_condition = [_measures(rows, masses, cond) for cond in conds]
        head = next((m for m in by_condition if m is not None), None) or {}
        runs.append({
            "run": name, "path": paths.get(name), "command": doc.get("command"), "method": doc.get("method"),
            "model": _model_path(doc), "source": source,
            "clean_accuracy": number((clean or {}).get("accuracy")),
            "clean_worst_group_accuracy": clean_wg, "clean_worst_group": clean_group,
            "poisoned_level": head.get("level"), "poisoned_labels": head.get("labels"),
            "poisoned_accuracy": head.get("accuracy"), "gap": head.get("gap"),
            "worst_group_accuracy": head.get("worst_group_accuracy"), "worst_group": head.get("worst_group"),
            "relevance_mass": head.get("relevance_mass"),
            "by_condition": by_condition,
        })
    return {"schema": SCHEMA, "command": "report",
            "conditions": [{"level": level, "labels": labels} for level, labels in conds],
            "runs": runs, "definitions": dict(DEFINITIONS)}


def condition_text(level, labels) -> str:
    return f"poison {number(level) or 0:g}" + (f" {labels}" if labels else "")


def render_comparison_markdown(doc: dict) -> str:
    """report.md of the merged report: clean accuracy per run, then one table per condition (headline first),
    where each model came from, and the definitions. Every name and path is escaped."""
    runs, conds = doc["runs"], doc.get("conditions") or []
    lines = [f"# modelfix report: {len(runs)} run(s) compared", "",
             "| run | command | method | clean % | worst-group clean % (group) |", "|---|---|---|---:|---:|"]
    for row in runs:
        group = f" ({escape_md(row['clean_worst_group'])})" if row.get("clean_worst_group") is not None else ""
        lines.append(f"| {escape_md(row['run'])} | {escape_md(row['command'] or '–')} | "
                     f"{escape_md(row['method'] or '–')} | {pct(row['clean_accuracy'])} | "
                     f"{pct(row.get('clean_worst_group_accuracy'))}{group} |")
    for j, cond in enumerate(conds):
        title = escape_md(condition_text(cond["level"], cond["labels"])) + (" (headline)" if j == 0 else "")
        lines += ["", f"## {title}", "",
                  "| run | poisoned % | gap (points) | worst-group % (group) | relevance mass % |",
                  "|---|---:|---:|---:|---:|"]
        for row in runs:
            m = (row.get("by_condition") or [None] * len(conds))[j] or {}
            gap = number(m.get("gap"))
            group = f" ({escape_md(m['worst_group'])})" if m.get("worst_group") is not None else ""
            lines.append(f"| {escape_md(row['run'])} | {pct(m.get('accuracy'))} | "
                         f"{'–' if gap is None else f'{100 * gap:+.2f}'} | {pct(m.get('worst_group_accuracy'))}{group} | "
                         f"{pct(m.get('relevance_mass'))} |")
    lines += [""] + [f"- {escape_md(row['run'])}: " + (md_code(row["path"]) if row.get("path") else "–")
                     + (f", model {md_code(row['model'])}" if row.get("model") else "") for row in runs]
    lines += ["", "Definitions: " + "; ".join(f"{escape_md(k)}: {escape_md(v)}"
                                              for k, v in doc["definitions"].items()) + ".", ""]
    return "\n".join(lines)
