"""`modelfix discover` (SpRAy-style clustering of explanations, then repair inputs from a chosen cluster) and
`modelfix bench discover`. No algorithms live here: modelfix.discover and modelfix.bench.discover hold them;
docs/discover.md and docs/commands/discover.md describe the output."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..app.resolve import data_info, device_name, load_checkpoint, load_dataset
from ..errors import ModelfixError
from .base import app, bench_app, err, handles_errors, out
from .options import (data_options, DataRootOpt, DeviceOpt, JsonOpt, SeedOpt, checkpoint_options)


def _default_data(card) -> str:
    """The data the model learned from: its card's dataset spec (a shortcut lives in the training data)."""
    spec = (card.dataset or {}).get("spec")
    scenario = (card.dataset or {}).get("scenario")
    if spec:
        return str(spec)
    if scenario:
        return f"{scenario}:train"
    raise ModelfixError("no --data given and the model card names no training data", hint="pass --data DIR|SCENARIO")


@app.command("discover", epilog="Example: modelfix discover runs/shortcut.safetensors --data tagged-digits:train -o discover/ --export 8:0")
@handles_errors
@checkpoint_options
@data_options
def discover_command(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="A new folder: index.html, clusters.json (and export/ with --export).", rich_help_panel="Output")],
    data: Annotated[Optional[str], typer.Option("--data", help="A folder, a .npz/.safetensors bundle or SCENARIO[:SPLIT] (default: the model's training data from its card).", rich_help_panel="Data")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Comma-separated class names or indices (default: every class with items).")] = None,
    explain: Annotated[str, typer.Option("--explain", help="lrp, gradient, gradxinput, integrated-gradients, smoothgrad or gradcam.")] = "lrp",
    composite: Annotated[Optional[str], typer.Option("--composite", help="LRP composite (default: epsilon-plus-flat, or epsilon-plus when the first layer is Linear).")] = None,
    max_items: Annotated[int, typer.Option("--max-items", help="Explain at most N items per class (a seeded sample).")] = 500,
    size: Annotated[int, typer.Option("--size", help="Heatmaps are pooled to SIZE×SIZE before clustering.")] = 14,
    neighbors: Annotated[int, typer.Option("--neighbors", help="k of the k-nearest-neighbour affinity.")] = 10,
    max_clusters: Annotated[int, typer.Option("--max-clusters", help="Largest number of clusters the eigengap may choose.")] = 8,
    embedding: Annotated[str, typer.Option("--embedding", help="2-D picture: tsne or spectral.", rich_help_panel="Output")] = "tsne",
    export: Annotated[Optional[str], typer.Option("--export", help="CLASS:CLUSTER[,CLASS:CLUSTER…] or 'suspicious': write masks, artifact images, feedback and a clean pool for those clusters into OUT/export/.", rich_help_panel="Output")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", help="With --export: the layer of neurons.csv (default: the input of the last linear layer, as prune-crayon).", rich_help_panel="Output")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", rich_help_panel="Runtime")] = 64,
    data_root: DataRootOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """Find shortcuts nobody told you about: explain each class's evidence, cluster the heatmaps (spectral
    clustering, eigengap), rank the clusters by how suspicious they are; --export turns one into repair inputs."""
    from ..checkpoint import sha256_file, sidecar_path
    from ..data.sources import staged_folder
    from ..discover import discover, export_clusters, parse_export, render_html
    from ..discover.core import check_settings
    from ..explain.attribution import check_method
    from ..explain.heatmap import write_bytes_atomic
    from ..report import json_safe

    started = time.perf_counter()
    check_method(explain)
    check_settings(max_items, size, neighbors, max_clusters, embedding)
    if batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, not {batch_size}")
    inputs = [model_path, sidecar_path(model_path)]
    if data is not None and Path(data).expanduser().exists():
        inputs.append(Path(data).expanduser())
    from ..app.outputs import OutputPlan

    OutputPlan(folder=output, inputs=inputs, folder_option="-o").check()
    model, card = load_checkpoint(model_path, device=device_name(device), **checkpoint)
    spec = data or _default_data(card)
    dataset = load_dataset(spec, data_root, seed, card=card, reading=reading)
    wanted = [c for c in classes.split(",") if c.strip()] if classes else None
    chosen = parse_export(export, dataset.class_names) if export and export.strip() != "suspicious" else None
    for cls, _ in chosen or ():
        if wanted is not None and str(cls) not in wanted and dataset.class_names[cls] not in wanted:
            raise ModelfixError(f"--export class {dataset.class_names[cls]} is not among --classes")

    result = discover(model, dataset, wanted, method=explain, composite=composite, max_items=max_items, size=size,
                      neighbors=neighbors, max_clusters=max_clusters, embedding=embedding, batch_size=batch_size,
                      seed=seed, progress=True)
    if export and export.strip() == "suspicious":
        chosen = [(e.cls, c.id) for e, c in result.candidates()]
        if not chosen:
            raise ModelfixError("--export suspicious: no cluster scored at or above the threshold",
                                hint="look at the gallery and name one with --export CLASS:CLUSTER")
    for cls, cid in chosen or ():
        result.for_class(cls).cluster(cid)  # an unknown id fails before anything is written
    doc = result.to_dict()
    doc.update(command="discover", model={"path": str(model_path), "sha256": sha256_file(model_path),
                                          "arch": card.arch}, data=data_info(spec, dataset))
    with staged_folder(output) as staging:
        write_bytes_atomic(staging / "index.html", render_html(result, dataset, f"modelfix discover: {model_path.name}",
                                                               card.input.value_range).encode("utf-8"))
        if chosen:
            doc["export"] = export_clusters(model, dataset, result, chosen, staging / "export", card.input.value_range,
                                            layer, final_dir=output / "export")
        doc["seconds"]["total"] = time.perf_counter() - started
        write_bytes_atomic(staging / "clusters.json", (json.dumps(json_safe(doc), allow_nan=False) + "\n").encode())

    for e in result.classes:
        best = e.clusters[0]
        err.print(f"class {e.name}: {len(e.items)} items, {len(e.clusters)} clusters, top cluster {best.id} "
                  f"(score {best.score.score:.3f}, {best.size} items)", highlight=False)
    found = result.candidates()
    err.print(f"{len(found)} suspicious cluster(s)" + (": " + ", ".join(f"{e.name}:{c.id} ({c.score.score:.3f})"
                                                                        for e, c in found) if found else "")
              + f"; wrote {output}/index.html and clusters.json" + (f" and {output}/export/" if chosen else ""),
              highlight=False)
    if json_output:
        summary = {k: v for k, v in doc.items() if k != "classes"}
        summary["classes"] = [{k: v for k, v in c.items() if k not in ("items", "labels", "embedding")}
                              | {"clusters": [{k: v for k, v in cl.items() if k != "members"} for cl in c["clusters"]]}
                              for c in doc["classes"]]
        print(json.dumps(json_safe(summary)))


