"""Neuron galleries for CRAYON-PRUNING feedback (methods_posthoc.md §6.3 steps 1–3, §6.7).

For every channel j of a layer (default: the layer feeding the last Linear), find the k training images that
activate it most and show the image patch around the place where they do:

1. score of image n for channel j: `max_hw act[n, j]` for a 4-D output (N×C×H×W), `act[n, j]` for a 2-D one;
2. keep the top k per channel in ONE streaming pass (a running `topk` merge per channel; ties go to the lower item
   index), recording the argmax cell (h, w) of each (first maximal cell in row-major order);
3. crop a square of side `patch` (default 2·stride) centred on the cell centre, clamped inside the image.

A person then answers yes (relevant concept) / no (artifact, background) per neuron in the blank `neurons.csv`.
"""

from __future__ import annotations

import difflib
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .. import distributed
from ..data.sources import staged_folder
from ..errors import DataError, ModelfixError, UnsupportedModel
from ..progress import progress_bar
from ..atomic import write_text_atomic
from .files import sample_ids, write_neuron_template

# Modules the default layer steps back over: they only reshape, pass through or pool the map to 1×1, so the
# channels a person should look at are those of the map before them (ResNet `avgpool` → `layer4`, §6.3).
MIN_PATCH_PIXELS = 48


@dataclass
class TopK:
    """Per channel, the k highest scores (descending; ties: lower item index first), their item indices and
    argmax cells (h, w), or (−1, −1) for a 2-D layer. `map_size` is the layer's (H_f, W_f), (1, 1) for 2-D."""

    values: Tensor  # C×k float32
    indices: Tensor  # C×k int64
    cells: Tensor  # C×k×2 int64
    map_size: tuple[int, int]
    layer: str = ""
    image_size: tuple[int, int] = (0, 0)


def _net(model: nn.Module) -> nn.Module:
    return getattr(model, "net", model)


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """The module named `layer` inside `model.net`; an unknown name lists close names."""
    modules = dict(_net(model).named_modules())
    modules.pop("", None)
    if layer not in modules:
        names = list(modules)
        close = difflib.get_close_matches(layer, names, n=4) or names[:4]
        raise ModelfixError(f"--layer '{layer}' is not a module of the network; e.g. {', '.join(close)}",
                            hint="`modelfix inspect` lists the layer names")
    return modules[layer]


def default_feedback_layer(model: nn.Module) -> str:
    """The layer whose channels people judge by default: the one CRAYON-PRUNING prunes (`repair.crayon.feature_layer`,
    the input of the last nn.Linear; the last conv block where it feeds the head): `relu1` for `mlp`, `relu3` for
    `egem-cnn`, `pool2` for `tap-cnn`, `layer4` for ResNets, `features.norm5` for DenseNet. One rule for galleries,
    simulated verdicts and pruning, so a neurons.csv always names the layer prune-crayon edits."""
    from ..repair.crayon import feature_layer

    return feature_layer(model)


def _channel_scores(act: Tensor, layer: str) -> tuple[Tensor, Tensor]:
    """(scores N×C, flat argmax cell N×C) of one batch; the cell is −1 for a 2-D output."""
    if act.dim() == 4:
        best = act.flatten(2).max(dim=2)  # first maximal cell on ties
        return best.values, best.indices
    if act.dim() == 2:
        return act, torch.full_like(act, -1, dtype=torch.long)
    raise UnsupportedModel(f"layer '{layer}' outputs shape {tuple(act.shape)}; a gallery needs N×C×H×W or N×C")


