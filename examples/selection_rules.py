"""The two selection rules side by side (docs/benchmarks.md, "Selection rules"): the papers' rules (`select="paper"`:
the slack rule post hoc, best validation accuracy for fine-tunes) against the counterfactual rule (the default), on
one shortcut model per case, everything else the same.

    python examples/selection_rules.py tagged-digits
    python examples/selection_rules.py rgb-disc
    python examples/selection_rules.py decoy-digits
    python examples/selection_rules.py egem-mnist      # needs MODELFIX_DATA (the MNIST idx files)
    python examples/selection_rules.py egem-mnist egem,rgem   # only these repairs

Cases:
- `tagged-digits`: the `modelfix demo` shortcut (egem-cnn, ERM on the embedded tagged digits, the tag on 8s); the
  clean pool is the scenario's `clean` split, RRR's masks are the tag's region on every training image (as the demo),
  RRR's validation data is the clean split;
- `rgb-disc`: a synthetic 3-class RGB task at 64×64 (stripes at three orientations under noise) with a magenta disc
  on 90 % of class 0's training images; a torchvision resnet18 trained 6 epochs from scratch (Adam 1e-3, batch 32)
  takes the disc. Masks: the disc's footprint on the items that carry it; the clean pool and RRR's validation data
  are a clean split of their own; test: a clean split, and the same with the disc on every image.
- `decoy-digits`: the test suite's `shortcut` mlp (examples/default_method.py); clean pool and RRR's validation data:
  `decoy-digits:clean` (179 items; EGEM and RGEM run with `keep_incorrect=True`, because the shortcut model gets too
  few clean digits right for the default to have two per class); RRR fine-tunes `decoy-digits:train` (the patch,
  masked, on every item) with the command's defaults (5 epochs, batch 128, RRR's SGD 1e-3); test: the test digits
  clean and with a random-colour patch (DecoyMNIST's permuted test);
- `egem-mnist`: the shortcut egem-cnn-ref of examples/default_method.py (3 epochs on 30,000 of `egem-mnist:train`);
  clean pool: `egem-mnist:clean`; RRR fine-tunes 3 epochs (batch 128) on that script's 12,000 training items (the
  3 pixels masked on the 8s that carry them), validation data: 2,000 seeded items of the clean pool; test: t10k.
Test data is only evaluated, never used to choose anything.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from modelfix.app.repair import repair
from modelfix.card import InputSpec, ModelCard
from modelfix.data import Dataset, load_scenario, parse_artifact, poison
from modelfix.evaluate import evaluate
from modelfix.training import TrainConfig, train
from modelfix.zoo import build_model


def stripes(n: int, seed: int, size: int = 64) -> Dataset:
    """Three classes: low-contrast stripes at 0°, 60°, 120° (random frequency and phase) on a random colour, noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    angle = y.float() * math.pi / 3 + (torch.rand(n, generator=g) - 0.5) * 0.3
    freq = 3 + 3 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    r = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    t = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    wave = torch.sin(2 * math.pi * freq[:, None, None] * t + phase[:, None, None])
    base = 0.25 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    x = base + 0.06 * wave[:, None] + 0.14 * torch.randn(n, 3, size, size, generator=g)
    return Dataset(x=x.clamp(0, 1), y=y, class_names=["benign", "b", "c"], name=f"stripes-{seed}")


