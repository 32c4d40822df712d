"""The `modelfix` command line: parse options, call the library, render results. No algorithms live here."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__, progress
from .errors import ModelfixError

app = typer.Typer(
    name="modelfix",
    help="Repair image classifiers that learned a spurious shortcut, and prove what changed.",
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    no_args_is_help=True,
)
data_app = typer.Typer(help="Built-in scenarios and data export.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (measured numbers go to docs/benchmarks.md).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        out.print(f"modelfix {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """modelfix: repair image classifiers that learned a spurious shortcut, and prove what changed."""
    _state["debug"] = debug
    progress.ENABLED = not no_progress


def handles_errors(fn: Callable) -> Callable:
    """Turn a user-caused error into one line on stderr and its exit code; anything else into exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except ModelfixError as exc:
            if _state["debug"]:
                raise
            _fail(str(exc), exc.exit_code, kwargs.get("json_output", False))
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)
        except Exception as exc:  # a bug, or something we did not foresee: still one line unless --debug
            if _state["debug"]:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1,
                  kwargs.get("json_output", False))

    return wrapper


def _fail(message: str, code: int, json_output: bool) -> None:
    if json_output:
        print(json.dumps({"error": {"message": message, "exit_code": code}}))
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    raise typer.Exit(code)


# ---- option types shared by several commands ---------------------------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel="Runtime")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for data generation, poisoning and training.", rich_help_panel="Runtime")]
DataRootOpt = Annotated[Optional[Path], typer.Option("--data-root", help="Folder with MNIST/raw/*.gz for the MNIST scenarios (default: $MODELFIX_DATA).", rich_help_panel="Data")]
MasksOpt = Annotated[Optional[Path], typer.Option("--masks", help="Masks (1 = spurious): a folder mirroring an image folder, or a .npz/.safetensors bundle of the same items.", rich_help_panel="Data")]
TrustOpt = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow unpickling a full pickled model. Only for files you trust.", rich_help_panel="Model")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="Architecture for a checkpoint without a model card (see `modelfix archs`).", rich_help_panel="Model")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="Number of classes (card-less checkpoints).", rich_help_panel="Model")]
InChannelsOpt = Annotated[Optional[int], typer.Option("--in-channels", help="Input channels (card-less checkpoints).", rich_help_panel="Model")]
InputSizeOpt = Annotated[Optional[str], typer.Option("--input-size", help="Input size HxW, e.g. 28x28 (card-less checkpoints).", rich_help_panel="Model")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean, comma-separated (card-less checkpoints).", rich_help_panel="Model")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Per-channel std, comma-separated (card-less checkpoints).", rich_help_panel="Model")]
EvalDataOpt = Annotated[Optional[str], typer.Option("--eval-data", help="With --report: test data for the before/after accuracy (clean and poisoned), artifact reliance and heatmaps (a folder, bundle or SCENARIO[:SPLIT]; default: the test split of the model's scenario).", rich_help_panel="Output")]


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ModelfixError(f"{option} must be comma-separated numbers, not '{text}'") from None


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ModelfixError(f"--input-size must look like 28x28 or 224, not '{text}'")
    return (sizes[0], sizes[-1])


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelfixError(f"--device {name} asked for, but CUDA is not available here", hint="use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelfixError("--device mps asked for, but MPS is not available here", hint="use --device cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise ModelfixError(f"--device must be auto, cpu, cuda, cuda:N or mps, not '{name}'")
    return name


def _load(path: Path, trust: bool, device: str, arch=None, num_classes=None, in_channels=None, input_size=None,
          mean=None, std=None):
    from .checkpoint import ModelOverrides, load_model

    overrides = ModelOverrides(arch=arch, num_classes=num_classes, in_channels=in_channels, input_size=_size(input_size),
                               mean=_floats(mean, "--mean"), std=_floats(std, "--std"))
    return load_model(path, overrides, trust=trust, device=device)


def _check_fits(data, card, spec: str) -> None:
    """Refuse data the model cannot take, before any work is done."""
    c, h, w = data.shape
    want = (card.input.channels, card.input.height, card.input.width)
    if (c, h, w) != want:
        raise ModelfixError(
            f"data '{spec}' has images {c}×{h}×{w} but the model expects {want[0]}×{want[1]}×{want[2]}",
            hint="resize the images or pass the right --input-size/--in-channels for the checkpoint",
        )
    if len(data) and int(data.y.max()) >= card.num_classes:
        raise ModelfixError(f"data '{spec}' has label {int(data.y.max())} but the model has {card.num_classes} classes")


def _data(spec: str, data_root, seed, masks=None, class_names=None):
    from .data import load_data

    return load_data(spec, data_root=data_root, seed=seed, mask_dir=masks, class_names=class_names)


def _data_info(spec: str, data) -> dict:
    return {"spec": spec, "n": len(data), "classes": list(data.class_names), "checksum": data.checksum(),
            "name": data.name, "info": {k: v for k, v in data.info.items() if isinstance(v, (str, int, float, bool))}}


# ---- commands -----------------------------------------------------------------------------------------------------


@app.command(epilog="Example: modelfix evaluate runs/shortcut.safetensors --poison 0,1 --labels correlated,random")
@handles_errors
def evaluate(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    data: Annotated[Optional[str], typer.Option("--data", help="A folder, a bundle or SCENARIO[:SPLIT] (default: the test split of the scenario the model was trained on).", rich_help_panel="Data")] = None,
    masks: MasksOpt = None,
    artifact: Annotated[Optional[str], typer.Option("--artifact", help="Artifact spec or YAML file (default: the one on the model card).", rich_help_panel="Poisoning")] = None,
    poison: Annotated[str, typer.Option("--poison", help="Comma-separated poison levels in [0, 1].", rich_help_panel="Poisoning")] = "0,1",
    labels: Annotated[str, typer.Option("--labels", help="Comma-separated: random (the artifact encodes a random label), correlated (the true label), none (no label).", rich_help_panel="Poisoning")] = "random",
    data_root: DataRootOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", rich_help_panel="Runtime")] = 512,
    explain: Annotated[Optional[str], typer.Option("--explain", metavar="METHOD", help="Also measure how much the model looks at the artifact, per poison level: relevance mass in the artifact mask, top-quartile overlap and pointing game, with this attribution method (gradient, gradxinput, integrated-gradients, smoothgrad, lrp, gradcam).", rich_help_panel="Explanations")] = None,
    explain_items: Annotated[int, typer.Option("--explain-items", help="--explain: explain the first N items of the data at each level (0: all).", rich_help_panel="Explanations")] = 256,
    fragility: Annotated[Optional[float], typer.Option("--fragility", metavar="EPS", help="Also report R4's explanation fragility δ at this ε on the artifact mask, on the core and their ratio (interval bounds; Linear/Conv/ReLU/pool/BN networks).", rich_help_panel="Explanations")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write results.json, report.md and report.html into this folder.", rich_help_panel="Output")] = None,
    trust_checkpoint: TrustOpt = False,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    in_channels: InChannelsOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Accuracy on clean and poisoned data: per class, per group, macro- and worst-group, and the drops."""
    from .checkpoint import sha256_file
    from .data import parse_artifact
    from .evaluate import evaluate as run_evaluation
    from .report import results_document, write_run

    levels = _floats(poison, "--poison")
    if not levels:
        raise ModelfixError("--poison needs at least one level, e.g. 0,1")
    bad = [level for level in levels if not 0.0 <= level <= 1.0]
    if bad:
        raise ModelfixError(f"--poison levels must lie in [0, 1], got {bad[0]:g}")
    if batch_size < 1:
        raise ModelfixError(f"--batch-size must be at least 1, not {batch_size}")
    if fragility is not None:
        from .repair.guidance.pgd_ex import check_eps

        check_eps(fragility, "--fragility")
    if explain is not None:
        from .explain.attribution import check_method

        check_method(explain)
        if explain_items < 0:
            raise ModelfixError(f"--explain-items must be >= 0 (0 = all items), not {explain_items}")
    model, card = _load(model_path, trust_checkpoint, _device(device), arch, num_classes, in_channels, input_size, mean, std)
    spec = data or _default_test_split(card)
    dataset = _data(spec, data_root, seed, masks, class_names=card.class_names)
    _check_fits(dataset, card, spec)
    artifact_spec = artifact or card.artifact
    art = parse_artifact(artifact_spec) if artifact_spec else None
    modes = tuple(part.strip() for part in labels.split(",") if part.strip())
    evaluation = run_evaluation(model, dataset, art, levels=levels, labels=modes, seed=seed, batch_size=batch_size)
    results = results_document(
        "evaluate",
        {"path": str(model_path), "sha256": sha256_file(model_path), "arch": card.arch, "num_classes": card.num_classes},
        _data_info(spec, dataset),
        evaluation,
    )
    if explain is not None:
        results["reliance"] = _reliance(model, dataset, art, levels, modes, explain, explain_items, seed)
    if fragility is not None:
        from .fragility import fragility_of_test

        results["fragility"] = fragility_of_test(model, dataset, art, fragility, modes[0] if modes else "random", seed)
    if output_dir is not None:
        write_run(output_dir, results)
    if json_output:
        from .report import json_safe

        print(json.dumps(json_safe(results)))
    else:
        _print_levels(results)
        if output_dir is not None:
            err.print(f"wrote {output_dir / 'results.json'}, {output_dir / 'report.md'} and {output_dir / 'report.html'}")


def _reliance(model, dataset, artifact, levels, modes, method: str, items: int, seed: int) -> dict:
    """`evaluate --explain`: the artifact-reliance metrics per poison level on the first `items` items."""
    from .explain.attribution import attribute, default_composite, relevance_maps
    from .explain.reliance import reliance_by_level

    subset = dataset if items == 0 or items >= len(dataset) else dataset.subset(slice(0, items))
    composite = default_composite(model)

    def explainer(x, targets):
        return relevance_maps(attribute(model, x, targets, method=method, composite=composite))

    rows = reliance_by_level(model, subset, artifact, levels, modes, explainer, seed=seed, progress=True)
    return {"method": method, "composite": composite if method == "lrp" else None, "items": len(subset),
            "target": "true label", "levels": rows}


def _assessment(after, card, eval_data, data_root, seed, before=None) -> dict:
    """The before/after evidence of a repair report (`modelfix.assessment.assess`) on --eval-data, else on the test
    split of the model's scenario; a note instead when neither is known."""
    from .assessment import assess

    spec = eval_data or (_default_test_split(card) if (card.dataset or {}).get("scenario") else None)
    if spec is None:
        return {"evaluation_note": "no --eval-data and the model card names no scenario, so the report has no "
                                   "before/after metrics"}
    data = _data(spec, data_root, seed, class_names=card.class_names)
    _check_fits(data, card, spec)
    result = assess(after, data, card.artifact or data.info.get("artifact"), before=before, seed=seed)
    result["evaluation"]["spec"] = spec
    return result


def _default_test_split(card) -> str:
    scenario = (card.dataset or {}).get("scenario")
    if not scenario:
        raise ModelfixError("no --data given and the model card names no built-in scenario", hint="pass --data DIR")
    return f"{scenario}:test"


def _print_levels(results: dict) -> None:
    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}"

    table = Table(title=f"{results['model']['path']} on {results['data']['spec']} "
                        f"(artifact {results['settings']['artifact']})")
    for col in ("poison", "labels", "accuracy %", "macro-group %", "worst-group %", "worst group"):
        table.add_column(col, justify="right")
    has_f1 = "f1" in results["levels"][0]
    if has_f1:
        table.add_column("F1 %", justify="right")
    for row in results["levels"]:
        cells = [f"{row['level']:g}", row["labels"] or "–", pct(row["accuracy"]), pct(row["macro_group_accuracy"]),
                 pct(row["worst_group_accuracy"]), str(row["worst_group"])]
        table.add_row(*cells + ([pct(row["f1"])] if has_f1 else []))
    out.print(table)
    for drop in results["drops"]:
        out.print(f"drop {drop['from']:g} → {drop['to']:g} ({drop['labels']}): accuracy {pct(drop['accuracy'])} points, "
                  f"worst-group {pct(drop['worst_group_accuracy'])} points")
    reliance = results.get("reliance")
    if reliance:
        table = Table(title=f"artifact reliance ({reliance['method']}, first {reliance['items']} items)")
        for col in ("poison", "labels", "region", "items", "relevance mass %", "top-quartile recall %",
                    "top-quartile precision %", "pointing game %"):
            table.add_column(col, justify="right")
        for row in reliance["levels"]:
            table.add_row(f"{row['level']:g}", row["labels"] or "–", row.get("region", ""), str(row["n"]),
                          pct(row["relevance_mass"]), pct(row["top_quartile_recall"]),
                          pct(row["top_quartile_precision"]), pct(row["pointing_game"]))
        out.print(table)
    frag = results.get("fragility")
    if frag:
        out.print(f"fragility δ at ε {frag['eps']:g} ({frag['n']} items, {frag['source']}): masked {frag['masked']:.4g}, "
                  f"core {frag['core']:.4g}, ratio {frag['ratio']:.4g}")


@app.command("inspect")
@handles_errors
def inspect_cmd(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A .safetensors or .pt/.pth checkpoint.")],
    trust_checkpoint: TrustOpt = False,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    in_channels: InChannelsOpt = None,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Architecture, classes, input spec, layers with output shapes, repair history and patches."""
    from .inspect_model import describe

    model, card = _load(model_path, trust_checkpoint, "cpu", arch, num_classes, in_channels, input_size, mean, std)
    info = describe(model, card)
    if json_output:
        print(json.dumps(info, default=str))
        return
    out.print(f"[bold]{model_path}[/bold]: {card.arch}, {card.num_classes} classes {card.class_names}")
    out.print(f"input: {card.input.channels}×{card.input.height}×{card.input.width}, mean {card.input.mean}, "
              f"std {card.input.std}, range {card.input.value_range}")
    if card.artifact:
        out.print(f"trained with artifact: {card.artifact}")
    table = Table(title="layers (dry run)")
    for col in ("name", "type", "output shape", "params", "calls"):
        table.add_column(col)
    for layer in info["layers"]:
        table.add_row(layer["name"], layer["type"], str(layer.get("output_shape")), str(layer.get("params", "")),
                      str(layer.get("calls", "")))
    out.print(table)
    for entry in card.history:
        out.print(f"history: {entry.get('command')} {entry.get('method', '')} ({entry.get('timestamp', '')})")
    for patch in card.patches:
        out.print(f"patch: {patch}")


@app.command()
@handles_errors
def archs(json_output: JsonOpt = False) -> None:
    """List the architectures modelfix can build."""
    from .zoo import ARCHITECTURES

    rows = [{"name": name, "description": info.description, "source": info.source} for name, info in ARCHITECTURES.items()]
    if json_output:
        print(json.dumps(rows))
        return
    table = Table(title="architectures")
    for col in ("name", "description", "source"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["description"], row["source"])
    out.print(table)


@data_app.command("list")
@handles_errors
def data_list(json_output: JsonOpt = False) -> None:
    """List the built-in scenarios and their splits."""
    from .data import SCENARIOS

    rows = [{"name": name, "description": s.description, "splits": list(s.splits), "artifact": s.artifact,
             "needs_mnist": s.needs_mnist} for name, s in SCENARIOS.items()]
    if json_output:
        print(json.dumps(rows))
        return
    table = Table(title="scenarios")
    for col in ("name", "splits", "artifact", "needs MNIST", "description"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], ", ".join(row["splits"]), str(row["artifact"]), "yes" if row["needs_mnist"] else "no",
                      row["description"])
    out.print(table)


@data_app.command("make")
@handles_errors
def data_make(
    scenario: Annotated[str, typer.Argument(help="A built-in scenario (see `modelfix data list`).")],
    output_dir: Annotated[Path, typer.Option("-o", "--output", help="Folder to create; one sub-folder per split.")],
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Only these splits (repeatable).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="png or npy.")] = "png",
    data_root: DataRootOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Export a scenario to the folder format (images/<class>/, masks/<class>/), so users see what to bring."""
    from .data import SCENARIOS, load_scenario, save_folder
    from .data.sources import staged_folder

    if scenario not in SCENARIOS:
        raise ModelfixError(f"unknown scenario '{scenario}' (scenarios: {', '.join(SCENARIOS)})")
    if fmt not in ("png", "npy"):
        raise ModelfixError(f"--format must be png or npy, not '{fmt}'")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ModelfixError(f"-o {output_dir} exists and is not empty", hint="choose a new folder")
    splits = split or list(SCENARIOS[scenario].splits)
    unknown = [s for s in splits if s not in SCENARIOS[scenario].splits]
    if unknown:
        raise ModelfixError(f"scenario {scenario} has no split '{unknown[0]}' (splits: {', '.join(SCENARIOS[scenario].splits)})")
    counts = {}
    with staged_folder(output_dir) as staging:  # an error leaves nothing behind
        for name in splits:
            dataset = load_scenario(scenario, name, data_root=data_root, seed=seed)
            save_folder(dataset, staging / name, fmt=fmt)
            counts[name] = len(dataset)
    for name, n in counts.items():
        out.print(f"{output_dir / name}: {n} images")


@bench_app.command("evaluate")
@handles_errors
def bench_evaluate(
    arch: Annotated[str, typer.Option("--arch")] = "mlp",
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 20000,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 512,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repeats; the median is reported.")] = 5,
    levels: Annotated[str, typer.Option("--poison", help="Levels for the evaluate side (0 = same work as the bare loop).")] = "0",
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch threads (default: torch's choice).")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Evaluation throughput of `modelfix evaluate` against a bare torch loop over the same tensors."""
    from .bench.evaluate import run

    result = run(arch=arch, n=n, batch_size=batch_size, repeats=repeats, levels=_floats(levels, "--poison"), threads=threads)
    if json_output:
        print(json.dumps(result))
        return
    out.print(f"{result['arch']} on {result['n']} images {result['shape']}, batch {result['batch_size']}, "
              f"{result['threads']} threads, median of {result['repeats']}:")
    out.print(f"  bare torch loop : {result['bare_images_per_s']:.0f} images/s")
    out.print(f"  modelfix evaluate: {result['ours_images_per_s']:.0f} images/s")
    out.print(f"  ratio ours/bare : {result['ratio']:.3f}")


@bench_app.command("shortcut")
@handles_errors
def bench_shortcut(
    scenario: Annotated[str, typer.Option("--scenario")] = "decoy-mnist",
    arch: Annotated[str, typer.Option("--arch")] = "mlp",
    train_split: Annotated[str, typer.Option("--train-split")] = "train-full",
    restarts: Annotated[int, typer.Option("--restarts")] = 4,
    optimizer: Annotated[str, typer.Option("--optimizer")] = "adam",
    lr: Annotated[float, typer.Option("--lr")] = 0.01,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 1000,
    epochs: Annotated[int, typer.Option("--epochs")] = 30,
    data_root: DataRootOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """ERM restarts on a decoy scenario (defaults: R4's DecoyMNIST ERM settings); clean/contaminated/permuted."""
    from .bench.shortcut import run
    from .training import TrainConfig

    if restarts < 1:
        raise ModelfixError(f"--restarts must be at least 1, not {restarts}")
    config = TrainConfig(optimizer=optimizer, lr=lr, batch_size=batch_size, epochs=epochs)
    result = run(scenario, arch, train_split, restarts=restarts, config=config, data_root=data_root)
    if json_output:
        print(json.dumps(result))
        return
    table = Table(title=f"ERM {arch} on {scenario}:{train_split} ({result['n_train']} images), {restarts} restarts, "
                        f"{optimizer} lr {lr:g} batch {batch_size} × {epochs} epochs")
    for col in ("test", "accuracy %", "macro-group %", "± (restarts)", "worst-group % (min of means)"):
        table.add_column(col, justify="right")
    for name, row in result["summary"].items():
        table.add_row(name, f"{100 * row['accuracy']:.2f}", f"{100 * row['macro_group_accuracy']:.2f}",
                      f"{100 * row['macro_std_over_restarts']:.2f}", f"{100 * row['worst_group_accuracy']:.2f}")
    out.print(table)


@bench_app.command("egem-mnist")
@handles_errors
def bench_egem_mnist(
    arch: Annotated[str, typer.Option("--arch", help="egem-cnn (paper Table 1) or egem-cnn-ref (reference code).")] = "egem-cnn",
    runs: Annotated[int, typer.Option("--runs")] = 5,
    samples: Annotated[str, typer.Option("--samples-per-class", help="Comma-separated N for the full method table.")] = "700",
    sweep: Annotated[str, typer.Option("--sweep", help="Comma-separated N for the sample-size sweep (post-hoc methods).")] = "25,50,200,500",
    slacks: Annotated[str, typer.Option("--slack", help="Comma-separated slacks (the first one is used for the sweep).")] = "0.05,0.01",
    methods: Annotated[str, typer.Option("--methods")] = "original,egem,pca-egem,rgem,ridge,retrain",
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs of the original model.")] = 5,
    retrain_grid: Annotated[str, typer.Option("--retrain-grid", help="Retrain epoch grid.")] = "1,5,10,20,30,50,100",
    test_size: Annotated[int, typer.Option("--test-size")] = 1000,
    layers: Annotated[str, typer.Option("--layers", help="EGEM refinement points ('auto': the generic defaults).")] = "pool1,flatten,relu3",
    data_root: DataRootOpt = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the results as JSON here.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """The EGEM paper's modified-MNIST benchmark: clean vs 100 %-poisoned accuracy per method, mean ± std over runs."""
    from .bench.egem_mnist import METHODS, run
    from .report import json_safe, write_text_atomic

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ModelfixError(f"--methods: unknown method '{unknown[0]}' (one of {', '.join(METHODS)})")
    ints = lambda text, option: tuple(int(v) for v in _floats(text, option) or ())  # noqa: E731
    result = run(arch=arch, runs=runs, samples=ints(samples, "--samples-per-class"), sweep=ints(sweep, "--sweep"),
                 slacks=_floats(slacks, "--slack") or (0.05,), methods=chosen, epochs=epochs,
                 retrain_grid=ints(retrain_grid, "--retrain-grid"), test_size=test_size, data_root=data_root,
                 layers=None if layers == "auto" else layers)
    if output is not None:
        write_text_atomic(output, json.dumps(json_safe(result), indent=2) + "\n")
    if json_output:
        print(json.dumps(json_safe(result)))
        return
    table = Table(title=f"EGEM modified MNIST, {arch}, {runs} runs (mean ± std), {test_size} test images")
    for col in ("method", "N/class", "slack", "clean %", "100 % poisoned %", "gap", "chosen"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        clean, poisoned = row["clean"], row["poisoned"]
        chosen_value = next((f"{k} {row[k]}" for k in ("alpha", "lambda", "epochs") if k in row), "")
        table.add_row(row["method"], str(row["samples_per_class"]), f"{row['slack']:g}",
                      f"{100 * clean['mean']:.1f} ± {100 * clean['std']:.1f}",
                      f"{100 * poisoned['mean']:.1f} ± {100 * poisoned['std']:.1f}",
                      f"{100 * (clean['mean'] - poisoned['mean']):.1f}", chosen_value)
    out.print(table)
    for method, ratio in result["speed_ratio"].items():
        out.print(f"{method} end to end / one forward pass over the oversampled refinement set: "
                  f"{ratio['mean']:.2f} ± {ratio['std']:.2f}")


from . import cli_bench_guided, cli_crayon, cli_demo, cli_explain, cli_posthoc, cli_report, cli_train  # noqa: E402,F401  (register their commands on `app` / `bench`)
from . import cli_discover  # noqa: E402,F401  (registers discover and bench discover)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
