"""`modelfix evaluate`: accuracy on clean and poisoned data, reliance, fragility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..app.resolve import (check_fits, data_info, default_test_split, device_name, load_checkpoint, load_dataset,
                           parse_floats)
from ..errors import ModelfixError
from .base import app, err, handles_errors, out
from .options import (data_options, DataRootOpt, DeviceOpt, JsonOpt, MasksOpt, OverwriteOpt, PrecisionOpt, SeedOpt, checkpoint_options)


@app.command(epilog="Example: modelfix evaluate runs/shortcut.safetensors --poison 0,1 --labels correlated,random")
@handles_errors
@checkpoint_options
@data_options
def evaluate(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    data: Annotated[Optional[str], typer.Option("--data", help="A folder, a bundle or SCENARIO[:SPLIT] (default: the test split of the scenario the model was trained on).", rich_help_panel="Data")] = None,
    masks: MasksOpt = None,
    artifact: Annotated[Optional[str], typer.Option("--artifact", help="Artifact spec or YAML file (default: the one on the model card).", rich_help_panel="Poisoning")] = None,
    poison: Annotated[str, typer.Option("--poison", help="Comma-separated poison levels in [0, 1].", rich_help_panel="Poisoning")] = "0,1",
    labels: Annotated[str, typer.Option("--labels", help="Comma-separated: random (the artifact encodes a random label), correlated (the true label), none (no label).", rich_help_panel="Poisoning")] = "random",
    data_root: DataRootOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", rich_help_panel="Runtime")] = 512,
    explain: Annotated[Optional[str], typer.Option("--explain", metavar="METHOD", help="Also measure how much the model looks at the artifact, per poison level: relevance mass in the artifact mask, top-quartile overlap and pointing game, with this attribution method (gradient, gradxinput, integrated-gradients, smoothgrad, lrp, gradcam).", rich_help_panel="Explanations")] = None,
    explain_items: Annotated[int, typer.Option("--explain-items", help="--explain: explain the first N items of the data at each level (0: all).", rich_help_panel="Explanations")] = 256,
    fragility: Annotated[Optional[float], typer.Option("--fragility", metavar="EPS", help="Also report R4's explanation fragility δ at this ε on the artifact mask, on the core and their ratio (interval bounds; Linear/Conv/ReLU/pool/BN networks).", rich_help_panel="Explanations")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write results.json, report.md and report.html into this folder.", rich_help_panel="Output")] = None,
    overwrite: OverwriteOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """Accuracy on clean and poisoned data: per class, per group, macro- and worst-group, and the drops."""
    from ..checkpoint import sha256_file
    from ..data import parse_artifact
    from ..distributed import describe as describe_world
    from ..evaluate import evaluate as run_evaluation
    from ..precision import autocast
    from ..report import results_document, write_run

    levels = parse_floats(poison, "--poison")
    if not levels:
        raise ModelfixError("--poison needs at least one level, e.g. 0,1")
    bad = [level for level in levels if not 0.0 <= level <= 1.0]
    if bad:
        raise ModelfixError(f"--poison levels must lie in [0, 1], got {bad[0]:g}")
    if batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, not {batch_size}")
    if fragility is not None:
        from ..repair.guidance.pgd_ex import check_eps

        check_eps(fragility, "--fragility")
    if explain is not None:
        from ..explain.attribution import check_method

        check_method(explain)
        if explain_items < 0:
            raise ModelfixError(f"--explain-items must be >= 0 (0 = all items), not {explain_items}")
    amp = autocast(precision, device_name(device))  # fp16 off CUDA: refused before anything is read or written
    plan = None
    if output_dir is not None:
        from ..app.outputs import OutputPlan

        plan = OutputPlan(folder=output_dir, inputs=[model_path, data, masks, artifact], overwrite=overwrite,
                          folder_option="-o").check()
    model, card = load_checkpoint(model_path, device=device_name(device), **checkpoint)
    spec = data or default_test_split(card)
    dataset = load_dataset(spec, data_root, seed, masks, card=card, reading=reading, stream=True)
    check_fits(dataset, card, spec)
    artifact_spec = artifact or card.artifact
    art = parse_artifact(artifact_spec) if artifact_spec else None
    modes = tuple(part.strip() for part in labels.split(",") if part.strip())
    with amp:  # the predictions and --explain's attributions under autocast; --fragility's bounds stay float32
        evaluation = run_evaluation(model, dataset, art, levels=levels, labels=modes, seed=seed, batch_size=batch_size)
        results = results_document(
            "evaluate",
            {"path": str(model_path), "sha256": sha256_file(model_path), "arch": card.arch, "num_classes": card.num_classes},
            data_info(spec, dataset),
            evaluation,
        )
        results["distributed"], results["precision"] = describe_world(), precision
        if explain is not None:
            results["reliance"] = _reliance(model, dataset, art, levels, modes, explain, explain_items, seed)
    if fragility is not None:
        from ..fragility import fragility_of_test

        from ..data import to_dataset  # δ's interval bounds take whole tensors

        results["fragility"] = fragility_of_test(model, to_dataset(dataset), art, fragility, modes[0] if modes else "random", seed)
    if output_dir is not None:
        from ..app.outputs import commit

        commit(plan, write_folder=lambda staging: write_run(staging, results))
    if json_output:
        from ..report import json_safe

        print(json.dumps(json_safe(results)))
    else:
        _print_levels(results)
        if output_dir is not None:
            err.print(f"wrote {output_dir / 'results.json'}, {output_dir / 'report.md'} and {output_dir / 'report.html'}")


def _reliance(model, dataset, artifact, levels, modes, method: str, items: int, seed: int) -> dict:
    """`evaluate --explain`: the artifact-reliance metrics per poison level on the first `items` items."""
    from ..explain.attribution import attribute, default_composite, relevance_maps
    from ..explain.reliance import reliance_by_level

    from ..data import take  # only the items explained are decoded

    subset = take(dataset, range(len(dataset) if items == 0 else min(items, len(dataset))))
    composite = default_composite(model)

    def explainer(x, targets):
        return relevance_maps(attribute(model, x, targets, method=method, composite=composite))

    rows = reliance_by_level(model, subset, artifact, levels, modes, explainer, seed=seed, progress=True)
    return {"method": method, "composite": composite if method == "lrp" else None, "items": len(subset),
            "target": "true label", "levels": rows}


def _print_levels(results: dict) -> None:
    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}"

    table = Table(title=f"{results['model']['path']} on {results['data']['spec']} "
                        f"(artifact {results['settings']['artifact']})")
    for col in ("poison", "labels", "accuracy %", "macro-group %", "worst-group %", "worst group"):
        table.add_column(col, justify="right")
    has_f1 = "f1" in results["levels"][0]
    if has_f1:
        table.add_column("F1 %", justify="right")
    for row in results["levels"]:
        cells = [f"{row['level']:g}", row["labels"] or "–", pct(row["accuracy"]), pct(row["macro_group_accuracy"]),
                 pct(row["worst_group_accuracy"]), str(row["worst_group"])]
        table.add_row(*cells + ([pct(row["f1"])] if has_f1 else []))
    out.print(table)
    for drop in results["drops"]:
        out.print(f"drop {drop['from']:g} → {drop['to']:g} ({drop['labels']}): accuracy {pct(drop['accuracy'])} points, "
                  f"worst-group {pct(drop['worst_group_accuracy'])} points")
    reliance = results.get("reliance")
    if reliance:
        table = Table(title=f"artifact reliance ({reliance['method']}, first {reliance['items']} items)")
        for col in ("poison", "labels", "region", "items", "relevance mass %", "top-quartile recall %",
                    "top-quartile precision %", "pointing game %"):
            table.add_column(col, justify="right")
        for row in reliance["levels"]:
            table.add_row(f"{row['level']:g}", row["labels"] or "–", row.get("region", ""), str(row["n"]),
                          pct(row["relevance_mass"]), pct(row["top_quartile_recall"]),
                          pct(row["top_quartile_precision"]), pct(row["pointing_game"]))
        out.print(table)
    frag = results.get("fragility")
    if frag:
        out.print(f"fragility δ at ε {frag['eps']:g} ({frag['n']} items, {frag['source']}): masked {frag['masked']:.4g}, "
                  f"core {frag['core']:.4g}, ratio {frag['ratio']:.4g}")


