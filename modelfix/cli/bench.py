"""The first benchmarks: `bench evaluate`, `bench shortcut`, `bench egem-mnist`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..app.resolve import parse_floats
from ..bench import tables
from ..errors import ModelfixError
from .base import bench_app, handles_errors, out
from .options import DataRootOpt, JsonOpt


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
    from ..bench.evaluate import run

    result = run(arch=arch, n=n, batch_size=batch_size, repeats=repeats, levels=parse_floats(levels, "--poison"), threads=threads)
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
    from ..bench.shortcut import run
    from ..training import TrainConfig

    if restarts < 1:
        raise ModelfixError(f"--restarts must be at least 1, not {restarts}")
    config = TrainConfig(optimizer=optimizer, lr=lr, batch_size=batch_size, epochs=epochs)
    result = run(scenario, arch, train_split, restarts=restarts, config=config, data_root=data_root)
    if json_output:
        print(json.dumps(result))
        return
    out.print(*tables.shortcut(result, arch, scenario, train_split, restarts, config))


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
    from ..bench.egem_mnist import METHODS, run
    from ..report import json_safe, write_text_atomic

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ModelfixError(f"--methods: unknown method '{unknown[0]}' (one of {', '.join(METHODS)})")
    ints = lambda text, option: tuple(int(v) for v in parse_floats(text, option) or ())  # noqa: E731
    result = run(arch=arch, runs=runs, samples=ints(samples, "--samples-per-class"), sweep=ints(sweep, "--sweep"),
                 slacks=parse_floats(slacks, "--slack") or (0.05,), methods=chosen, epochs=epochs,
                 retrain_grid=ints(retrain_grid, "--retrain-grid"), test_size=test_size, data_root=data_root,
                 layers=None if layers == "auto" else layers)
    if output is not None:
        write_text_atomic(output, json.dumps(json_safe(result), indent=2) + "\n")
    if json_output:
        print(json.dumps(json_safe(result)))
        return
    out.print(*tables.egem_mnist(result, arch, runs, test_size), sep="\n")


@bench_app.command("memory", epilog="Example: modelfix bench memory --root runs/memory --sizes 2000,20000 --max-steps 20")
@handles_errors
def bench_memory(
    root: Annotated[Path, typer.Option("--root", help="Folder for the generated JPEGs, the resnet18 and the logs (reused).")],
    sizes: Annotated[str, typer.Option("--sizes", help="Comma-separated image counts.")] = "2000,20000",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Cap the fine-tune's steps (0: the whole epoch).")] = 20,
    workers: Annotated[int, typer.Option("--workers")] = 0,
    commands: Annotated[str, typer.Option("--commands")] = "evaluate,finetune-rrr",
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Stop a command after this many seconds (its row says so).")] = None,
    arch: Annotated[str, typer.Option("--arch")] = "resnet18",
) -> None:
    """Peak RSS of `evaluate` and a 1-epoch `finetune --method rrr` (resnet18 at 224) over folders of each size."""
    from ..bench.memory import run

    result = run(root, tuple(int(n) for n in parse_floats(sizes, "--sizes") or ()), batch_size, max_steps or None,
                 workers, tuple(c.strip() for c in commands.split(",")), timeout_s=timeout, arch=arch)
    print(json.dumps(result))
