"""`modelfix explain`: heatmaps of what a model looks at, as PNGs plus the raw arrays. No algorithms live here
(they are in modelfix.explain.attribution and modelfix.explain.heatmap); docs/explain.md describes the output.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..app.resolve import check_fits, data_info, default_test_split, device_name, load_checkpoint, load_dataset
from ..errors import ModelfixError
from .base import app, err, handles_errors, warn
from .options import (data_options, DataRootOpt, DeviceOpt, JsonOpt, MasksOpt, PrecisionOpt, SeedOpt, checkpoint_options)

SCHEMA = "modelfix.explain/v1"


def _slug(name: str) -> str:
    """A class name as a safe file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-")[:40] or "class"


def _check_output(output: Path, inputs: list[Path]) -> None:
    """Refuse an existing file, a non-empty folder, and any output that is an input or lies inside an input folder."""
    if output.exists() and not output.is_dir():
        raise ModelfixError(f"-o {output} is an existing file", hint="-o takes a new folder")
    if output.is_dir() and any(output.iterdir()):
        raise ModelfixError(f"-o {output} exists and is not empty", hint="choose a new folder")
    target = output.resolve()
    for source in inputs:
        source = source.resolve()
        if target == source or (source.is_dir() and target.is_relative_to(source)):
            raise ModelfixError(f"refusing to write {output} inside the input {source}",
                                hint="choose an output folder outside the model and data paths")