def _merge(values: Tensor, indices: Tensor, cells: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the k best per row: by value descending, ties by item index ascending (two stable sorts)."""
    by_index = torch.sort(indices, dim=1, stable=True).indices
    values, indices, cells = (t.gather(1, by_index) for t in (values, indices, cells))
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order), cells.gather(1, order)


def top_activations(model: nn.Module, data, layer: str, k: int = 20, batch_size: int = 256,
                    progress: bool = True) -> TopK:
    """Per channel of `layer`, the k items of `data` with the highest score (see module doc), in one pass.

    Eval mode and no_grad; the hook is removed and every module's train/eval flag restored afterwards. k larger
    than the data keeps every item. Under torchrun each process ranks its block of whole batches and the blocks' top
    k are merged by the same order (value, then item): the one-process galleries exactly.
    """
    if k < 1:
        raise ModelfixError(f"--top-k must be at least 1, not {k}")
    if batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, not {batch_size}")
    module = resolve_layer(model, layer)
    k = min(int(k), len(data))
    captured: list[Tensor] = []

    def hook(mod, args, output) -> None:
        captured.append(output)

    reference = next(iter(model.parameters()), torch.zeros(()))
    training = {m: m.training for m in model.modules()}
    values = indices = cells = None
    map_size = (1, 1)
    rows = distributed.batch_block(len(data), batch_size)  # under torchrun: this process's whole batches
    block = data if len(rows) == len(data) else data.subset(slice(rows.start, rows.stop))
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        with torch.no_grad(), progress_bar(progress) as bar:
            task = bar.add_task(f"top-{k} of {layer}", total=math.ceil(len(rows) / batch_size))
            for batch in block.batches(batch_size):
                captured.clear()
                model(batch["x"].to(reference.device))
                if len(captured) != 1:
                    raise UnsupportedModel(f"layer '{layer}' runs {len(captured)} times per forward pass; "
                                           f"a gallery needs a module that runs exactly once")
                act = captured[0]
                if not isinstance(act, Tensor):
                    raise UnsupportedModel(f"layer '{layer}' does not return a single tensor")
                if act.dim() == 4:
                    map_size = (act.shape[2], act.shape[3])
                scores, flat = _channel_scores(act.float(), layer)
                c = scores.shape[1]
                new_v, new_c = scores.t().cpu(), flat.t().cpu()
                new_i = (batch["index"] + rows.start).reshape(1, -1).expand(c, -1)
                if values is None:
                    values, indices, cells = new_v, new_i, new_c
                else:
                    values, indices, cells = (torch.cat(p, dim=1) for p in
                                              ((values, new_v), (indices, new_i), (cells, new_c)))
                values, indices, cells = _merge(values, indices, cells, k)
                bar.advance(task)
    finally:
        handle.remove()
        for m, flag in training.items():
            m.training = flag
    # every process's top k (none from a process without items), merged by the same order: the global top k
    parts = [part for part in distributed.gather_objects(None if values is None else (values, indices, cells, map_size))
             if part is not None]
    if not parts:
        raise DataError("the data holds no samples: nothing to rank")
    values, indices, cells = _merge(*(torch.cat([part[i] for part in parts], dim=1) for i in range(3)), k)
    map_size = parts[0][3]
    wf = map_size[1]
    hw = torch.stack([cells // wf, cells % wf], dim=2)
    hw[cells < 0] = -1
    return TopK(values.contiguous(), indices.contiguous(), hw.contiguous(), tuple(int(s) for s in map_size), layer,
                (int(data.x.shape[2]), int(data.x.shape[3])))


def default_patch(map_size: tuple[int, int], image_size: tuple[int, int]) -> int:
    """2·stride, stride = round(H/H_f) (the larger of the two axes); the whole image for a 1×1 map (2-D layer)."""
    (hf, wf), (h, w) = map_size, image_size
    if (hf, wf) == (1, 1):
        return max(h, w)
    return max(1, 2 * max(round(h / hf), round(w / wf)))


def patch_box(cell, map_size: tuple[int, int], image_size: tuple[int, int], patch: int | None = None
              ) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), ends exclusive: a square of side `patch` centred on the cell centre
    ((h+½)·H/H_f, (w+½)·W/W_f), shifted to lie inside the image (and cut to the image where it is larger).

    The top-left corner is the centre minus patch/2, rounded half up. A cell (−1, −1) (2-D layer) gives the
    whole image.
    """
    (h, w), (hf, wf), (height, width) = (int(cell[0]), int(cell[1])), map_size, image_size
    if h < 0 or w < 0:
        return 0, 0, height, width
    side = default_patch(map_size, image_size) if patch is None else int(patch)
    if side < 1:
        raise ModelfixError(f"--patch must be at least 1 pixel, not {patch}")
    out = []
    for index, cells, size in ((h, hf, height), (w, wf, width)):
        length = min(side, size)
        centre = (index + 0.5) * size / cells
        start = math.floor(centre - side / 2 + 0.5)
        out.append(min(max(start, 0), size - length))
    return out[0], out[1], out[0] + min(side, height), out[1] + min(side, width)


def _to_uint8(x: Tensor) -> np.ndarray:
    """C×H×W in [0, 1] → H×W (gray) or H×W×3 (RGB) uint8; other channel counts are averaged to gray."""
    if x.shape[0] == 3:
        arr = x.permute(1, 2, 0)
    else:
        arr = x.mean(dim=0)
    return (arr.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _grid(patches: list[np.ndarray], scale: int, cols: int = 10, gap: int = 2) -> Image.Image:
    """The patches side by side (up to `cols` a row), each enlarged `scale` times with nearest, on white."""
    ph, pw = patches[0].shape[:2]
    ph, pw = ph * scale, pw * scale
    cols = min(cols, len(patches))
    rows = math.ceil(len(patches) / cols)
    shape = (rows * ph + (rows - 1) * gap, cols * pw + (cols - 1) * gap) + patches[0].shape[2:]
    canvas = np.full(shape, 255, dtype=np.uint8)
    for i, p in enumerate(patches):
        r, c = divmod(i, cols)
        big = p.repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[r * (ph + gap):r * (ph + gap) + ph, c * (pw + gap):c * (pw + gap) + pw] = big
    return Image.fromarray(canvas)


def _html(layer: str, neurons: list[dict], k: int) -> str:
    rows = []
    for entry in neurons:
        j = entry["neuron"]
        acts = [p["activation"] for p in entry["patches"]]
        first = html.escape(str(entry["patches"][0]["sample"])) if entry["patches"] else ""
        caption = f"max {acts[0]:.4g}, min {acts[-1]:.4g} over the top {len(acts)}; best: {first}" if acts else ""
        rows.append(f'<tr><td>{j}</td><td><a href="{entry["image"]}"><img src="{entry["image"]}" '
                    f'alt="neuron {j}"></a></td><td>{caption}</td></tr>')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>modelfix gallery: "
            f"{html.escape(layer)}</title>\n<style>body{{font-family:sans-serif}}td{{padding:4px;"
            "vertical-align:middle}}img{image-rendering:pixelated}</style></head><body>\n"
            f"<h1>Layer {html.escape(layer)}: top-{k} patches per neuron</h1>\n"
            "<p>Answer yes (relevant) / no (artifact or background: prune) per neuron in neurons.csv; a blank "
            "verdict keeps the neuron. Item ids, cells and activations are in patches.json.</p>\n"
            "<table>\n<tr><th>neuron</th><th>patches</th><th>caption</th></tr>\n" + "\n".join(rows) +
            "\n</table></body></html>\n")


def write_gallery(model: nn.Module, data, out_dir, layer: str | None = None, k: int = 20, patch: int | None = None,
                  batch_size: int = 256, progress: bool = True) -> dict:
    """Write `out_dir/neuron_0000.png…` (a grid of each channel's top-k patches), `index.html`, `patches.json`
    (item, sample id, cell, box, activation per patch) and a blank `neurons.csv`; return a summary.

    The folder is written into a temporary sibling and renamed into place, so an error leaves nothing behind;
    an existing non-empty `out_dir` is refused.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelfixError(f"output folder {out_dir} exists and is not empty", hint="choose a new folder")
    layer = layer or default_feedback_layer(model)
    top = top_activations(model, data, layer, k=k, batch_size=batch_size, progress=progress)
    height, width = top.image_size
    side = default_patch(top.map_size, top.image_size) if patch is None else int(patch)
    ids = sample_ids(data)
    neurons = []
    with staged_folder(out_dir) as staging:
        with progress_bar(progress) as bar:
            task = bar.add_task("gallery", total=top.values.shape[0])
            for j in range(top.values.shape[0]):
                crops, entries = [], []
                for value, item, cell in zip(top.values[j].tolist(), top.indices[j].tolist(), top.cells[j].tolist()):
                    box = patch_box(cell, top.map_size, top.image_size, side)
                    crops.append(_to_uint8(data.x[item, :, box[0]:box[2], box[1]:box[3]]))
                    entries.append({"item": item, "sample": ids[item], "cell": cell, "box": list(box),
                                    "activation": value})
                scale = max(1, math.ceil(MIN_PATCH_PIXELS / min(crops[0].shape[:2])))
                name = f"neuron_{j:04d}.png"
                _grid(crops, scale).save(staging / name)
                neurons.append({"neuron": j, "image": name, "patches": entries})
                bar.advance(task)
        doc = {"format": "modelfix.gallery/v1", "layer": layer, "k": int(top.values.shape[1]), "patch": side,
               "map_size": list(top.map_size), "image_size": [height, width], "neurons": neurons}
        write_text_atomic(staging / "patches.json", json.dumps(doc, indent=1) + "\n")
        write_text_atomic(staging / "index.html", _html(layer, neurons, doc["k"]))
        write_neuron_template(staging / "neurons.csv", layer, len(neurons))
    return {"layer": layer, "channels": len(neurons), "k": doc["k"], "patch": side, "map_size": list(top.map_size),
            "out_dir": str(out_dir)}
