"""`modelfix bench scale`: training throughput of ERM, RRR and Cert-R4 on 1 and on 2 processes.

Each configuration trains the same seeded net (default tap-cnn, whose steps take tenths of a second on one thread:
the compute a process saves dominates the one all-reduce it adds) on the first `items` items of decoy-digits:train
through `training.train` (the loop `finetune` runs) at `batch_size` items per process, in freshly spawned processes
with one torch thread each (OMP/MKL variables set before the spawn, `torch.set_num_threads(1)` in each); N > 1
processes form a gloo group exactly as under torchrun, so N processes at batch b take the steps of one at N·b
(docs/distributed.md). Every epoch but the first (allocations, first-call costs) is timed on rank 0 between the ends
of epochs, so a time includes waiting for the slowest process and the all-reduce. Reported: items per second and
the speed-up over one process, and the bytes each step all-reduces (the flat float32 gradient, 4 bytes per
parameter, plus one presence flag per parameter tensor and the loss terms: one message per step, whatever the
penalty). On a machine with fewer free cores than processes the processes share cores and the speed-up says so.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import time

import torch

from ..errors import ModelfixError

METHODS = ("erm", "rrr", "r4-cert")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, methods: tuple[str, ...], arch: str, items: int, epochs: int,
            batch_size: int, results) -> None:
    import torch.distributed as dist

    from ..card import ModelCard
    from ..data import load_data
    from ..repair.methods import make_objective
    from ..training import TrainConfig, train
    from ..zoo import build_model, default_input_spec

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = load_data("decoy-digits:train")
        data = data.subset(slice(0, min(items, len(data))))
        c, h, w = data.x.shape[1:]
        spec = dataclasses.replace(default_input_spec(arch), channels=c, height=h, width=w)
        card = ModelCard(arch=arch, num_classes=data.num_classes, input=spec)
        for method in methods:
            torch.manual_seed(0)
            model = build_model(card).train()
            ends: list[float] = []
            train(model, data, TrainConfig(epochs=epochs, batch_size=batch_size, seed=0),
                  make_objective(method, model), progress=False,
                  on_epoch_end=lambda epoch, net: ends.append(time.perf_counter()))
            if rank == 0:
                params = list(model.parameters())
                results.put((method, ends[-1] - ends[0], len(data), sum(p.numel() for p in params), len(params),
                             torch.get_num_threads()))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(methods: tuple[str, ...] = METHODS, worlds: tuple[int, ...] = (1, 2), epochs: int = 3,
        batch_size: int = 128, arch: str = "tap-cnn", items: int = 1024, repeats: int = 1) -> dict:
    """Items per second of each method at each number of processes (module docstring); `epochs` counts the
    untimed first epoch. With `repeats` > 1 the process counts take turns (1, 2, 1, 2, …) and each time is the
    median of its repeats, so a machine whose load drifts slows both alike."""
    from ..repair.methods import get_method
    from ..zoo import get_arch

    for method in methods:  # an unknown name is one error, before any process starts
        if get_method(method).kind != "finetune" or get_method(method).build is None:
            raise ModelfixError(f"bench scale measures training objectives; '{method}' is not one",
                                hint="e.g. erm, rrr, r4-cert")
    get_arch(arch)
    if epochs < 2 or batch_size < 1 or items < 1 or repeats < 1 or not worlds or min(worlds) < 1:
        raise ModelfixError("--epochs must be at least 2 (the first is not timed); --batch-size, --items, --repeats "
                            "and every --processes value at least 1")
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # inherited by the spawned processes
    times: dict[tuple[str, int], list[float]] = {}
    count = params = tensors = 0
    threads = set()
    for _ in range(repeats):
        for world in worlds:
            results = torch.multiprocessing.get_context("spawn").SimpleQueue()
            torch.multiprocessing.spawn(_worker, args=(world, _free_port(), tuple(methods), arch, items, epochs,
                                                       batch_size, results), nprocs=world)
            while not results.empty():
                method, took, count, params, tensors, used = results.get()
                times.setdefault((method, world), []).append(took)
                threads.add(used)
    seconds = {key: statistics.median(values) for key, values in times.items()}
    timed = epochs - 1
    rows = []
    for method in methods:
        for world in worlds:
            took = seconds[(method, world)]
            rate = timed * count / took
            base = timed * count / seconds[(method, worlds[0])]
            rows.append({"method": method, "processes": world, "batch_per_process": batch_size,
                         "global_batch": batch_size * world, "seconds": took, "items_per_s": rate,
                         "step_ms": 1000 * took / (timed * -(-count // (batch_size * world))), "speedup": rate / base})
    return {"schema": "modelfix.bench-scale/v1", "data": "decoy-digits:train", "items": count, "arch": arch,
            "parameters": params, "allreduce_bytes_per_step": 4 * (params + tensors),  # + 4 per loss term
            "epochs": epochs, "timed_epochs": timed, "repeats": repeats, "threads_per_process": sorted(threads),
            "backend": "gloo",
            "rows": rows}
