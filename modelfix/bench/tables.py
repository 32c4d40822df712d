"""The benchmarks' results as rich tables for the terminal (`modelfix bench …` prints them; `--json` does not).

One function per benchmark, each taking the result dict its `run` returns and returning what to print, in order
(tables and lines of text), so the CLI only parses options, calls `run` and prints.
"""

from __future__ import annotations

from rich.table import Table


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    return table


def shortcut(result: dict, arch: str, scenario: str, train_split: str, restarts: int, config) -> list:
    table = _table(f"ERM {arch} on {scenario}:{train_split} ({result['n_train']} images), {restarts} restarts, "
                   f"{config.optimizer} lr {config.lr:g} batch {config.batch_size} × {config.epochs} epochs",
                   ("test", "accuracy %", "macro-group %", "± (restarts)", "worst-group % (min of means)"))
    for name, row in result["summary"].items():
        table.add_row(name, f"{100 * row['accuracy']:.2f}", f"{100 * row['macro_group_accuracy']:.2f}",
                      f"{100 * row['macro_std_over_restarts']:.2f}", f"{100 * row['worst_group_accuracy']:.2f}")
    return [table]


def egem_mnist(result: dict, arch: str, runs: int, test_size: int) -> list:
    table = _table(f"EGEM modified MNIST, {arch}, {runs} runs (mean ± std), {test_size} test images",
                   ("method", "N/class", "slack", "clean %", "100 % poisoned %", "gap", "chosen"))
    for row in result["rows"]:
        clean, poisoned = row["clean"], row["poisoned"]
        chosen_value = next((f"{k} {row[k]}" for k in ("alpha", "lambda", "epochs") if k in row), "")
        table.add_row(row["method"], str(row["samples_per_class"]), f"{row['slack']:g}",
                      f"{100 * clean['mean']:.1f} ± {100 * clean['std']:.1f}",
                      f"{100 * poisoned['mean']:.1f} ± {100 * poisoned['std']:.1f}",
                      f"{100 * (clean['mean'] - poisoned['mean']):.1f}", chosen_value)
    return [table] + [f"{method} end to end / one forward pass over the oversampled refinement set: "
                      f"{ratio['mean']:.2f} ± {ratio['std']:.2f}" for method, ratio in result["speed_ratio"].items()]


def tap_mnist(result: dict, scenario: str) -> list:
    s = result["settings"]
    table = _table(f"{scenario}, tap-cnn, {s['epochs']} epochs × {s['train_size']} images "
                   f"({s['student_steps']} SGD steps), {s['seeds']} seed(s): ours (paper, 50 epochs × 50k)",
                   ("case", "contaminated", "permuted", "clean", "Δ perm − cont"))
    for case, row in result["cases"].items():
        def cell(name):
            mine, paper = row[name], row["paper"][name][0]
            return f"{mine['mean']:.3f} ± {mine['std']:.3f} ({paper:.3f})"
        failed = f" [{row['failed']} failed]" if row["failed"] else ""
        table.add_row(case + failed, cell("contaminated"), cell("permuted"), cell("clean"),
                      f"{row['delta']['mean']:+.3f}")
    teachers = [f"{key}: {t['n']} clean images, {t['epochs']} epochs, clean accuracy "
                f"{t['accuracy_clean']['mean']:.3f} (paper {t['paper_accuracy_clean']:.3f})"
                for key, t in result["teachers"].items()]
    return [table, *teachers, f"{result['seconds'] / 60:.1f} min"]


def cost(result: dict) -> list:
    parts = []
    for arch, block in result["archs"].items():
        c, h, w = block["input"]
        table = _table(f"{arch} {c}×{h}×{w}, batch {block['batch_size']}, {result['device']}, "
                       f"{result['threads']} thread(s), median of {result['repeats']} steps",
                       ("method", "step ms", "× ERM time", "peak MB", "× ERM memory", "target / per unit", "met"))
        for row in block["rows"]:
            if "error" in row:
                table.add_row(row["method"], "–", "–", "–", "–", "–", row["error"][:60])
                continue
            target, unit = row.get("target"), row.get("per_unit")
            goal = (f"time ≤ {target:g}" + (f", memory ≤ {row['memory_target']:g}" if row.get("memory_target") else "")
                    if target else f"{unit['ratio_time']:.2f} per {unit['unit']} ({unit['count']})" if unit else "")
            table.add_row(row["method"], f"{row['step_ms']:.1f}", f"{row['ratio_time']:.2f}", f"{row['peak_mb']:.1f}",
                          f"{row['ratio_mem']:.2f}", goal, ("yes" if row["meets_target"] else "no") if target else "")
        parts.append(table)
    return parts + [f"memory: {result['memory']}"]


def crayon_mnist(result: dict, scenario: str, seeds: int) -> list:
    table = _table(f"{scenario}: permuted test (paper: one DecoyMNIST accuracy per method), {seeds} seed(s)",
                   ("method", "permuted acc", "permuted worst group", "contaminated acc", "#FB", "paper"))
    for name, row in result["methods"].items():
        paper = row.get("paper_accuracy")
        table.add_row(name, f"{row['permuted']['accuracy']['mean']:.3f}",
                      f"{row['permuted']['worst_group_accuracy']['mean']:.3f}",
                      f"{row['contaminated']['accuracy']['mean']:.3f}", f"{row['fb']['mean']:g}",
                      "–" if paper is None else f"{paper:.3f}")
    return [table, f"{result['seconds'] / 60:.1f} min"]


def r4_table(title: str) -> Table:
    """The empty R4 table; `r4_row` fills it one method at a time as the benchmark finishes them."""
    return _table(title, ("method", "macro-group %", "worst-group %", "δ masked", "δ ratio", "contaminated %",
                          "s/epoch"))


def r4_row(case: str, row: dict) -> tuple[str, ...]:
    paper = row["paper"] or {}
    perm = row["permuted"]

    def pct(value, ref):
        return f"{100 * value:.2f}" + (f" ({ref:.2f})" if ref is not None else "")

    return (case, pct(perm["macro_group_accuracy"], paper.get("macro")), pct(perm["worst_group_accuracy"], paper.get("worst")),
            f"{row['delta_masked']:.3g}" + (f" ({paper['delta_masked']:g})" if paper else ""),
            f"{row['delta_ratio']:.3g}" + (f" ({paper['ratio']:g})" if paper else ""),
            f"{100 * row['contaminated']['macro_group_accuracy']:.2f}", f"{row['seconds_per_epoch']:.1f}")


def scale(result: dict, arch: str, epochs: int) -> list:
    table = _table(f"{arch} on {result['data']} ({result['items']} items × {epochs - 1} timed epochs), gloo, "
                   f"1 thread each, {result['allreduce_bytes_per_step'] / 1e6:.2f} MB all-reduced per step",
                   ("method", "processes", "global batch", "ms/step", "items/s", "speed-up"))
    for row in result["rows"]:
        table.add_row(row["method"], str(row["processes"]), str(row["global_batch"]), f"{row['step_ms']:.0f}",
                      f"{row['items_per_s']:.0f}", f"{row['speedup']:.2f}")
    return [table]
