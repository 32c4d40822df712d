"""Data pipeline throughput: modelfix's folder source vs a bare `torchvision.datasets.ImageFolder` + `DataLoader`.

A generated folder of mixed-size JPEGs (sides drawn in [low, high]) is read at 0, 1, 2… workers by both:

- modelfix: `open_source(root, 3, size, size, resize="shorter")` (header scan timed separately) streamed by
  `modelfix.data.batches`;
- torchvision: `ImageFolder(root, transform)` with the same geometry on tensors (`PILToTensor`, `Resize`
  floor(size / 0.875) antialiased, `CenterCrop(size)`, float in [0, 1]) through a `DataLoader`.

Images/s = images / seconds from creating the iterator to the last batch (worker start-up included).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import batches, open_source
from ..data.transforms import CROP_PCT


def make_folder(root, n: int = 5000, classes: int = 10, low: int = 256, high: int = 512, seed: int = 0) -> Path:
    """`root/<class>/<i>.jpg`: n smooth RGB images (gradients plus mild noise, like photos to a JPEG coder) of
    random sizes in [low, high]²; kept if already complete."""
    root = Path(root)
    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(low, high + 1, 2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], axis=2) * 200
        img = np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)
    return root


def _torchvision_loader(root: Path, size: int, batch_size: int, workers: int):
    import torchvision
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.Resize(math.floor(size / CROP_PCT), antialias=True),
                            v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)])
    data = torchvision.datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers)


def _time(iterable) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for batch in iterable:
        n += len(batch["x"] if isinstance(batch, dict) else batch[0])
    return time.perf_counter() - start, n


def run(root, n: int = 5000, size: int = 224, workers=(0, 1, 2), batch_size: int = 64, seed: int = 0) -> dict:
    """Generate (or reuse) the folder and time both pipelines at each worker count; returns rows of images/s."""
    root = make_folder(root, n=n, seed=seed)
    start = time.perf_counter()
    source = open_source(root, 3, size, size, resize="shorter")
    scan_s = time.perf_counter() - start
    rows = []
    for w in workers:
        t_mf, n_mf = _time(batches(source, batch_size, workers=w))
        t_tv, n_tv = _time(_torchvision_loader(root, size, batch_size, w))
        rows.append({"workers": w, "modelfix_img_s": n_mf / t_mf, "torchvision_img_s": n_tv / t_tv,
                     "ratio": (n_mf / t_mf) / (n_tv / t_tv), "images": n_mf})
    return {"n": len(source), "size": size, "batch_size": batch_size, "header_scan_s": scan_s,
            "header_scan_img_s": len(source) / scan_s, "torch_threads": torch.get_num_threads(), "rows": rows}


if __name__ == "__main__":  # python -m modelfix.bench.data ROOT [N]
    import json
    import sys

    print(json.dumps(run(sys.argv[1], n=int(sys.argv[2]) if len(sys.argv) > 2 else 5000), indent=1))
