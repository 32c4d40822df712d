"""`modelfix report DIR… -o OUT`: several run folders (their results.json) merged into one comparison table and
chart, written as OUT/comparison.json, OUT/report.md and OUT/report.html.

Each run is summarised by the metrics of the model it produced: `evaluation.after` for a repair (the repaired
model), `levels` for an evaluate run. Registered on the main Typer app when `modelfix.cli` imports this module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import ModelfixError
from .base import app, handles_errors, out
from .options import JsonOpt

SCHEMA = "modelfix.comparison/v1"

DEFINITIONS = {
    "clean_accuracy": "accuracy at poison level 0",
    "poisoned_accuracy": "accuracy at the highest poison level evaluated (its first label mode)",
    "gap": "clean_accuracy minus poisoned_accuracy (the shortcut's cost; shown in percentage points)",
    "worst_group_accuracy": "the lowest worst-group accuracy over all evaluated levels",
    "relevance_mass": "share of absolute relevance on the artifact at the highest poison level (where measured; "
                      "reliance.after for repairs)",
    "source": "evaluation.after for repairs (the repaired model), levels for evaluate runs",
}


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


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


def _rows(block) -> list[dict]:
    return [r for r in block if isinstance(r, dict)] if isinstance(block, list) else []


def _reliance_rows(reliance) -> list[dict]:
    """The reliance rows of the run's model: a list, evaluate's `{…, "levels": rows}`, or a repair's `after`."""
    if isinstance(reliance, dict):
        return _reliance_rows(reliance["levels"] if "levels" in reliance else reliance.get("after"))
    return _rows(reliance)


def _highest(rows: list[dict]) -> dict | None:
    """The first row at the highest poison level (level > 0), or None."""
    poisoned = [r for r in rows if (_number(r.get("level")) or 0.0) > 0]
    if not poisoned:
        return None
    top = max(_number(r.get("level")) for r in poisoned)
    return next(r for r in poisoned if _number(r.get("level")) == top)


def summarise(run: str, path: Path, results: dict) -> dict:
    """One comparison row: what ran, clean and poisoned accuracy, their gap, worst-group, relevance mass."""
    evaluation = results.get("evaluation")
    after = evaluation.get("after") if isinstance(evaluation, dict) else None
    if isinstance(after, dict) and isinstance(after.get("levels"), list):
        source, levels = "evaluation.after", _rows(after["levels"])
    elif isinstance(results.get("levels"), list):
        source, levels = "levels", _rows(results["levels"])
    else:
        source, levels = None, []
    clean = next((r for r in levels if _number(r.get("level")) == 0), None)
    poisoned = _highest(levels)
    clean_acc = _number((clean or {}).get("accuracy"))
    poisoned_acc = _number((poisoned or {}).get("accuracy"))
    worst = [w for w in (_number(r.get("worst_group_accuracy")) for r in levels) if w is not None]
    mass_row = _highest(_reliance_rows(results.get("reliance")))
    model = results.get("model")
    return {
        "run": run,
        "path": str(path),
        "command": results.get("command"),
        "method": results.get("method"),
        "model": model.get("path") if isinstance(model, dict) else model,
        "source": source,
        "clean_accuracy": clean_acc,
        "poisoned_level": None if poisoned is None else _number(poisoned.get("level")),
        "poisoned_labels": None if poisoned is None else poisoned.get("labels"),
        "poisoned_accuracy": poisoned_acc,
        "gap": None if clean_acc is None or poisoned_acc is None else clean_acc - poisoned_acc,
        "worst_group_accuracy": min(worst) if worst else None,
        "relevance_mass": None if mass_row is None else _number(mass_row.get("relevance_mass")),
    }


def run_names(paths: list[Path]) -> list[str]:
    """Each run's folder name; the path as given where two folders share a name."""
    names = [(p.parent if p.is_file() else p).resolve().name or str(p) for p in paths]
    return [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths)]


def comparison_document(paths: list[Path]) -> dict:
    """comparison.json: one summary row per run folder, in the order given."""
    runs = [summarise(name, path, read_results(path)) for name, path in zip(run_names(paths), paths)]
    return {"schema": SCHEMA, "command": "report", "runs": runs, "definitions": dict(DEFINITIONS)}


