"""`modelfix bench evaluate`: our evaluation path against a bare torch loop over the very same tensors.

Both sides predict every image and count correct answers; ours also computes per-class/per-group metrics. The
two are timed alternately in one process (so machine load hits both alike) and the medians are compared.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..card import ModelCard
from ..data import Dataset, parse_artifact
from ..evaluate import evaluate
from ..zoo import build_model, default_input_spec


def _bare_loop(model, x, y, batch_size) -> float:
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            correct += int((model(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum())
    return correct / len(x)


def run(arch: str = "mlp", n: int = 20000, batch_size: int = 512, repeats: int = 5, levels=(0.0,), threads=None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    spec = default_input_spec(arch)
    card = ModelCard(arch=arch, num_classes=10, input=spec)
    torch.manual_seed(0)
    model = build_model(card).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, spec.channels, spec.height, spec.width, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    data = Dataset(x=x, y=y, class_names=[str(i) for i in range(10)], name="bench")
    artifact = parse_artifact("corner-patch")
    levels = tuple(levels or (0.0,))

    # Warm-up both paths once (allocator, kernels), then alternate.
    _bare_loop(model, x, y, batch_size)
    evaluate(model, data, artifact, levels=levels, batch_size=batch_size, progress=False)
    bare, ours = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        _bare_loop(model, x, y, batch_size)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        evaluate(model, data, artifact, levels=levels, batch_size=batch_size, progress=False)
        ours.append(time.perf_counter() - t)
    bare_s, ours_s = statistics.median(bare), statistics.median(ours)
    # Work of the evaluate side, in images pushed through the model, so a poison level is not free.
    images = n + sum(round(level * n) for level in levels if level > 0)
    return {
        "arch": arch,
        "n": n,
        "shape": list(x.shape[1:]),
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "levels": list(levels),
        "bare_s": bare_s,
        "ours_s": ours_s,
        "bare_images_per_s": n / bare_s,
        "ours_images_per_s": images / ours_s,
        "ratio": (images / ours_s) / (n / bare_s),
    }
