"""`modelfix demo`: the whole story on the embedded decoy digits, on a CPU, in minutes — train a model that takes
the corner-patch shortcut, show the shortcut, repair it with every method family, and compare.

1. data: the `decoy-digits` scenario (scikit-learn's bundled digits, no download). Every training image carries
   DecoyMNIST's corner patch in its label's grey level (and its mask); `clean` is the post-hoc refinement pool;
   `test-clean` is the test set, poisoned on the fly by `evaluate`.
2. the shortcut: `tap-cnn` trained from scratch with plain ERM on the training split.
3. repairs, each from a deep copy of that same model, through the library functions the commands call:
   EGEM, PCA-EGEM (`prune-egem`), RGEM, Ridge (`refit`), CRAYON-PRUNING with simulated neuron feedback
   (`feedback simulate --kind neurons` + `prune-crayon`), TAP, RRR and Cert-R4 (`finetune --method tap|rrr|r4-cert`).
4. every model on the test digits three ways: clean (no patch), contaminated (the patch tells the truth) and
   poisoned (every image patched with a uniformly random label's grey level: the patch lies).

`tap-cnn` is the one zoo architecture every method accepts: conv feature maps for TAP, activations for EGEM, a last
Linear for RGEM/Ridge, interval bounds for Cert-R4, and a *spatial* layer (`pool2`) that feeds the last Linear
through a flatten, which CRAYON-PRUNING prunes and the simulated feedback can judge by where the patch lies (a dense
layer's "patch" is the whole image). `egem-cnn` is faster but has a dense layer before its head, and on these digits
it ignores the patch altogether.

The shortcut gap. A model trained with the patch on every image reads the digit *and* the patch, and an image
without the patch is out of distribution for it (an empty corner looks like a dark patch), so its clean accuracy is
low as well; clean − poisoned therefore hides the shortcut. What the shortcut does is make the accuracy depend on
what the patch says: `gap = contaminated − poisoned` (TAP's Δ, sign flipped). A model that ignores the patch has a
gap near 0 whatever its accuracy.

Budgets (`BUDGETS`): the methods keep their command defaults except where a setting is named in the row's
`settings` (what was reduced for the CPU budget, or chosen because the default does not remove the shortcut here).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .card import InputSpec, ModelCard
from .data import Artifact, Dataset, load_scenario, parse_artifact
from .errors import ModelfixError
from .evaluate import evaluate
from .training import TrainConfig, train
from .zoo import build_model, default_input_spec

SCENARIO = "decoy-digits"
ARCH = "tap-cnn"
SCHEMA = "modelfix.demo/v1"

DEFINITIONS = {
    "clean": "accuracy on the test digits without the patch",
    "contaminated": "accuracy with the patch on every test image in its true label's grey level (the patch tells the truth)",
    "poisoned": "accuracy with the patch on every test image in a uniformly random label's grey level (the patch lies; 1 in 10 still matches)",
    "gap": "contaminated − poisoned: how much the accuracy depends on what the patch says (0 = the patch is ignored)",
    "worst_group_poisoned": "lowest per-class accuracy on the poisoned test images",
    "seconds": "wall time of training (shortcut) or of the repair alone (evaluation not included)",
}


@dataclass(frozen=True)
class Budget:
    """What the two modes set: the amounts of data and training. Everything else is each method's default.

    `*_items`: the first N items of a split (None: all of it); the training split holds 3 shifted copies of each
    digit, so its first third holds every digit once.
    """

    train_items: int | None  # shortcut training
    train_epochs: int
    finetune_items: int | None  # TAP / RRR training data
    finetune_epochs: int
    cert_items: int | None  # Cert-R4 costs ~9× an ERM step: fewer items
    cert_epochs: int
    crayon_items: int | None  # gallery (top-k) and last-layer fine-tune data of CRAYON-PRUNING


BUDGETS = {
    "default": Budget(train_items=None, train_epochs=3, finetune_items=1000, finetune_epochs=2, cert_items=500,
                      cert_epochs=1, crayon_items=None),
    "quick": Budget(train_items=1078, train_epochs=3, finetune_items=400, finetune_epochs=2, cert_items=200,
                    cert_epochs=1, crayon_items=1078),
}

# The shortcut's training (plain ERM; the `train` command's defaults but batch 64, which gives the shortcut enough
# steps within the budget).
SHORTCUT_TRAIN = {"optimizer": "adam", "lr": 1e-3, "batch_size": 64}
# Post-hoc refinement (prune-egem / refit options). keep_incorrect: the shortcut model gets too few clean digits of
# some classes right for the "correctly predicted only" rule to leave two samples per class in the 179-image pool.
POSTHOC = {"samples_per_class": 700, "keep_incorrect": True, "slack": 0.05, "slack_mode": "relative"}
# Guided fine-tunes (finetune --method M): the λ and optimiser overrides that remove the shortcut here (measured;
# the methods' defaults are the papers' from-scratch settings, see the module docstring of each objective).
FINETUNES = {
    "TAP": ("tap", {"lam": 1e-2}, {"optimizer": "adam", "lr": 1e-3, "batch_size": 32}),
    "RRR": ("rrr", {"lam": 1e-4}, {"optimizer": "adam", "lr": 1e-3, "batch_size": 32}),
    "Cert-R4": ("r4-cert", {"lam": 5.0}, {"batch_size": 32}),
}


@dataclass
class Setup:
    """Everything the repairs share: the splits, the artifact, the budget and the seed."""

    train: Dataset
    pool: Dataset
    test: Dataset
    artifact: Artifact
    budget: Budget
    seed: int


def _first(data: Dataset, n: int | None) -> Dataset:
    return data if n is None or n >= len(data) else data.subset(torch.arange(n))


def load_setup(quick: bool = False, seed: int = 0) -> Setup:
    """The decoy-digits splits the demo uses (generated, no file read), the scenario's artifact and the budget."""
    train_data = load_scenario(SCENARIO, "train", seed=seed)
    return Setup(train=train_data, pool=load_scenario(SCENARIO, "clean", seed=seed),
                 test=load_scenario(SCENARIO, "test-clean", seed=seed),
                 artifact=parse_artifact(train_data.info["artifact"]),
                 budget=BUDGETS["quick" if quick else "default"], seed=seed)


