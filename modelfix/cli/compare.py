"""`modelfix compare`: the demo's story on the user's own model and data — every chosen method on the same inputs,
one table, one HTML report, each repaired checkpoint kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import ModelfixError
from .base import app, handles_errors, out, say, warn
from .options import (data_options, ArtifactOpt, DataRootOpt, DeviceOpt, JsonOpt, MasksOpt, OverwriteOpt, SeedOpt,
                     checkpoint_options)

DEFAULT_METHODS = "egem,pca-egem,rgem,ridge,crayon-pruning,tap,rrr,r4-cert"


@app.command(epilog="Example: modelfix compare model.pt --arch resnet18 --data train/ --masks masks/ --clean-dir clean/ --eval-data test/ --artifact image:tag.png@0,0 -o compare/")
@handles_errors
@checkpoint_options
@data_options
def compare(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="A new folder: one checkpoint per method, results.json, report.md, report.html.")],
    data: Annotated[Optional[str], typer.Option("--data", help="Training data for the fine-tunes and CRAYON (a folder, bundle or SCENARIO[:SPLIT]).")] = None,
    masks: MasksOpt = None,
    clean_dir: Annotated[Optional[str], typer.Option("--clean-dir", help="Approved clean samples for the post-hoc methods (default: --data).")] = None,
    val: Annotated[Optional[str], typer.Option("--val", help="Validation data for the fine-tunes' λ choice.")] = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Test data for the table (default: the card's scenario test split).")] = None,
    feedback: Annotated[Optional[Path], typer.Option("--feedback", help="Neuron verdicts for crayon-pruning.")] = None,
    artifact: ArtifactOpt = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods (see `modelfix methods`).")] = DEFAULT_METHODS,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs of each fine-tune.")] = 3,
    overwrite: OverwriteOpt = False,
    data_root: DataRootOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """Every chosen method on the same model and inputs: one table (clean, poisoned, gap, worst class, seconds)."""
    from ..app import outputs, resolve
    from ..app.compare import compare as run_compare
    from ..data import parse_artifact
    from ..report import json_safe, write_text_atomic
    from ..repair.registry import get_method

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    for name in chosen:
        get_method(name)  # an unknown name fails before any work
    if epochs < 1:
        raise ModelfixError(f"--epochs must be at least 1, not {epochs}")
    plan = outputs.OutputPlan(folder=output, inputs=[model_path, data, masks, clean_dir, val, eval_data, feedback],
                              overwrite=overwrite, folder_option="-o").check()
    model, card = resolve.load_checkpoint(model_path, device=resolve.device_name(device), **checkpoint)
    art = parse_artifact(artifact) if artifact else (parse_artifact(card.artifact) if card.artifact else None)
    train = resolve.load_dataset(data, data_root, seed, masks, card, reading=reading) if data else None
    clean = resolve.load_dataset(clean_dir, data_root, seed, card=card, reading=reading) if clean_dir else train
    val_data = resolve.load_dataset(val, data_root, seed, card=card, reading=reading) if val else None
    test_spec = eval_data or resolve.default_test_split(card)
    test = resolve.load_dataset(test_spec, data_root, seed, card=card, reading=reading)
    options = {name: {"epochs": epochs} for name in chosen if get_method(name).kind == "finetune"}
    with outputs.staged_folder(plan.folder) as staging:
        rows = run_compare(model, chosen, data=train, clean=clean, val=val_data, feedback=feedback, test=test,
                           artifact=art, out_dir=staging, card=card, seed=seed, options=options)
        for row in rows:
            if row.checkpoint:
                row.checkpoint = str(Path(output) / Path(row.checkpoint).name)
        document = json_safe({"schema": "modelfix.compare/v1", "model": str(model_path), "eval_data": test_spec,
                              "artifact": str(art) if art else None,
                              "rows": [{**row.__dict__, "gap": row.gap} for row in rows]})
        write_text_atomic(staging / "results.json", json.dumps(document, indent=2) + "\n")
        markdown = _markdown(document)
        write_text_atomic(staging / "report.md", markdown)
        write_text_atomic(staging / "report.html", _html(document, markdown))
    if json_output:
        print(json.dumps(document))
        return
    _print(document)
    say(f"wrote {output}/report.html and {sum(1 for r in rows if r.checkpoint)} checkpoints")
    for row in rows:
        for warning in row.warnings:
            warn(f"{row.method}: {warning}")


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


COLUMNS = ("method", "status", "clean %", "poisoned %", "gap", "worst class clean %", "worst class poisoned %", "s",
           "note")


def _cells(row: dict) -> list[str]:
    return [row["method"], row["status"], _pct(row["clean"]), _pct(row["poisoned"]), _pct(row["gap"]),
            _pct(row["worst_clean"]), _pct(row["worst_poisoned"]),
            "–" if row["seconds"] is None else f"{row['seconds']:.1f}", row["reason"]]


def _print(document: dict) -> None:
    table = Table(title=f"{document['model']} on {document['eval_data']} (artifact {document['artifact']})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("method", "status", "note") else "right")
    for row in document["rows"]:
        table.add_row(*_cells(row))
    out.print(table)


def _markdown(document: dict) -> str:
    from ..markup import escape_md, md_code

    aligns = "|" + "".join("---|" if col in ("method", "status", "note") else "---:|" for col in COLUMNS)
    lines = [f"# Comparison of repairs of {md_code(document['model'])}", "",
             f"Evaluated on {md_code(document['eval_data'])}, artifact {md_code(document['artifact'])}. The gap is "
             "clean minus poisoned accuracy: a repair that removed the shortcut closes it.", "",
             "| " + " | ".join(COLUMNS) + " |", aligns]
    lines += ["| " + " | ".join(escape_md(cell) for cell in _cells(row)) + " |" for row in document["rows"]]
    return "\n".join(lines) + "\n"


def _html(document: dict, markdown: str) -> str:
    from ..report_html import render_html

    return render_html(document, markdown)  # the same templated, escaped page as every other report
