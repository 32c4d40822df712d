"""`modelfix report DIR… -o OUT`: several run folders (their results.json) merged into one comparison table and
chart, written as OUT/comparison.json, OUT/report.md and OUT/report.html.

Each run is summarised by the metrics of the model it produced: `evaluation.after` for a repair (the repaired
model), `levels` for an evaluate run. Registered on the main Typer app when `modelfix.cli` imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..app.outputs import OutputPlan
from ..errors import ModelfixError
from .base import app, handles_errors, out
from .options import JsonOpt

def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _cells(row: dict) -> list[str]:
    at = "–" if row.get("poisoned_level") is None else f"{row['poisoned_level']:g}" + (
        f" {row['poisoned_labels']}" if row.get("poisoned_labels") else "")
    gap = "–" if row.get("gap") is None else f"{100 * row['gap']:+.2f}"
    return [row["run"], row.get("command") or "–", row.get("method") or "–", _pct(row.get("clean_accuracy")), at,
            _pct(row.get("poisoned_accuracy")), gap, _pct(row.get("worst_group_accuracy")),
            _pct(row.get("relevance_mass"))]


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
    from ..summary import compare_runs, load_runs, render_comparison_markdown

    for path in dirs:
        folder = path.parent if path.is_file() else path
        if _same(folder, output):
            raise ModelfixError(f"-o {output}: is one of the input run folders; its report would be overwritten",
                                hint="choose a new folder, e.g. -o runs/comparison")
    if output.exists() and not output.is_dir():
        raise ModelfixError(f"-o {output}: exists and is not a folder")
    # not inside a run folder either (nor too long a name, nor unwritable); overwrite: a rerun updates its own files
    OutputPlan(folder=output, inputs=[p.parent if p.is_file() else p for p in dirs], overwrite=True,
               folder_option="-o").check()
    doc = json_safe(compare_runs(load_runs(list(dirs))))
    markdown = render_comparison_markdown(doc)
    write_text_atomic(output / "comparison.json", json.dumps(doc, indent=2, allow_nan=False) + "\n")
    write_text_atomic(output / "report.md", markdown)
    write_text_atomic(output / "report.html", render_comparison_html(doc, markdown))
    if json_output:
        print(json.dumps(doc))
        return
    out.print(_table(doc["runs"]))
    out.print(f"wrote {output / 'comparison.json'}, {output / 'report.md'} and {output / 'report.html'}")