def model_card(data: Dataset) -> ModelCard:
    """The card of a fresh `tap-cnn` for `data` (its size and classes; the architecture's normalisation)."""
    c, h, w = data.shape
    base = default_input_spec(ARCH)
    return ModelCard(arch=ARCH, num_classes=data.num_classes, class_names=list(data.class_names),
                     input=InputSpec(channels=c, height=h, width=w, mean=base.mean, std=base.std),
                     artifact=data.info.get("artifact"),
                     dataset={"spec": f"{SCENARIO}:train", "checksum": data.info.get("checksum"), "n": len(data),
                              "scenario": SCENARIO},
                     provenance={"source": "random initialisation (modelfix demo)"})


def train_shortcut(setup: Setup) -> tuple[nn.Module, ModelCard, dict]:
    """ERM from a seeded random init on the (first `train_items` of the) training split: `(model, card, settings)`."""
    data = _first(setup.train, setup.budget.train_items)
    card = model_card(data)
    config = TrainConfig(epochs=setup.budget.train_epochs, seed=setup.seed, **SHORTCUT_TRAIN)
    torch.manual_seed(setup.seed)  # the init, as `modelfix train` seeds it
    model = build_model(card)
    train(model, data, config, progress=False)
    settings = {"method": "erm", "data": f"{SCENARIO}:train", "items": len(data), **config.to_dict()}
    card = card.with_history({"command": "demo", "method": "erm", "config": config.to_dict(), "data": settings["data"]})
    return model.eval(), card, settings


def measure(model: nn.Module, setup: Setup) -> dict:
    """Clean, contaminated and poisoned test accuracy (one `evaluate` call), the gap and the poisoned worst group."""
    result = evaluate(model, setup.test, setup.artifact, levels=(0.0, 1.0), labels=("correlated", "random"),
                      seed=setup.seed, progress=False)
    rows = {(row["level"], row["labels"]): row for row in result["levels"]}
    clean, contaminated, poisoned = rows[(0.0, None)], rows[(1.0, "correlated")], rows[(1.0, "random")]
    return {"clean": clean["accuracy"], "contaminated": contaminated["accuracy"], "poisoned": poisoned["accuracy"],
            "gap": contaminated["accuracy"] - poisoned["accuracy"],
            "clean_minus_poisoned": clean["accuracy"] - poisoned["accuracy"],
            "worst_group_poisoned": poisoned["worst_group_accuracy"], "worst_group": poisoned["worst_group"]}


# ---- the repairs: each takes the shortcut model (never modified) and returns (repaired copy, settings) ---------


def _split(model: nn.Module, setup: Setup):
    """The post-hoc refinement split, built as `prune-egem` / `refit --scenario decoy-digits` build it."""
    from .repair.refinement import refinement_split

    return refinement_split(model, setup.pool, samples_per_class=POSTHOC["samples_per_class"], seed=setup.seed,
                            keep_incorrect=POSTHOC["keep_incorrect"])


def _posthoc_settings(trace: dict, key: str, **extra) -> dict:
    samples = trace.get("samples", {})
    return {"data": f"{SCENARIO}:clean", **POSTHOC, **extra, key: trace[key], "selected_by": trace["selected_by"],
            "fit_unique": samples.get("fit_unique"), "val_unique": samples.get("val_unique"),
            "val_accuracy": [trace["val_orig"], trace["val_acc"]]}


