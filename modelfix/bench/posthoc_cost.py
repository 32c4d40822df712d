"""A post-hoc repair command end to end, in plain forward passes over its refinement set (issue 19's unit).

`run` times `modelfix COMMAND MODEL --clean-dir CLEAN -o OUT ...` invoked in this process (option parsing, loading
the checkpoint and the clean pool, refinement split, statistics, selection, fold, checksum and save: everything the
command does) against one plain forward pass (`evaluate.predict`, the package's inference path) over the
oversampled refinement set the command uses (fit + validation parts, `RefinementSplit.expanded`). The two are
alternated (command, forward, command, forward, …) so that the drift of a shared CPU hits both alike; the ratio of
the medians is reported, and the first command run (which also pays one-off imports) separately.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch


def _refinement_inputs(model_path: Path, clean: str, samples_per_class: int, keep_incorrect: bool, seed: int,
                       batch_size: int):
    """(model, x of the oversampled refinement set): the split the command itself draws (same pool, N and seed)."""
    from modelfix.app import resolve
    from modelfix.repair.refinement import split_for_repair

    model, card = resolve.load_checkpoint(model_path, False, "cpu")
    pool = resolve.load_dataset(clean, seed=seed, card=card)
    split = split_for_repair(model, pool, samples_per_class, keep_incorrect=keep_incorrect, seed=seed,
                             batch_size=batch_size)
    return model, torch.cat([split.expanded("fit").x, split.expanded("val").x])


def run(model_path: str | Path, clean: str, command: str = "prune-egem", extra: tuple[str, ...] = (),
        samples_per_class: int = 700, keep_incorrect: bool = False, repeats: int = 3, seed: int = 0,
        batch_size: int = 256) -> dict:
    """{command, ratio (median command / median forward), first_ratio, command_s, forward_s, items}: see the module
    docstring. `extra`: more command-line options (e.g. `("--method", "rgem")` for refit)."""
    from modelfix.cli import app
    from modelfix.evaluate import predict

    model, x = _refinement_inputs(Path(model_path), clean, samples_per_class, keep_incorrect, seed, batch_size)
    with tempfile.TemporaryDirectory() as folder:
        args = [command, str(model_path), "--clean-dir", clean, "-o", str(Path(folder) / "out.safetensors"),
                "--overwrite", "--samples-per-class", str(samples_per_class), "--seed", str(seed),
                "--batch-size", str(batch_size), *(["--keep-incorrect"] if keep_incorrect else []), *extra]
        commands, forwards = [], []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            try:
                app(args, standalone_mode=False)
            except SystemExit as exc:  # a failing command must not be timed as a fast one
                if exc.code:
                    raise
            commands.append(time.perf_counter() - start)
            start = time.perf_counter()
            predict(model, x, batch_size)
            forwards.append(time.perf_counter() - start)
    command_s, forward_s = statistics.median(commands[1:]), statistics.median(forwards)
    return {"command": " ".join(args[:1] + ["MODEL"] + args[2:]), "items": len(x), "repeats": repeats,
            "ratio": command_s / forward_s, "first_ratio": commands[0] / forward_s, "command_s": commands,
            "forward_s": forwards, "threads": torch.get_num_threads()}
