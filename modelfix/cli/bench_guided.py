"""The guided fine-tune benchmarks (`bench tap-mnist`, `bench cost`, `bench scale`): parse options, call `modelfix.bench`, render.

Registered on the `bench` Typer app when `modelfix.cli` is imported; no algorithms live here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..app.resolve import device_name, parse_floats
from ..bench import tables
from ..errors import ModelfixError
from .base import bench_app, handles_errors, out
from .options import DataRootOpt, JsonOpt


def _names(text: str, option: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise ModelfixError(f"{option} needs at least one name")
    return names


def _one_or_list(text: str, option: str):
    values = list(parse_floats(text, option) or ())
    return values[0] if len(values) == 1 else values  # several: chosen on validation by the benchmark


def _case_values(text: str | None) -> dict:
    """'rbr=10,tap=1e-3' -> {"rbr": 10.0, "tap": 0.001}."""
    values = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        case, sep, value = part.partition("=")
        try:
            values[case.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ModelfixError(f"--lambda must look like case=value[,case=value], not '{part.strip()}'")
    return values


def _write_json(output: Path | None, result: dict, json_output: bool) -> bool:
    """Write/print the JSON result; True when the caller should stop (--json)."""
    from ..report import json_safe, write_text_atomic

    if output is not None:
        write_text_atomic(output, json.dumps(json_safe(result), indent=2) + "\n")
    if json_output:
        print(json.dumps(json_safe(result)))
    return json_output


@bench_app.command("tap-mnist", epilog="Example: modelfix bench tap-mnist --data-root ../shared/data --epochs 5 --train-size 20000")
@handles_errors
def bench_tap_mnist(
    scenario: Annotated[str, typer.Option("--scenario", help="A decoy scenario (decoy-mnist: the paper's; decoy-digits: no download).")] = "decoy-mnist",
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs per training run (paper: 50).")] = 5,
    train_size: Annotated[int, typer.Option("--train-size", help="Seeded subset of the training split (0: all of it; paper: 50000).")] = 5000,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per case (paper: 5).")] = 1,
    cases: Annotated[str, typer.Option("--cases", help="Comma-separated cases.")] = "base,no-xs,rrr,rbr,tap,tap-teacher-10,tap-teacher-1,tap-random",
    tau: Annotated[float, typer.Option("--tau", help="Teacher/random annotation fraction.")] = 0.01,
    teacher_epochs: Annotated[int, typer.Option("--teacher-epochs", help="0: as many SGD steps as a student.")] = 0,
    test_size: Annotated[int, typer.Option("--test-size", help="First N items of each test set (0: all).")] = 0,
    lambdas: Annotated[Optional[str], typer.Option("--lambda", help="Per-case penalty weights, e.g. rbr=10,tap=1e-3 (default: the paper's).")] = None,
    data_root: DataRootOpt = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the results as JSON here.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """The TAP paper's DecoyMNIST table (tap-cnn, SGD lr 1e-3 momentum 0.9, batch 256) at a budget you choose."""
    from ..bench.tap_mnist import run

    result = run(scenario=scenario, data_root=data_root, epochs=epochs, train_size=train_size or None, seeds=seeds,
                 cases=_names(cases, "--cases"), tau=tau, teacher_epochs=teacher_epochs or None,
                 test_size=test_size or None, lambdas=_case_values(lambdas))
    if _write_json(output, result, json_output):
        return
    out.print(*tables.tap_mnist(result, scenario), sep="\n")


