"""`modelfix bench cost`: time and peak memory of one training step per guided fine-tune, relative to ERM.

One step = `zero_grad` + the method's objective (forward, loss, penalty) + backward + optimiser step (Adam, as in
methods_guided_finetunes.md §5), with model and batch in the memory layout `training.train` uses
(`training_layout`: channels-last on conv nets without BatchNorm). Every method gets its own copy of the same
freshly initialised model and the same random batch (pixels U(0, 1), random labels, a 4×4 top-left mask on every
image). Methods are timed in interleaved rounds (one step of each method per round, after `warmup` rounds) so that
drift of a shared, noisy CPU hits every method alike; the reported time is the median over the timed rounds.
`retrain` is not measured: its step is an ERM step (it only changes optimiser settings). Each method first takes
one untimed step (optimiser state is allocated there); a method that fails on an arch (TAP without conv feature
maps, RBR's third-order pass through a train-mode BatchNorm) is reported with its error instead of numbers.

Peak memory of one step, after the timed rounds, in a separate profiled step:
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, taken right after `zero_grad`;
- CPU: torch keeps no allocator statistics on the CPU, so the step runs under `torch.profiler` with
  `profile_memory=True`; its allocation events carry the running total of bytes allocated *during* the profiled
  window (the CPU allocator's profiling reporter), whose maximum is the step's transient peak. The bytes already
  held when the step starts (parameters, buffers, optimiser state, the batch) are added, so both devices report
  "tensor memory held at the step's peak". This counts torch tensors only (no interpreter or library overhead).
`extra_mb` is the transient part alone (activations, double-backprop graphs, gradients).

Targets from the issues: TAP ≤ 1.1× ERM time and memory, RRR ≤ 3.2×, RBR ≤ 6×; Cert-R4 ≤ 4× and IBP-Ex ≤ 2.5× ERM
step time (R4's and Heo's claims; no memory target). The sampling and PGD methods have no target; their cost grows
with n or K, so they are also reported per sample (Rand-R4, Smooth-RRR: ratio / n) and per PGD step (Adv-R4,
PGD-Ex: ratio / K), at their registry defaults. Reported as measured.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time

import torch
from torch import nn

from ..card import ModelCard
from ..errors import ModelfixError
from ..repair.methods import get_method, make_objective
from ..training import training_layout
from ..zoo import build_model, default_input_spec

METHODS = ("erm", "erm-l2", "tap", "rrr", "rbr", "r4-cert", "ibp-ex", "ibp-ex-rrr", "pgd-ex", "smooth-rrr", "r4-rand",
           "r4-adv")
# arch -> (channels, height, width, batch size)
ARCHS = {"mlp": (1, 28, 28, 256), "tap-cnn": (1, 28, 28, 64), "resnet18": (3, 64, 64, 16)}
# method -> (time target, memory target or None), both as ratios to ERM
TARGETS = {"tap": (1.1, 1.1), "rrr": (3.2, 3.2), "rbr": (6.0, 6.0), "r4-cert": (4.0, None), "ibp-ex": (2.5, None)}
# method -> the hyper-parameter the cost scales with (reported per unit)
PER_UNIT = {"r4-rand": ("samples", "sample"), "smooth-rrr": ("samples", "sample"), "r4-adv": ("steps", "PGD step"),
            "pgd-ex": ("steps", "PGD step")}
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated over one step (reset after zero_grad)",
    "cpu": "torch.profiler(profile_memory=True): max running total of bytes allocated during one step, plus the "
           "bytes of parameters, buffers, optimiser state and batch held at its start (torch tensors only)",
}


def _model(arch: str, device: torch.device) -> nn.Module:
    c, h, w, _ = ARCHS[arch]
    spec = dataclasses.replace(default_input_spec(arch), channels=c, height=h, width=w)
    return build_model(ModelCard(arch=arch, num_classes=10, input=spec)).to(device).train()


def _batch(arch: str, batch_size: int, device: torch.device, seed: int = 0) -> dict:
    c, h, w, _ = ARCHS[arch]
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, 1, h, w)
    mask[:, :, :4, :4] = 1.0
    batch = {"x": torch.rand(batch_size, c, h, w, generator=gen),
             "y": torch.randint(0, 10, (batch_size,), generator=gen), "mask": mask,
             "has_mask": torch.ones(batch_size, dtype=torch.bool),
             "group": torch.zeros(batch_size, dtype=torch.long), "index": torch.arange(batch_size)}
    return {k: v.to(device) for k, v in batch.items()}


class _Runner:
    """One method's model copy, objective and optimiser; `step()` is one full training step."""

    def __init__(self, name: str, model: nn.Module, batch: dict):
        self.model = model
        self.objective = make_objective(name, model)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.batch = batch

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.objective(self.model, self.batch)
        loss.backward()
        self.optimizer.step()

    def held_bytes(self) -> int:
        """Bytes of the tensors alive between steps: parameters, buffers, optimiser state and the batch."""
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + list(self.batch.values())
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        seen, total = set(), 0
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_transient_peak(runner: _Runner) -> int:
    """Max running total of bytes allocated during one step (zero_grad done before the window opens, so no
    tensor from before the window is freed inside it)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # else kineto prints profiler_start/stop lines on stderr
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    runner.optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = runner.objective(runner.model, runner.batch)
        loss.backward()
        runner.optimizer.step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
            fields = node.extra_fields
            events.append((node.start_time_ns, int(fields.alloc_size), int(fields.total_allocated)))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    # The reporter's running total carries over bytes it saw allocated in earlier profiled windows and freed
    # outside them; the total just before the first event of this window is that offset.
    offset = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - offset


def _peak_bytes(runner: _Runner, device: torch.device) -> tuple[int, int]:
    """(peak bytes held during one step, transient bytes above what was held at its start)."""
    held = runner.held_bytes()
    if device.type == "cuda":
        runner.optimizer.zero_grad(set_to_none=True)
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss, _ = runner.objective(runner.model, runner.batch)
        loss.backward()
        runner.optimizer.step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak, peak - start
    extra = _cpu_transient_peak(runner)
    return held + extra, extra


def run(archs=("mlp", "tap-cnn", "resnet18"), methods=METHODS, repeats: int = 10, threads: int | None = 1,
        warmup: int = 2, batch_size: int | None = None, device: str = "auto") -> dict:
    """Per arch: rows {method, step_ms, ratio_time, peak_mb, ratio_mem, extra_mb, meets_target} (ratios to ERM;
    ERM is always measured). A method that cannot run on an arch gets a row with `error` instead of numbers.
    `batch_size` overrides the per-arch batch (for smoke tests); `threads` sets torch's intra-op threads for the
    run (None: leave as is); `device` "auto" is CUDA when available."""
    for arch in archs:
        if arch not in ARCHS:
            raise ModelfixError(f"--archs: unknown arch '{arch}' (one of {', '.join(ARCHS)})")
    for name in methods:
        if name not in METHODS:
            hint = "retrain's step is an ERM step" if name == "retrain" else None
            raise ModelfixError(f"--methods: unknown method '{name}' (one of {', '.join(METHODS)})", hint=hint)
    methods = tuple(dict.fromkeys(["erm", *methods]))
    if repeats < 1:
        raise ModelfixError(f"--repeats must be at least 1, not {repeats}")
    if warmup < 0:
        raise ModelfixError(f"--warmup must be >= 0, not {warmup}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        results = {}
        for arch in archs:
            results[arch] = _run_arch(arch, methods, repeats, warmup, batch_size or ARCHS[arch][3], dev)
    finally:
        torch.set_num_threads(old_threads)
    return {"device": str(dev), "threads": torch.get_num_threads() if threads is None else int(threads),
            "repeats": repeats, "warmup": warmup, "optimizer": "adam", "timing": "median over interleaved rounds",
            "memory": MEMORY_METHOD[dev.type], "targets": TARGETS, "torch": torch.__version__,
            "note": "retrain is not measured: its step is an ERM step", "archs": results}


def _run_arch(arch: str, methods: tuple, repeats: int, warmup: int, batch_size: int, dev: torch.device) -> dict:
    torch.manual_seed(0)
    base = _model(arch, dev)
    batch = _batch(arch, batch_size, dev)
    layout = training_layout(base)  # the step as `training.train` runs it
    base.to(memory_format=layout)
    batch["x"] = batch["x"].to(memory_format=layout)
    runners, rows = {}, {}
    for name in methods:
        try:
            runners[name] = _Runner(name, copy.deepcopy(base), batch)
        except ModelfixError as exc:  # e.g. TAP on a net without conv feature maps
            rows[name] = {"method": name, "error": str(exc)}
    for name in list(runners):  # one untimed first step: allocates optimiser state, surfaces failures
        try:
            runners[name].step()
        except (ModelfixError, RuntimeError) as exc:  # e.g. RBR's third-order pass through train-mode BatchNorm
            rows[name] = {"method": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            del runners[name]
    if "erm" not in runners:
        raise ModelfixError(f"bench cost: the ERM step fails on {arch}: {rows['erm']['error']}")
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(warmup + repeats):
        for name, runner in runners.items():
            _sync(dev)
            start = time.perf_counter()
            runner.step()
            _sync(dev)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    for name, runner in runners.items():
        peak, extra = _peak_bytes(runner, dev)
        rows[name] = {"method": name, "step_ms": 1000 * statistics.median(times[name]),
                      "step_ms_min": 1000 * min(times[name]), "peak_mb": peak / 2**20, "extra_mb": extra / 2**20}
    erm = rows["erm"]
    for name in methods:
        row = rows[name]
        if "error" in row:
            continue
        row["ratio_time"] = row["step_ms"] / erm["step_ms"]
        row["ratio_mem"] = row["peak_mb"] / erm["peak_mb"]
        row["ratio_extra_mem"] = row["extra_mb"] / erm["extra_mb"] if erm["extra_mb"] > 0 else float("nan")
        if name in TARGETS:
            time_target, mem_target = TARGETS[name]
            row["target"], row["memory_target"] = time_target, mem_target
            row["meets_target"] = bool(row["ratio_time"] <= time_target
                                       and (mem_target is None or row["ratio_mem"] <= mem_target))
        if name in PER_UNIT:
            key, unit = PER_UNIT[name]
            count = get_method(name).hyperparameters[key]
            row["per_unit"] = {"unit": unit, "count": count, "ratio_time": row["ratio_time"] / count}
    c, h, w, _ = ARCHS[arch]
    return {"input": [c, h, w], "batch_size": batch_size,
            "parameters": sum(p.numel() for p in base.parameters()), "rows": [rows[name] for name in methods]}