def repair_egem(model: nn.Module, setup: Setup, method: str = "egem", layers: str | None = None) -> tuple[nn.Module, dict]:
    """EGEM / PCA-EGEM soft pruning (`modelfix prune-egem --scenario decoy-digits [--method pca-egem]`)."""
    from .repair.egem import EgemConfig, fit_egem

    config = EgemConfig(method=method, layers=layers, slack=POSTHOC["slack"], slack_mode=POSTHOC["slack_mode"])
    repaired, trace = fit_egem(model, _split(model, setup), config, progress=False)
    return repaired, _posthoc_settings(trace, "alpha", method=method, layers=layers or "default",
                                       points=trace["points"])


def repair_refit(model: nn.Module, setup: Setup, method: str = "rgem") -> tuple[nn.Module, dict]:
    """RGEM / Ridge closed-form refit of the last Linear (`modelfix refit --scenario decoy-digits --method M`)."""
    from .repair.lastlayer import RefitConfig, fit_refit

    config = RefitConfig(method=method, slack=POSTHOC["slack"], slack_mode=POSTHOC["slack_mode"])
    repaired, trace = fit_refit(model, _split(model, setup), config, progress=False)
    return repaired, _posthoc_settings(trace, "lambda", method=method, layer=trace["layer"])


def repair_crayon(model: nn.Module, setup: Setup) -> tuple[nn.Module, dict]:
    """CRAYON-PRUNING with simulated neuron feedback: `feedback simulate --kind neurons` (top-20 patches per channel
    of the default layer; "no" when most touch the patch mask), then `prune-crayon` (zero those channels' columns of
    the last Linear, fine-tune that Linear), both with the commands' defaults."""
    from .feedback import default_feedback_layer, simulate_neurons, top_activations
    from .repair.crayon import prune_crayon

    data = _first(setup.train, setup.budget.crayon_items)
    layer = default_feedback_layer(model)
    top = top_activations(model, data, layer, k=20, batch_size=256, progress=False)
    feedback, simulated = simulate_neurons(top, data, max_artifact_share=0.5)
    repaired, trace = prune_crayon(model, data, feedback.prune, layer=layer, epochs=10, lr=1e-4, weight_decay=1e-4,
                                   batch_size=128, seed=setup.seed, progress=False)
    return repaired, {"data": f"{SCENARIO}:train", "items": len(data), "layer": layer,
                      "feedback": {k: simulated[k] for k in ("k", "patch", "max_artifact_share")},
                      "pruned": trace["n_pruned"], "channels": trace["n_channels"], "epochs": trace["epochs"],
                      "lr": trace["lr"], "weight_decay": trace["weight_decay"], "batch_size": trace["batch_size"]}


def repair_finetune(model: nn.Module, setup: Setup, name: str) -> tuple[nn.Module, dict]:
    """A guided fine-tune on the masked training split (`modelfix finetune --method M --lambda L ...`): TrainConfig
    from its defaults < the method's `train_defaults` < the demo's overrides, as the command builds it."""
    from .repair.finetune import finetune
    from .repair.methods import get_method

    method, hparams, overrides = FINETUNES[name]
    entry = get_method(method)
    cert = method == "r4-cert"
    items = setup.budget.cert_items if cert else setup.budget.finetune_items
    epochs = setup.budget.cert_epochs if cert else setup.budget.finetune_epochs
    data = _first(_shuffled(setup.train, setup.seed), items)
    config = TrainConfig(**{"epochs": epochs, "seed": setup.seed, **entry.train_defaults, **overrides})
    weight = {k: v for k, v in hparams.items() if k == entry.weight}
    others = {k: v for k, v in hparams.items() if k != entry.weight}
    sweep = finetune(model, data, method, config, lambdas=list(weight.values()) or None, hparams=others,
                     progress=False)
    return sweep.model.eval(), {"method": method, "data": f"{SCENARIO}:train", "items": len(data),
                                "masks": "the scenario's patch masks", **hparams,
                                **{k: v for k, v in config.to_dict().items() if k in
                                   ("optimizer", "lr", "momentum", "epochs", "batch_size", "weight_decay")}}


def _shuffled(data: Dataset, seed: int) -> Dataset:
    """The items in a seeded order, so a prefix mixes digits, copies and patch corners."""
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)))