@bench_app.command("cost", epilog="Example: modelfix bench cost --archs mlp,tap-cnn,resnet18 --repeats 10")
@handles_errors
def bench_cost(
    archs: Annotated[str, typer.Option("--archs", help="Comma-separated: mlp, tap-cnn, resnet18 (64×64).")] = "mlp,tap-cnn,resnet18",
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated guided methods (ERM is always measured).")] = "erm,erm-l2,tap,rrr,rbr,r4-cert,ibp-ex,ibp-ex-rrr,pgd-ex,smooth-rrr,r4-rand,r4-adv",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed steps per method (median reported).")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed rounds first.")] = 2,
    threads: Annotated[int, typer.Option("--threads", help="torch intra-op threads (0: leave as is).")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Override the per-arch batch (0: the defaults).")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the results as JSON here.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Step time and peak memory of each guided method relative to ERM, same model and batch, in one run."""
    from ..bench.cost import run

    result = run(archs=_names(archs, "--archs"), methods=_names(methods, "--methods"), repeats=repeats,
                 threads=threads or None, warmup=warmup, batch_size=batch_size or None, device=device_name(device))
    if _write_json(output, result, json_output):
        return
    out.print(*tables.cost(result), sep="\n")


@bench_app.command("crayon-mnist", epilog="Example: modelfix bench crayon-mnist --data-root ../shared/data --beta 3")
@handles_errors
def bench_crayon_mnist(
    scenario: Annotated[str, typer.Option("--scenario", help="A decoy scenario (decoy-mnist: the paper's; decoy-digits: no download).")] = "decoy-mnist",
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per method (paper: 5).")] = 1,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: original, train-more, crayon-attention, rrr, cnn-original, crayon-pruning, random-pruning.")] = "original,train-more,crayon-attention,rrr,cnn-original,crayon-pruning,random-pruning",
    original_epochs: Annotated[int, typer.Option("--original-epochs", help="Epochs of the original crayon-mlp (paper: 30).")] = 30,
    attention_epochs: Annotated[int, typer.Option("--attention-epochs", help="Fine-tune epochs of train-more, crayon-attention and rrr (paper: 200).")] = 10,
    beta: Annotated[str, typer.Option("--beta", help="CRAYON-ATTENTION's β (paper: 30); several: chosen on val-permuted.")] = "30",
    rrr_lam: Annotated[str, typer.Option("--rrr-lambda", help="RRR's λ; several: chosen on val-permuted.")] = "1e-6",
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="none, or exponential (the preprint's lr × 0.975 per epoch).")] = "none",
    crayon_loss: Annotated[str, typer.Option("--crayon-loss", help="preprint (raw sums) or normalized (the released code's).")] = "preprint",
    prune_arch: Annotated[str, typer.Option("--prune-arch", help="CNN for CRAYON-PRUNING.")] = "tap-cnn",
    prune_train_size: Annotated[int, typer.Option("--prune-train-size", help="Training subset of the CNN (0: all).")] = 5000,
    prune_epochs: Annotated[int, typer.Option("--prune-epochs", help="Epochs of the original CNN.")] = 5,
    train_size: Annotated[int, typer.Option("--train-size", help="Training subset of the mlp part (0: all).")] = 0,
    test_size: Annotated[int, typer.Option("--test-size", help="First N items of each test set (0: all).")] = 0,
    data_root: DataRootOpt = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the results as JSON here.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """CRAYON's DecoyMNIST table (crayon-mlp: Original, Train More, CRAYON-ATTENTION, RRR) and CRAYON-PRUNING vs
    Random Pruning on a CNN, with simulated feedback: accuracy and worst-group accuracy on the permuted test."""
    from ..bench.crayon_mnist import run

    result = run(scenario=scenario, data_root=data_root, seeds=seeds, train_size=train_size or None,
                 test_size=test_size or None, original_epochs=original_epochs, attention_epochs=attention_epochs,
                 beta=_one_or_list(beta, "--beta"), rrr_lam=_one_or_list(rrr_lam, "--rrr-lambda"),
                 prune_arch=prune_arch, prune_train_size=prune_train_size or None, prune_epochs=prune_epochs,
                 methods=_names(methods, "--methods"), lr_schedule=lr_schedule,
                 crayon_loss=crayon_loss)
    if _write_json(output, result, json_output):
        return
    out.print(*tables.crayon_mnist(result, scenario, seeds), sep="\n")