@bench_app.command("discover", epilog="Example: modelfix bench discover --scenarios tagged-digits,decoy-digits")
@handles_errors
def bench_discover(
    scenarios: Annotated[str, typer.Option("--scenarios", help="Comma-separated: tagged-digits, decoy-digits, egem-mnist, decoy-mnist, stamped-fashion.")] = "tagged-digits,decoy-digits",
    max_items: Annotated[int, typer.Option("--max-items", help="Items explained per class.")] = 500,
    repair_epochs: Annotated[int, typer.Option("--repair-epochs", help="Epochs of the RRR fine-tunes.")] = 3,
    train_size: Annotated[Optional[int], typer.Option("--train-size", help="MNIST scenarios: the first N training items.")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write the results as JSON here.")] = None,
    data_root: DataRootOpt = None,
    seed: SeedOpt = 0,
    json_output: JsonOpt = False,
) -> None:
    """Discover → export → RRR repair → evaluate, against the same repair with ground-truth masks; purity, recall
    and mask IoU of the top cluster of the artifact's class; the scores on a model trained without the artifact."""
    from ..bench.discover import run
    from ..report import json_safe, write_text_atomic

    names = [s.strip() for s in scenarios.split(",") if s.strip()]
    result = run(names, max_items=max_items, repair_epochs=repair_epochs, train_size=train_size, data_root=data_root,
                 seed=seed, progress=True)
    if output is not None:
        write_text_atomic(output, json.dumps(json_safe(result), indent=2) + "\n")
    if json_output:
        print(json.dumps(json_safe(result)))
        return
    table = Table(title="discover: top cluster of the artifact's class, repair from discovered vs true masks")
    for col in ("scenario", "class", "score", "purity", "recall", "IoU", "gap before", "gap disc.", "gap true",
                "closed", "clean max", "false alarms"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        table.add_row(row["scenario"], str(row["class"]), f"{row['score']:.3f}", f"{row['purity']:.3f}",
                      f"{row['recall']:.3f}", f"{row['iou']:.3f}", f"{100 * row['gap']['before']:.1f}",
                      f"{100 * row['gap']['discovered']:.1f}", f"{100 * row['gap']['true']:.1f}",
                      "–" if row["closed"] is None else f"{100 * row['closed']:.0f} %", f"{row['clean']['max_score']:.3f}",
                      f"{row['clean']['false_alarms']}/{row['clean']['clusters']}")
    out.print(table)