# name, family, repair
REPAIRS: list[tuple[str, str, Callable[[nn.Module, Setup], tuple[nn.Module, dict]]]] = [
    ("EGEM", "post-hoc", lambda m, s: repair_egem(m, s, "egem")),
    ("PCA-EGEM", "post-hoc", lambda m, s: repair_egem(m, s, "pca-egem")),
    ("RGEM", "post-hoc", lambda m, s: repair_refit(m, s, "rgem")),
    ("Ridge", "post-hoc", lambda m, s: repair_refit(m, s, "ridge")),
    ("CRAYON-PRUNING", "pruning", repair_crayon),
    ("TAP", "fine-tune", lambda m, s: repair_finetune(m, s, "TAP")),
    ("RRR", "fine-tune", lambda m, s: repair_finetune(m, s, "RRR")),
    ("Cert-R4", "fine-tune", lambda m, s: repair_finetune(m, s, "Cert-R4")),
]
SHORTCUT_ROW = "shortcut (before repair)"


def stages() -> list[str]:
    """The stage names `run_demo` reports to its `progress` callback, in order."""
    return ["data", "shortcut", *(name for name, _, _ in REPAIRS), "report"]


def run_demo(out_dir: str | Path | None = None, quick: bool = False, seed: int = 0,
             progress: Callable[[str, str], None] | None = None) -> dict:
    """Run the demo; returns the results dict (and writes results.json, report.md and shortcut.safetensors into
    `out_dir` when given). `progress(stage, "start" | "done")` is called around every stage of `stages()`."""
    from .report import versions

    def report(stage: str, status: str) -> None:
        if progress is not None:
            progress(stage, status)

    start = time.perf_counter()
    report("data", "start")
    setup = load_setup(quick, seed)
    report("data", "done")

    report("shortcut", "start")
    t0 = time.perf_counter()
    shortcut, card, train_settings = train_shortcut(setup)
    rows = [{"name": SHORTCUT_ROW, "family": "none", **measure(shortcut, setup),
             "seconds": time.perf_counter() - t0, "settings": train_settings}]
    report("shortcut", "done")

    for name, family, repair in REPAIRS:
        report(name, "start")
        t0 = time.perf_counter()
        repaired, settings = repair(shortcut, setup)
        seconds = time.perf_counter() - t0
        rows.append({"name": name, "family": family, **measure(repaired, setup), "seconds": seconds,
                     "settings": settings})
        report(name, "done")

    report("report", "start")
    results = {
        "schema": SCHEMA,
        "command": "demo",
        "settings": {"mode": "quick" if quick else "default", "seed": seed, "scenario": SCENARIO, "arch": ARCH,
                     "artifact": str(setup.artifact), "test": f"{SCENARIO}:test-clean", "test_items": len(setup.test),
                     "budget": dataclasses.asdict(setup.budget)},
        "rows": rows,
        "definitions": dict(DEFINITIONS),
        "versions": versions(),
        "files": {},
    }
    if out_dir is not None:
        results["files"] = write_demo(Path(out_dir), results, shortcut, card)
    results["seconds"] = time.perf_counter() - start
    report("report", "done")
    return results


# ---- output -------------------------------------------------------------------------------------------------------


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def render_markdown(results: dict) -> str:
    """report.md: the settings, one table row per model, and what the columns mean."""
    s = results["settings"]
    lines = [
        "# modelfix demo",
        "",
        f"- scenario `{s['scenario']}` (artifact `{s['artifact']}`), architecture `{s['arch']}`, mode {s['mode']}, "
        f"seed {s['seed']}; test: `{s['test']}` ({s['test_items']} images)",
        f"- total time {results.get('seconds', float('nan')):.1f} s",
        "",
        "| method | family | clean % | contaminated % | poisoned % | gap (pp) | worst group poisoned % | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['name']} | {row['family']} | {_pct(row['clean'])} | {_pct(row['contaminated'])} | "
                     f"{_pct(row['poisoned'])} | {_pct(row['gap'])} | {_pct(row['worst_group_poisoned'])} | "
                     f"{row['seconds']:.1f} |")
    lines += ["", "Columns: " + "; ".join(f"**{k}**: {v}" for k, v in results["definitions"].items()) + ".", "",
              "Settings per row:", ""]
    for row in results["rows"]:
        lines.append(f"- {row['name']}: " + ", ".join(f"{k} {v}" for k, v in row["settings"].items()))
    return "\n".join(lines) + "\n"


def write_demo(out_dir: Path, results: dict, shortcut: nn.Module, card: ModelCard) -> dict:
    """shortcut.safetensors (+ card), results.json and report.md into `out_dir` (created; existing files replaced).
    Returns their paths by kind."""
    from .checkpoint import save_model
    from .report import json_safe, write_text_atomic

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelfixError(f"-o {out_dir} is a file", hint="give a folder (it is created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"model": str(out_dir / "shortcut.safetensors"), "results": str(out_dir / "results.json"),
             "report": str(out_dir / "report.md")}
    save_model(shortcut, card, files["model"])
    results = {**results, "files": files}
    write_text_atomic(Path(files["results"]), json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
    write_text_atomic(Path(files["report"]), render_markdown(results))
    return files
