"""`modelfix demo`: the README's main job on the embedded default (no download, no GPU) — a rich progress display
while `demo.run_demo` trains the shortcut and runs every repair, then one comparison table. The work lives in
demo.py; this module only shows it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from .base import app, err, handles_errors, out
from .options import JsonOpt, SeedOpt


def _table(results: dict) -> Table:
    table = Table(title=f"modelfix demo ({results['settings']['mode']}): {results['settings']['scenario']} on "
                        f"{results['settings']['arch']}, artifact {results['settings']['artifact']}")
    table.add_column("method", no_wrap=True)
    for name in ("family", "clean %", "poisoned %", "gap (pp)", "worst class clean %", "worst class poisoned %", "seconds"):
        table.add_column(name, justify="left" if name == "family" else "right")
    shortcut_gap = results["rows"][0]["gap"]
    for row in results["rows"]:
        gap = f"{100 * row['gap']:.1f}"
        if row is not results["rows"][0]:
            # green: at most a third of the shortcut's gap is left; yellow: at most two thirds; red: more
            share = row["gap"] / shortcut_gap if shortcut_gap > 0 else 0.0
            gap = Text(gap, style="green" if share <= 1 / 3 else "yellow" if share <= 2 / 3 else "red")
        table.add_row(row["name"], row["family"], f"{100 * row['clean']:.1f}", f"{100 * row['poisoned']:.1f}", gap,
                      f"{100 * row['worst_group_clean']:.1f}", f"{100 * row['worst_group_poisoned']:.1f}",
                      f"{row['seconds']:.1f}")
    return table


@app.command("demo", epilog="Example: modelfix demo --quick -o runs/demo")
@handles_errors
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="Smaller budget: under a minute on 2 CPU cores.")] = False,
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for report.html, report.md, results.json and the shortcut model (created, or replaced when it holds an earlier demo).")] = Path("modelfix-demo"),
    seed: SeedOpt = 0,
    json_output: JsonOpt = False,
) -> None:
    """The whole story on the embedded digits: train a model that takes a Clever Hans tag as a shortcut, show the
    shortcut, repair it with EGEM, PCA-EGEM, RGEM, Ridge, CRAYON-PRUNING, TAP, RRR and Cert-R4, compare them."""
    from ..demo import run_demo, stages

    from ..app.outputs import OutputPlan

    # before the minutes of work: a file, a folder of someone else's files, an unwritable place are refused
    OutputPlan(folder=output, folder_option="-o").check()
    names = stages()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=json_output, disable=json_output) as bar:
        task = bar.add_task("demo", total=len(names))

        def progress(stage: str, status: str) -> None:
            if status == "start":
                bar.update(task, description=f"{stage}…")
            else:
                bar.advance(task)
                bar.console.print(Text.assemble("  ", ("✓", "green"), f" {stage}"))

        results = run_demo(output, quick=quick, seed=seed, progress=progress)
    if json_output:
        from ..report import json_safe

        print(json.dumps(json_safe({k: v for k, v in results.items() if k != "heatmaps"})))
        return
    # piped or logged output (CI) gets rich's 80 columns, which cut the table's cells; give it the width it needs
    # (Console.print's own width cannot exceed the console's)
    width = out.width
    if not out.is_terminal:
        out.width = max(width, 120)
    try:
        out.print(_table(results))
    finally:
        out.width = width
    files = results["files"]
    out.print(f"gap = clean − poisoned accuracy (points). Report: {files['html']} (also {files['report']}, "
              f"{files['results']}); the shortcut model: {files['model']}")
