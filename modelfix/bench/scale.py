"""`modelfix bench scale`: training throughput of ERM, RRR and Cert-R4 on 1 and on 2 processes.

Each configuration trains the same seeded mlp on decoy-digits:train through `training.train` (the loop `finetune`
runs) for `epochs` epochs at `batch_size` items per process, in freshly spawned processes with one torch thread
each; N > 1 processes form a gloo group exactly as under torchrun, so N processes at batch b take the steps of one
at N·b (docs/distributed.md). Reported: the training loop's wall time on rank 0 (process start, imports and data
loading excluded), items per second (epochs × items ÷ time) and the speed-up over one process. On a machine with
fewer free cores than processes the processes share cores and the speed-up says so.
"""

from __future__ import annotations

import dataclasses
import socket

import torch

from ..errors import ModelfixError

METHODS = ("erm", "rrr", "r4-cert")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, methods: tuple[str, ...], epochs: int, batch_size: int,
            results) -> None:
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
        c, h, w = data.x.shape[1:]
        spec = dataclasses.replace(default_input_spec("mlp"), channels=c, height=h, width=w)
        card = ModelCard(arch="mlp", num_classes=data.num_classes, input=spec)
        for method in methods:
            torch.manual_seed(0)
            model = build_model(card).train()
            run = train(model, data, TrainConfig(epochs=epochs, batch_size=batch_size, seed=0),
                        make_objective(method, model), progress=False)
            if rank == 0:
                results.put((method, run.seconds, len(data)))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(methods: tuple[str, ...] = METHODS, worlds: tuple[int, ...] = (1, 2), epochs: int = 1,
        batch_size: int = 64) -> dict:
    """Items per second of each method at each number of processes (module docstring)."""
    from ..repair.methods import get_method

    for method in methods:  # an unknown name is one error, before any process starts
        if get_method(method).kind != "finetune" or get_method(method).build is None:
            raise ModelfixError(f"bench scale measures training objectives; '{method}' is not one",
                                hint="e.g. erm, rrr, r4-cert")
    if epochs < 1 or batch_size < 1 or not worlds or min(worlds) < 1:
        raise ModelfixError("--epochs, --batch-size and every --processes value must be at least 1")
    seconds: dict[tuple[str, int], float] = {}
    items = 0
    for world in worlds:
        results = torch.multiprocessing.get_context("spawn").SimpleQueue()
        torch.multiprocessing.spawn(_worker, args=(world, _free_port(), tuple(methods), epochs, batch_size, results),
                                    nprocs=world)
        while not results.empty():
            method, took, items = results.get()
            seconds[(method, world)] = took
    rows = []
    for method in methods:
        for world in worlds:
            took = seconds[(method, world)]
            rate = epochs * items / took
            base = epochs * items / seconds[(method, worlds[0])]
            rows.append({"method": method, "processes": world, "batch_per_process": batch_size,
                         "global_batch": batch_size * world, "seconds": took, "items_per_s": rate,
                         "speedup": rate / base})
    return {"schema": "modelfix.bench-scale/v1", "data": "decoy-digits:train", "items": items, "arch": "mlp",
            "epochs": epochs, "threads_per_process": 1, "backend": "gloo", "rows": rows}