def _pct(value) -> str:
    value = _number(value)
    return "–" if value is None else f"{100 * value:.2f}"


def _cells(row: dict) -> list[str]:
    at = "–" if row["poisoned_level"] is None else f"{row['poisoned_level']:g}" + (
        f" {row['poisoned_labels']}" if row["poisoned_labels"] else "")
    gap = "–" if row["gap"] is None else f"{100 * row['gap']:+.2f}"
    return [row["run"], row["command"] or "–", row["method"] or "–", _pct(row["clean_accuracy"]), at,
            _pct(row["poisoned_accuracy"]), gap, _pct(row["worst_group_accuracy"]), _pct(row["relevance_mass"])]


HEADERS = ["run", "command", "method", "clean %", "poisoned at", "poisoned %", "gap (points)", "worst-group %",
           "relevance mass %"]


def render_comparison_markdown(doc: dict) -> str:
    """report.md of the merged report: the comparison table, where each run came from, and the definitions."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = [f"# modelfix report: {len(doc['runs'])} run(s) compared", "",
             "| " + " | ".join(HEADERS) + " |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(cell(c) for c in _cells(row)) + " |" for row in doc["runs"]]
    lines += [""] + [f"- {row['run']}: `{row['path']}`" + (f", model `{row['model']}`" if row["model"] else "")
                     for row in doc["runs"]]
    lines += ["", "Definitions: " + "; ".join(f"{k}: {v}" for k, v in doc["definitions"].items()) + ".", ""]
    return "\n".join(lines)


def _table(runs: list[dict]) -> Table:
    """The terminal table: report.md's numbers in fewer, narrower columns (command and method in one; the poisoned
    level in the header when every run shares it), so that a few runs fit 80 columns."""
    levels = {_cells(r)[4] for r in runs}
    shared = len(levels) == 1
    table = Table(title=f"{len(runs)} run(s) compared: accuracy %, gap in points")
    at = levels.pop() if shared else None
    headers = ["run", "command", "clean", "poisoned (at)" if not shared else "poisoned" if at == "–" else f"poison {at}", "gap",
               "worst group", "rel. mass"]
    rows = []
    for row in runs:
        cells = _cells(row)
        what = cells[1] + ("" if row["method"] is None else f": {cells[2]}")
        rows.append([cells[0], what, cells[3], cells[5] if shared else f"{cells[5]} ({cells[4]})", *cells[6:]])
    for j, header in enumerate(headers):
        # names are kept whole (up to 24 characters) and the headers wrap instead
        width = min(24, max(len(r[j]) for r in rows)) if j < 2 else None
        table.add_column(header, justify="left" if j < 2 else "right", min_width=width, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


@app.command("report", epilog="Example: modelfix report runs/shortcut runs/egem runs/rrr -o runs/comparison")
@handles_errors
def report(
    dirs: Annotated[list[Path], typer.Argument(metavar="DIR", help="Run folders holding a results.json (or the results.json files).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for comparison.json, report.md and report.html (not one of the inputs).")],
    json_output: JsonOpt = False,
) -> None:
    """Merge several runs (evaluate or repair folders) into one comparison table and chart."""
    from ..report import json_safe, write_text_atomic
    from ..report_html import render_comparison_html

    for path in dirs:
        folder = path.parent if path.is_file() else path
        if _same(folder, output):
            raise ModelfixError(f"-o {output}: is one of the input run folders; its report would be overwritten",
                                hint="choose a new folder, e.g. -o runs/comparison")
    if output.exists() and not output.is_dir():
        raise ModelfixError(f"-o {output}: exists and is not a folder")
    doc = json_safe(comparison_document(list(dirs)))
    markdown = render_comparison_markdown(doc)
    write_text_atomic(output / "comparison.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")
    write_text_atomic(output / "report.md", markdown)
    write_text_atomic(output / "report.html", render_comparison_html(doc, markdown))
    if json_output:
        print(json.dumps(doc))
        return
    out.print(_table(doc["runs"]))
    out.print(f"wrote {output / 'comparison.json'}, {output / 'report.md'} and {output / 'report.html'}")
