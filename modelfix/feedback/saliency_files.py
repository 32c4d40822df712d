"""Saliency feedback folders for CRAYON-ATTENTION (methods_posthoc.md §6.2, §6.7).

`write_saliency` writes what a person needs to judge each sample's saliency map, and what training needs later:

- `overlay_00000.png`, … : the image with its map (upsampled bilinearly, divided by its max) blended in red;
- `maps.safetensors`: key `maps`, float32 N×h×w, the frozen maps M at feature resolution, with metadata
  (format, sample ids as JSON, data checksum);
- `samples.csv`: blank verdicts, one row per sample, the note column naming its overlay file.

The maps are computed elsewhere (Grad-CAM at the last conv block, |input gradient| for nets without convs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..data.sources import staged_folder
from ..errors import ModelfixError
from .files import sample_ids, write_sample_template

FORMAT = "modelfix.saliency/v1"
ALPHA = 0.6  # how strongly the map's maximum tints its pixels red


def overlay(x: Tensor, heat: Tensor, alpha: float = ALPHA) -> np.ndarray:
    """H×W×3 uint8: image `x` (C×H×W in [0, 1]; gray is repeated to RGB) blended with red by `alpha`·heat,
    heat (H×W) in [0, 1]."""
    rgb = x[:3] if x.shape[0] >= 3 else x.mean(dim=0, keepdim=True).expand(3, -1, -1)
    red = torch.tensor([1.0, 0.0, 0.0]).reshape(3, 1, 1)
    weight = alpha * heat.clamp(0, 1)
    out = (1 - weight) * rgb.clamp(0, 1) + weight * red
    return (out.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def upsampled_heat(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """N×H×W: each N×h×w map bilinearly resized to the image and divided by its max (an all-zero map stays 0)."""
    big = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0].clamp_min(0)
    peak = big.flatten(1).amax(dim=1).clamp_min(1e-12)
    return big / peak[:, None, None]


def write_saliency(model: nn.Module | None, data, out_dir, maps: Tensor, ids=None) -> dict:
    """Write overlays, `maps.safetensors` and a blank `samples.csv` for `maps` (N×h×w, one per item of `data`);
    `ids` default to the data's sample ids. Atomic: written into a temporary sibling and renamed into place, so an
    error leaves nothing; a non-empty `out_dir` is refused. `model` only lends its input spec to the metadata."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    n = len(data)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelfixError(f"output folder {out_dir} exists and is not empty", hint="choose a new folder")
    if maps.dim() != 3 or maps.shape[0] != n:
        raise ModelfixError(f"saliency maps must be N×h×w with N = {n}, got shape {tuple(maps.shape)}")
    ids = sample_ids(data) if ids is None else list(ids)
    if len(ids) != n:
        raise ModelfixError(f"{len(ids)} sample ids for {n} maps")
    maps = maps.detach().float().cpu().contiguous()
    names = [f"overlay_{i:05d}.png" for i in range(n)]
    spec = getattr(model, "input_spec", None)
    metadata = {"format": FORMAT, "ids": json.dumps(ids), "map_size": json.dumps(list(maps.shape[1:])),
                "data_checksum": str(data.info.get("checksum") or data.checksum()),
                "input": json.dumps([spec.channels, spec.height, spec.width]) if spec is not None else "null"}
    size = (int(data.x.shape[2]), int(data.x.shape[3]))
    with staged_folder(out_dir) as staging:
        for start in range(0, n, 256):  # upsample in chunks: N full-size maps at once could be large
            heat = upsampled_heat(maps[start:start + 256], size)
            for i in range(start, min(start + 256, n)):
                Image.fromarray(overlay(data.x[i], heat[i - start])).save(staging / names[i])
        save_file({"maps": maps}, str(staging / "maps.safetensors"), metadata=metadata)
        write_sample_template(staging / "samples.csv", ids, notes=names)
    return {"samples": n, "map_size": list(maps.shape[1:]), "out_dir": str(out_dir)}


def read_saliency(path) -> tuple[Tensor, list]:
    """(maps N×h×w float32, sample ids) from a `maps.safetensors` that `write_saliency` wrote."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT or "maps" not in handle.keys():
                raise ModelfixError(f"{path} is not a modelfix saliency file (format {FORMAT})")
            maps = handle.get_tensor("maps")
    except (OSError, SafetensorError) as exc:
        raise ModelfixError(f"cannot read saliency file {path}: {exc}") from None
    return maps, json.loads(meta.get("ids", "[]"))