def disc_png(folder: Path, radius: int = 6) -> Path:
    d = 2 * radius
    yy, xx = np.mgrid[:d, :d]
    inside = ((yy - radius + 0.5) ** 2 + (xx - radius + 0.5) ** 2) <= radius ** 2
    rgba = np.zeros((d, d, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 230, 40, 200, 255 * inside  # magenta
    path = folder / "disc.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def case_rgb(folder: Path):
    torch.manual_seed(0)
    artifact = parse_artifact(f"image:{disc_png(folder)}@bottom-right,margin=4,target=0")
    train_data = poison(stripes(1200, 1), artifact, 0.9, labels="correlated", seed=1)  # 90 % of class 0
    pool, test = stripes(450, 2), stripes(600, 3)
    card = ModelCard(arch="resnet18", num_classes=3, class_names=list(train_data.class_names),
                     input=InputSpec(channels=3, height=64, width=64, mean=(0.485, 0.456, 0.406),
                                     std=(0.229, 0.224, 0.225)), artifact=str(artifact))
    model = build_model(card)
    train(model, train_data, TrainConfig(epochs=6, optimizer="adam", lr=1e-3, batch_size=32, seed=0), progress=False)
    rrr = {"data": train_data, "val": pool, "epochs": 2, "optimizer": "adam", "lr": 1e-4, "batch_size": 32}
    return model.eval(), artifact, pool, test, rrr


def case_tagged():
    from modelfix.demo import load_setup, region_masks, train_shortcut

    setup = load_setup(seed=0)
    model, _, _ = train_shortcut(setup)
    rrr = {"data": region_masks(setup.train, setup.artifact), "val": setup.pool, "epochs": 3, "optimizer": "adam",
           "lr": 1e-3, "batch_size": 32}
    return model, setup.artifact, setup.pool, setup.test, rrr


def case_decoy():
    from default_method import case_decoy as shortcut

    model, train_data, artifact, _, _ = shortcut()
    pool = load_scenario("decoy-digits", "clean")
    rrr = {"data": train_data, "val": pool, "epochs": 5, "batch_size": 128}
    return model, artifact, pool, load_scenario("decoy-digits", "test"), rrr, {"keep_incorrect": True}


def case_egem():
    from default_method import case_egem as shortcut

    model, train_data, artifact, _, _ = shortcut()
    pool = load_scenario("egem-mnist", "clean")
    val = pool.subset(torch.randperm(len(pool), generator=torch.Generator().manual_seed(3))[:2000].sort().values)
    rrr = {"data": train_data, "val": val, "epochs": 3, "batch_size": 128}
    return model, artifact, pool, load_scenario("egem-mnist", "test"), rrr, {}


def measure(model, test, artifact) -> tuple[float, float]:
    rows = evaluate(model, test, artifact, levels=(0.0, 1.0), labels=("random",), seed=0, progress=False)["levels"]
    return rows[0]["accuracy"], rows[1]["accuracy"]


REPAIRS = ("egem", "rgem", "rrr")


def main(case: str, methods: tuple[str, ...] = REPAIRS) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        cases = {"tagged-digits": lambda: case_tagged() + ({},), "rgb-disc": lambda: case_rgb(Path(folder)) + ({},),
                 "decoy-digits": case_decoy, "egem-mnist": case_egem}
        model, artifact, pool, test, rrr, posthoc = cases[case]()
        clean, poisoned = measure(model, test, artifact)
        print(f"| {case} | original | – | – | {100 * clean:.1f} | {100 * poisoned:.1f} | "
              f"{time.perf_counter() - start:.0f} s |", flush=True)
        for method in methods:
            for rule in ("paper", "counterfactual"):
                start = time.perf_counter()
                if method == "rrr":
                    options = {k: v for k, v in rrr.items() if k not in ("data", "val")}
                    result = repair(model, rrr["data"], "rrr", val=rrr["val"], artifact=artifact, progress=False,
                                    select_by="accuracy" if rule == "paper" else "counterfactual", **options)
                else:
                    result = repair(model, None, method, clean=pool, artifact=artifact, progress=False, select=rule,
                                    **posthoc)
                clean, poisoned = measure(result.model, test, artifact)
                sel = result.selection
                print(f"| {case} | {method} | {rule} | {sel.value:.3g} | {100 * clean:.1f} | {100 * poisoned:.1f} | "
                      f"{time.perf_counter() - start:.0f} s |", flush=True)


if __name__ == "__main__":
    chosen = tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else REPAIRS
    main(sys.argv[1] if len(sys.argv) > 1 else "tagged-digits", chosen)
