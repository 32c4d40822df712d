"""EGEM / PCA-EGEM refinement points on a held-out stamp case (issue 18): the generic small-net default (the input
of every Conv/Linear after the first) against the old one (every ReLU, `relu1,relu2,relu3`).

The case, built like the EGEM paper's modified MNIST but with other images and another artifact: Fashion-MNIST
(../shared/data/FashionMNIST), a white 4×4 stamp at rows 23–26, columns 1–4 (bottom left, where the paper's and
tagged-digits' artifacts are not) on 70 % of the training images of class 8 (bag); `egem-cnn-ref` trained 5 epochs
(Adam 1e-3, batch 128, BCE: the `bench egem-mnist` protocol); refinement pool = the training images without the
stamp, 700 per class, 20 % validation, the paper's slack rule (5 %); scored on 1000 random held-out t10k images,
clean and with the stamp on every one (100 %). Seed s: init, shuffling, refinement split and test pick.

    MODELFIX_DATA=../shared/data OMP_NUM_THREADS=1 python examples/egem_points_stamp.py --seeds 0,1,2 -o stamp.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from modelfix.app.repair import repair
from modelfix.card import ModelCard
from modelfix.data import Dataset, FixedPixels, poison
from modelfix.data.sources import read_idx
from modelfix.evaluate import evaluate
from modelfix.training import TrainConfig, train
from modelfix.zoo import build_model, default_input_spec

ARCH, TARGET, SHARE = "egem-cnn-ref", 8, 0.7
STAMP = FixedPixels(pixels="/".join(f"{r}:{c}" for r in range(23, 27) for c in range(1, 5)), target=TARGET)
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
POINTS = {"default": None, "relu": "relu1,relu2,relu3"}


def fashion(part: str, root: Path) -> Dataset:
    prefix = "train" if part == "train" else "t10k"
    images = read_idx(root / "FashionMNIST" / "raw" / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / "FashionMNIST" / "raw" / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.astype("float32")[:, None] / 255)
    return Dataset(x=x, y=torch.from_numpy(labels.astype("int64")), class_names=CLASSES, name=f"fashion-{part}")


def scores(model, test) -> dict:
    rows = evaluate(model, test, STAMP, levels=(0.0, 1.0), labels="none", progress=False)["levels"]
    return {"clean": rows[0]["accuracy"], "poisoned": rows[1]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples-per-class", type=int, default=700)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    root = Path(os.environ.get("MODELFIX_DATA", "../shared/data"))
    train_data = poison(fashion("train", root), STAMP, SHARE, "correlated", seed=0)
    pool = train_data.subset(~train_data.info["poisoned"])
    test_all = fashion("test", root)
    card = ModelCard(arch=ARCH, num_classes=10, class_names=CLASSES, input=default_input_spec(ARCH))
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        tick = time.perf_counter()
        torch.manual_seed(seed)
        model = build_model(card)
        train(model, train_data, TrainConfig(optimizer="adam", lr=1e-3, batch_size=128, epochs=5, loss="bce",
                                             seed=seed), progress=False)
        model.eval()
        pick = torch.randperm(len(test_all), generator=torch.Generator().manual_seed(1000 + seed))[:1000]
        test = test_all.subset(pick)
        rows.append({"seed": seed, "method": "original", "points": "-", **scores(model, test)})
        print(rows[-1], flush=True)
        for method in ("egem", "pca-egem"):
            for name, layers in POINTS.items():
                result = repair(model, None, method, clean=pool, seed=seed, progress=False, select="paper",
                                samples_per_class=args.samples_per_class, slack=0.05, layers=layers)
                rows.append({"seed": seed, "method": method, "points": name, "layers": result.details["points"],
                             "alpha": result.selection.value, **scores(result.model, test)})
                print(rows[-1], flush=True)
        print(f"seed {seed}: {time.perf_counter() - tick:.0f} s", flush=True)
    if args.output:
        args.output.write_text(json.dumps({"artifact": str(STAMP), "target": TARGET, "share": SHARE, "rows": rows},
                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