def _stats(values) -> dict:
    import torch

    values = torch.as_tensor(values, dtype=torch.float64)
    values = values[torch.isfinite(values)]
    if not len(values):
        return {"n": 0, "mean": None, "min": None, "max": None}
    return {"n": len(values), "mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


@app.command("explain", epilog="Example: modelfix explain runs/shortcut.safetensors --data decoy-digits:test-contaminated --method lrp --target pred -o explain/")
@handles_errors
@checkpoint_options
@data_options
def explain(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="A new folder: heatmaps/, inputs/, attributions.npz, explain.json.", rich_help_panel="Output")],
    data: Annotated[Optional[str], typer.Option("--data", help="A folder, a .npz/.safetensors bundle or SCENARIO[:SPLIT] (default: the test split of the model's scenario).", rich_help_panel="Data")] = None,
    masks: MasksOpt = None,
    method: Annotated[str, typer.Option("--method", help="lrp, gradient, gradxinput, integrated-gradients, smoothgrad or gradcam.")] = "lrp",
    composite: Annotated[Optional[str], typer.Option("--composite", help="LRP composite: epsilon-plus-flat, epsilon-gamma-box, epsilon-plus, epsilon-alpha2-beta1, epsilon-alpha2-beta1-flat (default: epsilon-plus-flat, or epsilon-plus when the first layer is Linear).")] = None,
    target: Annotated[str, typer.Option("--target", help="The class explained: true (the label), pred (the model's prediction) or a class index.")] = "true",
    limit: Annotated[int, typer.Option("--limit", help="Explain the first N items (0 = all).")] = 16,
    cmap: Annotated[str, typer.Option("--cmap", help="Heatmap colours: bwr (blue-white-red) or coldnhot (cyan-blue-black-red-yellow-white).", rich_help_panel="Output")] = "bwr",
    steps: Annotated[int, typer.Option("--steps", help="integrated-gradients: Riemann points on the path from the black image.")] = 32,
    samples: Annotated[int, typer.Option("--samples", help="smoothgrad: noisy copies averaged.")] = 16,
    noise: Annotated[float, typer.Option("--noise", help="smoothgrad: noise std as a share of each image's max - min.")] = 0.1,
    layer: Annotated[Optional[str], typer.Option("--layer", help="gradcam: a conv layer inside the net (default: the last conv block; 'input': |input gradient|).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", rich_help_panel="Runtime")] = 32,
    data_root: DataRootOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    json_output: JsonOpt = False,
    checkpoint: Optional[dict] = None,
    reading: Optional[dict] = None,
) -> None:
    """Heatmaps of the evidence for a class (LRP through zennit, gradients, integrated gradients, SmoothGrad,
    Grad-CAM) as PNGs, with the raw attributions; the model is left exactly as it was."""
    import numpy as np
    import torch

    from ..checkpoint import sha256_file, sidecar_path
    from ..data import take
    from ..data.sources import staged_folder
    from ..explain.attribution import (attribution_details, check_method, composite_name, composite_warnings,
                                      default_composite, relevance_maps, resolve_targets)
    from ..explain.heatmap import check_cmap, colorize, image_png_bytes, save_png, write_bytes_atomic
    from ..explain.lrp import canonizers_for
    from ..precision import autocast
    from ..progress import progress_bar
    from ..report import json_safe

    started = time.perf_counter()
    check_method(method)
    if composite is not None:
        composite_name(composite)
    check_cmap(cmap)
    if limit < 0:
        raise ModelfixError(f"--limit must be >= 0 (0 = all items), not {limit}")
    for option, value in (("--batch-size", batch_size), ("--steps", steps), ("--samples", samples)):
        if value < 1:
            raise ModelfixError(f"{option} must be at least 1, not {value}")
    if noise < 0:
        raise ModelfixError(f"--noise must be >= 0, not {noise}")
    if target not in ("true", "pred") and not re.fullmatch(r"\d+", target.strip()):
        raise ModelfixError(f"--target must be true, pred or a class index, not '{target}'")
    inputs = [model_path, sidecar_path(model_path)] + [p for p in (masks,) if p is not None]
    if data is not None and Path(data).expanduser().exists():
        inputs.append(Path(data).expanduser())
    _check_output(output, inputs)
    amp = autocast(precision, device_name(device))  # fp16 off CUDA: refused before anything is read or written

    model, card = load_checkpoint(model_path, device=device_name(device), **checkpoint)
    composite = composite or default_composite(model)
    spec = data or default_test_split(card)
    dataset = load_dataset(spec, data_root, seed, masks, card=card, reading=reading, stream=True)
    check_fits(dataset, card, spec)
    n = len(dataset) if limit == 0 else min(limit, len(dataset))
    subset = take(dataset, torch.arange(n))  # a lazy source: only the items explained are decoded
    if n == 0:
        raise ModelfixError(f"data '{spec}' holds no items to explain")

    with amp:  # forward and backward passes under autocast; the maps come back float32
        targets = resolve_targets(model, subset.x, subset.y, target, batch_size=max(batch_size, 256))
        t0 = time.perf_counter()
        result = attribution_details(model, subset.x, targets, method=method, composite=composite, steps=steps,
                                     samples=samples, noise=noise, layer=layer, batch_size=batch_size, progress=True,
                                     seed=seed, shard=True)
    attribution_seconds = time.perf_counter() - t0
    maps = relevance_maps(result.values)

    doc = {
        "schema": SCHEMA,
        "command": "explain",
        "model": {"path": str(model_path), "sha256": sha256_file(model_path), "arch": card.arch,
                  "num_classes": card.num_classes},
        "data": data_info(spec, subset),
        "method": method,
        "composite": composite_name(composite).replace("_", "-") if method == "lrp" else None,
        "canonizers": [type(c).__name__ for c in canonizers_for(model.net)] if method == "lrp" else None,
        "settings": {"method": method, "composite": composite, "target": target, "limit": limit, "cmap": cmap,
                     "steps": steps, "samples": samples, "noise": noise, "layer": layer, "batch_size": batch_size,
                     "seed": seed, "device": str(model.mean.device), "precision": precision},
        "n": n,
        "targets": {"mode": target, "counts": torch.bincount(targets, minlength=card.num_classes).tolist()},
    }
    doc["warnings"] = composite_warnings(model, composite) if method == "lrp" else []
    sums = result.values.flatten(1).sum(1)
    ratio = None
    if result.expected_sum is not None:
        ratio = sums.double() / result.expected_sum.double()
        # LRP: Σ R / z_t (1 = conserved); integrated gradients: Σ attribution / (z_t(x) − z_t(0)) (completeness)
        doc["conservation" if method == "lrp" else "completeness"] = {
            "definition": "sum of relevance / target logit" if method == "lrp"
            else "sum of attribution / (z_t(x) - z_t(black image))",
            **_stats(ratio)}
    if bool(subset.has_mask.any()):
        magnitude = maps.abs().double()
        inside = (magnitude * subset.mask[:, 0].double()).flatten(1).sum(1)
        total = magnitude.flatten(1).sum(1)
        share = torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total))[subset.has_mask]
        doc["artifact_share"] = {"definition": "share of |map| inside the mask (1 = spurious), items with a mask",
                                 **_stats(share)}

    t0 = time.perf_counter()
    names = subset.class_names
    low, high = card.input.value_range
    heat_names = [f"heatmaps/{i:05d}_{_slug(names[int(subset.y[i])])}_t{_slug(names[int(targets[i])])}.png"
                  for i in range(n)]
    arrays = {"attributions": result.values.numpy().astype(np.float32), "maps": maps.numpy().astype(np.float32),
              "targets": targets.numpy(), "labels": subset.y.numpy(), "indices": np.arange(n, dtype=np.int64),
              "logits": result.logits.numpy().astype(np.float32)}
    if ratio is not None:
        arrays["conservation" if method == "lrp" else "completeness"] = ratio.numpy().astype(np.float32)
    with staged_folder(output) as staging, progress_bar(True) as bar:  # an error leaves nothing behind
        task = bar.add_task("writing heatmaps", total=n)
        for start in range(0, n, 256):
            rgb = colorize(maps[start:start + 256], cmap=cmap, symmetric=True)
            for i in range(start, min(start + 256, n)):
                save_png(staging / heat_names[i], rgb[i - start])
                write_bytes_atomic(staging / "inputs" / f"{i:05d}.png",
                                   image_png_bytes((subset.x[i] - low) / (high - low)))
                bar.advance(task)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes_atomic(staging / "attributions.npz", buffer.getvalue())
        doc["files"] = {"heatmaps": heat_names, "inputs": [f"inputs/{i:05d}.png" for i in range(n)],
                        "arrays": "attributions.npz"}
        doc["seconds"] = {"attribution": attribution_seconds, "writing": time.perf_counter() - t0,
                          "total": time.perf_counter() - started}
        text = json.dumps(json_safe(doc), indent=2, allow_nan=False)
        write_bytes_atomic(staging / "explain.json", (text + "\n").encode("utf-8"))

    summary = f"wrote {n} heatmaps ({method}) to {output}/heatmaps/, inputs/, attributions.npz and explain.json"
    if "conservation" in doc and doc["conservation"]["n"]:
        c = doc["conservation"]
        summary += f"; relevance / logit {c['mean']:.4f} (min {c['min']:.4f}, max {c['max']:.4f})"
    for warning in doc["warnings"]:
        warn(warning)
    err.print(summary, highlight=False)
    if json_output:
        print(json.dumps(json_safe(doc)))
