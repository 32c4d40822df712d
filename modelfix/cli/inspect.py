"""`inspect`, `archs`, `data list`, `data make`: what a model and the built-in data are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..app.outputs import OutputPlan
from ..app.resolve import load_checkpoint
from ..errors import ModelfixError
from .base import app, data_app, handles_errors, out
from .options import (DataRootOpt, JsonOpt, SeedOpt, checkpoint_options)


@app.command("inspect")
@handles_errors
@checkpoint_options
def inspect_cmd(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
) -> None:
    """Architecture, classes, input spec, layers with output shapes, repair history and patches."""
    from ..inspect_model import describe

    model, card = load_checkpoint(model_path, device="cpu", **checkpoint)
    info = describe(model, card)
    if json_output:
        print(json.dumps(info, default=str))
        return
    out.print(Text.assemble((str(model_path), "bold"), f": {card.arch}, {card.num_classes} classes {card.class_names}"))
    out.print(f"input: {card.input.channels}×{card.input.height}×{card.input.width}, mean {card.input.mean}, "
              f"std {card.input.std}, range {card.input.value_range}")
    if card.artifact:
        out.print(f"trained with artifact: {card.artifact}")
    table = Table(title="layers (dry run)")
    for col in ("name", "type", "output shape", "params", "calls"):
        table.add_column(col)
    for layer in info["layers"]:
        table.add_row(layer["name"], layer["type"], str(layer.get("output_shape")), str(layer.get("params", "")),
                      str(layer.get("calls", "")))
    out.print(table)
    for entry in card.history:
        out.print(f"history: {entry.get('command')} {entry.get('method', '')} ({entry.get('timestamp', '')})")
    for patch in card.patches:
        out.print(f"patch: {patch}")


@app.command()
@handles_errors
def archs(json_output: JsonOpt = False) -> None:
    """List the architectures modelfix can build."""
    from ..zoo import ARCHITECTURES

    rows = [{"name": name, "description": info.description, "source": info.source} for name, info in ARCHITECTURES.items()]
    if json_output:
        print(json.dumps(rows))
        return
    table = Table(title="architectures")
    for col in ("name", "description", "source"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["description"], row["source"])
    out.print(table)


@data_app.command("list")
@handles_errors
def data_list(json_output: JsonOpt = False) -> None:
    """List the built-in scenarios and their splits."""
    from ..data import SCENARIOS

    rows = [{"name": name, "description": s.description, "splits": list(s.splits), "artifact": s.artifact,
             "needs_mnist": s.needs_mnist} for name, s in SCENARIOS.items()]
    if json_output:
        print(json.dumps(rows))
        return
    table = Table(title="scenarios")
    for col in ("name", "splits", "artifact", "needs MNIST", "description"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], ", ".join(row["splits"]), str(row["artifact"]), "yes" if row["needs_mnist"] else "no",
                      row["description"])
    out.print(table)


@data_app.command("make")
@handles_errors
def data_make(
    scenario: Annotated[str, typer.Argument(help="A built-in scenario (see `modelfix data list`).")],
    output_dir: Annotated[Path, typer.Option("-o", "--output", help="Folder to create; one sub-folder per split.")],
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Only these splits (repeatable).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="png or npy.")] = "png",
    data_root: DataRootOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Export a scenario to the folder format (images/<class>/, masks/<class>/), so users see what to bring."""
    from ..data import SCENARIOS, load_scenario, save_folder
    from ..data.sources import staged_folder

    if scenario not in SCENARIOS:
        raise ModelfixError(f"unknown scenario '{scenario}' (scenarios: {', '.join(SCENARIOS)})")
    if fmt not in ("png", "npy"):
        raise ModelfixError(f"--format must be png or npy, not '{fmt}'")
    OutputPlan(folder=output_dir, inputs=[data_root], folder_option="-o").check()  # not inside --data-root
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ModelfixError(f"-o {output_dir} exists and is not empty", hint="choose a new folder")
    splits = split or list(SCENARIOS[scenario].splits)
    unknown = [s for s in splits if s not in SCENARIOS[scenario].splits]
    if unknown:
        raise ModelfixError(f"scenario {scenario} has no split '{unknown[0]}' (splits: {', '.join(SCENARIOS[scenario].splits)})")
    counts = {}
    with staged_folder(output_dir) as staging:  # an error leaves nothing behind
        for name in splits:
            dataset = load_scenario(scenario, name, data_root=data_root, seed=seed)
            save_folder(dataset, staging / name, fmt=fmt)
            counts[name] = len(dataset)
    for name, n in counts.items():
        out.print(f"{output_dir / name}: {n} images")