@bench_app.command("r4-mnist", epilog="Example: modelfix bench r4-mnist --data-root ../shared/data --methods erm,r4-cert")
@handles_errors
def bench_r4_mnist(
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: erm, erm-l2, rrr, smooth-rrr, ibp-ex, ibp-ex-rrr, pgd-ex, r4-rand, r4-adv, r4-cert.")] = "erm,erm-l2,rrr,smooth-rrr,ibp-ex,ibp-ex-rrr,pgd-ex,r4-rand,r4-adv,r4-cert",
    restarts: Annotated[int, typer.Option("--restarts", help="Restarts per method (paper: 4).")] = 4,
    epochs: Annotated[int, typer.Option("--epochs", help="Override every method's epochs (0: R4's table).")] = 0,
    train_size: Annotated[int, typer.Option("--train-size", help="Seeded subset of the 60k training images (0: all, as R4).")] = 0,
    test_size: Annotated[int, typer.Option("--test-size", help="First N items of each test set (0: all).")] = 0,
    lambdas: Annotated[Optional[str], typer.Option("--lambda", help="Per-method λ, e.g. rrr=1e-3 (methods with one: rrr, smooth-rrr, pgd-ex, r4-*; default: R4's).")] = None,
    lambda_grid: Annotated[Optional[list[str]], typer.Option("--lambda-grid", help="CASE=V1,V2,…: λ candidates chosen on val-permuted (repeatable), e.g. rrr=1e-4,1e-3,1e-2.")] = None,
    loss: Annotated[str, typer.Option("--loss", help="ce, or R4's double-softmax (CE of softmax outputs; for reproducing R4's table only).")] = "ce",
    tests: Annotated[str, typer.Option("--tests", help="Comma-separated test splits: permuted, contaminated, permuted-r4 (R4's recoloured permuted test).")] = "permuted,contaminated",
    threads: Annotated[int, typer.Option("--threads", help="torch intra-op threads (0: leave as is).")] = 0,
    data_root: DataRootOpt = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the results as JSON here.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """R4's DecoyMNIST table (mlp 784-512-10, ÷255, Adam, batch 1000, per-method settings from R4's table):
    macro-group and worst-group accuracy on the random-colour test and the fragility δ, for every mask method."""
    import torch

    from ..bench.r4_mnist import run

    if threads:
        torch.set_num_threads(threads)
    swept = "".join(f", {case} λ {value:g}" for case, value in _case_values(lambdas).items())
    table = tables.r4_table(f"decoy-mnist, mlp, {restarts} restart(s){swept}: ours (R4 paper); permuted test")

    def show(case, row):
        if not json_output:
            out.print("  ".join(tables.r4_row(case, row)))
        table.add_row(*tables.r4_row(case, row))

    grid = {case: list(parse_floats(values, "--lambda-grid") or ())
            for case, _, values in (item.partition("=") for item in lambda_grid or [])}
    result = run(data_root=data_root, cases=_names(methods, "--methods"), restarts=restarts, epochs=epochs or None,
                 train_size=train_size or None, test_size=test_size or None, on_case=show, lambdas=_case_values(lambdas),
                 loss=loss, tests=tuple(t.strip() for t in tests.split(",") if t.strip()), lambda_grid=grid or None)
    if _write_json(output, result, json_output):
        return
    out.print(table)
    out.print(f"{result['seconds'] / 60:.1f} min")


@bench_app.command("scale", epilog="Example: modelfix bench scale --methods erm,rrr,r4-cert --epochs 3")
@handles_errors
def bench_scale(
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated training methods.")] = "erm,rrr,r4-cert",
    processes: Annotated[str, typer.Option("--processes", help="Comma-separated process counts (gloo, 1 thread each).")] = "1,2",
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs per run; the first is not timed.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Items per process per step.")] = 128,
    arch: Annotated[str, typer.Option("--arch", help="The network trained (tap-cnn: compute-bound steps; mlp: tiny ones).")] = "tap-cnn",
    items: Annotated[int, typer.Option("--items", help="The first N items of decoy-digits:train.")] = 1024,
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each process count, taking turns; the median time.")] = 1,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the results as JSON here.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Training items/s of each method on 1 and on N processes (torch.distributed, as under torchrun)."""
    from ..bench.scale import run

    if not all(p.isdigit() for p in _names(processes, "--processes")):
        raise ModelfixError(f"--processes takes comma-separated whole numbers, not '{processes}'")
    worlds = tuple(int(p) for p in _names(processes, "--processes"))
    result = run(methods=_names(methods, "--methods"), worlds=worlds, epochs=epochs, batch_size=batch_size, arch=arch,
                 items=items, repeats=repeats)
    if _write_json(output, result, json_output):
        return
    out.print(*tables.scale(result, arch, epochs))


@bench_app.command("precision", epilog="Example: modelfix bench precision --repeats 5 --seeds 3 -o precision.json")
@handles_errors
def bench_precision(
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: erm, tap, rrr, r4-cert.")] = "erm,tap,rrr,r4-cert",
    batch_size: Annotated[int, typer.Option("--batch-size", help="resnet18 batch of the speed part.")] = 8,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed steps per method and precision (median; 0: accuracy only).")] = 5,
    seeds: Annotated[int, typer.Option("--seeds", help="Fine-tunes per method and precision (0: speed only).")] = 3,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the results as JSON here.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """bf16 (and fp16 on CUDA) against fp32, on the GPU if any: resnet18 step time and memory, the demo's fine-tunes."""
    from ..bench.precision import render, run
    result = run(_names(methods, "--methods"), repeats=repeats, seeds=seeds, batch_size=batch_size, device=device_name("auto"), threads=None)
    if not _write_json(output, result, json_output):
        out.print(render(result), highlight=False)
