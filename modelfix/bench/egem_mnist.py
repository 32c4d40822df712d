"""The EGEM paper's modified-MNIST benchmark (Supp. C.1/E; notes §7): Original, EGEM, PCA-EGEM, RGEM, Ridge, Retrain.

Per run r (seed r): train the CNN 5 epochs (Adam, lr 1e-3, batch 128, BCE over the 10 outputs) on `egem-mnist:train`
(3 pixels on 70 % of the 8s); refinement samples per class from the artifact-free pool `egem-mnist:clean` (the
paper used a VAE-selected pool we cannot ship); 5 % slack; 1000 random test images, clean and with the artifact on
every one (100 % uniform poisoning). The prune-egem speed ratio (end-to-end fit over one plain forward pass of the
oversampled refinement set) is measured in the same run.
"""

from __future__ import annotations

import statistics
import time

import torch

from modelfix.card import ModelCard
from modelfix.data import load_scenario, parse_artifact
from modelfix.evaluate import evaluate, predict
from modelfix.app.repair import repair
from modelfix.repair.refinement import refinement_split
from modelfix.repair.retrain import RetrainConfig, fit_retrain
from modelfix.training import TrainConfig, train
from modelfix.zoo import build_model, default_input_spec

METHODS = ("original", "egem", "pca-egem", "rgem", "ridge", "retrain")


def _accuracies(model, test, artifact) -> dict:
    rows = evaluate(model, test, artifact, levels=(0.0, 1.0), labels="none", progress=False)["levels"]
    return {"clean": rows[0]["accuracy"], "poisoned": rows[1]["accuracy"]}


def _repair(method: str, model, pool, split, slack: float, retrain_grid, layers=None, seed: int = 0):
    """One row's repair. The registry's methods run through the application layer's `repair()` (the same split:
    same pool, N and seed); EGEM's Retrain baseline, an epoch grid on the refinement split, runs `fit_retrain`."""
    if method == "original":
        return model, {}
    if method in ("egem", "pca-egem", "rgem", "ridge"):
        options = {"layers": layers} if method in ("egem", "pca-egem") else {}
        result = repair(model, None, method, clean=pool, seed=seed, progress=False,
                        samples_per_class=split.summary["samples_per_class"], slack=slack, **options)
        key = "alpha" if method in ("egem", "pca-egem") else "lambda"
        return result.model, {key: result.selection.value if result.selection else result.details[key],
                              "seconds": result.timings["total_s"]}
    repaired, trace = fit_retrain(model, split, RetrainConfig(grid=retrain_grid, slack=slack, select="paper"),
                                  progress=False)  # the paper's rule: this is the paper's table
    return repaired, {"epochs": trace["epochs"], "seconds": trace["timing"]["total_s"],
                      "selection": trace["selection"]}  # validation accuracy at every grid epoch


def _forward_seconds(model, split) -> float:
    """One plain forward pass over the oversampled refinement set (fit + validation parts)."""
    x = torch.cat([split.expanded("fit").x, split.expanded("val").x])
    start = time.perf_counter()
    predict(model, x, 256)
    return time.perf_counter() - start


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "values": values}


def run(arch: str = "egem-cnn", runs: int = 5, samples: tuple[int, ...] = (700,), sweep: tuple[int, ...] = (),
        slacks: tuple[float, ...] = (0.05,), methods: tuple[str, ...] = METHODS, epochs: int = 5,
        retrain_grid: tuple[int, ...] = (1, 5, 10, 20, 30, 50, 100), test_size: int = 1000, data_root=None,
        layers: str | None = "pool1,flatten,relu3", progress: bool = True) -> dict:
    """Mean ± std over `runs` of clean/poisoned test accuracy per method, the sample sweep and extra slack rows.

    `layers`: EGEM's refinement points; the default is the paper's MNIST protocol (after pool1, after pool2 +
    flatten — one unit per channel *and position* — and after the fc1 ReLU); None uses the generic defaults.
    """
    train_data = load_scenario("egem-mnist", "train", data_root, seed=0)
    pool = load_scenario("egem-mnist", "clean", data_root, seed=0)
    test_all = load_scenario("egem-mnist", "test", data_root, seed=0)
    artifact = parse_artifact(train_data.info["artifact"])
    card = ModelCard(arch=arch, num_classes=10, input=default_input_spec(arch))
    cells: dict[tuple, list[dict]] = {}
    ratios: dict[str, list[float]] = {"egem": [], "pca-egem": []}
    for r in range(runs):
        torch.manual_seed(r)
        model = build_model(card)
        config = TrainConfig(optimizer="adam", lr=1e-3, batch_size=128, epochs=epochs, loss="bce", seed=r)
        train(model, train_data, config, progress=progress, description=f"run {r + 1}/{runs} train {arch}")
        pick = torch.randperm(len(test_all), generator=torch.Generator().manual_seed(1000 + r))[:test_size]
        test = test_all.subset(pick)
        rows = [(n, s, m) for n in samples for s in slacks for m in methods]
        rows += [(n, slacks[0], m) for n in sweep if n not in samples for m in methods if m != "retrain"]
        splits = {}
        for n, slack, method in rows:
            if n not in splits:
                splits[n] = refinement_split(model, pool, samples_per_class=n, seed=r)
            if method == "original" and (n, slack) != (rows[0][0], rows[0][1]):
                continue
            repaired, info = _repair(method, model, pool, splits[n], slack, retrain_grid, layers, seed=r)
            cells.setdefault((method, n, slack), []).append({**_accuracies(repaired, test, artifact), **info})
            if method in ratios and n == max(samples) and slack == slacks[0]:
                ratios[method].append(info["seconds"] / _forward_seconds(model, splits[n]))
    table = []
    for (method, n, slack), values in cells.items():
        row = {"method": method, "samples_per_class": n, "slack": slack,
               "clean": _mean_std([v["clean"] for v in values]), "poisoned": _mean_std([v["poisoned"] for v in values])}
        for key in ("alpha", "lambda", "epochs", "selection"):
            if key in values[0]:
                row[key] = [v[key] for v in values]
        table.append(row)
    return {"arch": arch, "runs": runs, "layers": layers, "epochs": epochs, "test_size": test_size, "rows": table,
            "speed_ratio": {m: _mean_std(v) for m, v in ratios.items() if v},
            "protocol": "train 5 epochs Adam 1e-3 batch 128 BCE on egem-mnist:train; refinement pool egem-mnist:clean; "
                        "1000 random t10k images clean and with the 3 pixels on every image"}
