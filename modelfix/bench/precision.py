"""`modelfix bench precision`: what bf16 autocast saves and changes against fp32 (docs/benchmarks.md, issue 14,
"Mixed precision").

1. Speed and memory. One training step (zero_grad, the objective under `precision.autocast`, backward, Adam step) of
   each method on torchvision resnet18 at 3×224×224 (random init, a random batch, a 32×32 top-left mask on every
   image), once per precision, each (method, precision) with its own copy of the same model. Method by method, the
   precisions' steps are timed in interleaved rounds (one step of each per round, after `warmup` rounds) so that
   the drift of a shared CPU hits them alike; the median over rounds is reported, and bf16 / fp32 per method. Peak memory: tensor bytes
   held at the step's peak (as `bench cost`: on CPU the profiler's running total of bytes allocated during one
   step plus what is held at its start; on CUDA `max_memory_allocated`).
2. Accuracy. The demo's shortcut model (`modelfix demo`: egem-cnn trained with fp32 ERM on tagged-digits, where it
   takes the tag as "8"), then per seed, method and precision a short fine-tune of it through `training.train` with
   the demo's settings (`demo.FINETUNES`: λ, optimiser, batch; ERM: Adam lr 1e-3, batch 32) and `epochs` epochs,
   on the training split with the tag's region as every image's mask, scored by `demo.measure` (test accuracy clean
   and with the tag pasted on every image, and the gap). Mean and standard deviation over seeds: the question is
   whether bf16 moves accuracy beyond the seed-to-seed spread.
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
from ..precision import autocast, check_precision
from ..repair.methods import get_method, make_objective
from ..training import TrainConfig, train
from ..zoo import build_model, default_input_spec

METHODS = ("erm", "tap", "rrr", "r4-cert")


def _batch(batch_size: int, size: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch_size, 1, size, size)
    mask[:, :, :32, :32] = 1.0
    batch = {"x": torch.rand(batch_size, 3, size, size, generator=gen),
             "y": torch.randint(0, 10, (batch_size,), generator=gen), "mask": mask,
             "has_mask": torch.ones(batch_size, dtype=torch.bool), "group": torch.zeros(batch_size, dtype=torch.long),
             "index": torch.arange(batch_size)}
    return {k: v.to(device) for k, v in batch.items()}


class Stepper:
    """One (method, precision): a model copy, its objective and Adam; `step()` is one training step."""

    def __init__(self, method: str, precision: str, model: nn.Module, batch: dict, device: torch.device):
        self.model, self.batch, self.precision, self.device = model, batch, precision, device
        self.objective = make_objective(method, model)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def forward_backward(self) -> None:
        with autocast(self.precision, self.device):
            loss, _ = self.objective(self.model, self.batch)
        loss.backward()
        self.optimizer.step()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward()

    def held_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + list(self.batch.values())
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def peak_bytes(self) -> int:
        """Tensor bytes held at the peak of one step (module docstring)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.forward_backward()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        os.environ.setdefault("KINETO_LOG_LEVEL", "99")
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        held = self.held_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.forward_backward()
        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu"):
                events.append((node.start_time_ns, int(node.extra_fields.alloc_size),
                               int(node.extra_fields.total_allocated)))
            stack.extend(node.children)
        if not events:
            return held
        events.sort()
        offset = events[0][2] - events[0][1]  # the running total carries bytes from earlier windows
        return held + max(total for _, _, total in events) - offset


def speed(methods=METHODS, precisions=("fp32", "bf16"), batch_size: int = 8, size: int = 224, repeats: int = 5,
          warmup: int = 1, device: torch.device = torch.device("cpu")) -> list[dict]:
    """Rows {method, precision, step_ms, peak_mb, time_vs_fp32, memory_vs_fp32} (module docstring, part 1). One
    method at a time, its precisions interleaved: only that method's model copies are held (the CPU's memory is
    shared), and the ratio to fp32 compares steps taken side by side."""
    torch.manual_seed(0)
    spec = dataclasses.replace(default_input_spec("resnet18"), height=size, width=size)
    base = build_model(ModelCard(arch="resnet18", num_classes=10, input=spec)).to(device).train()
    batch = _batch(batch_size, size, device)
    rows = []
    for method in methods:
        steppers = {p: Stepper(method, p, copy.deepcopy(base), batch, device) for p in precisions}
        times: dict = {p: [] for p in precisions}
        for round_ in range(warmup + repeats):
            for precision, stepper in steppers.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                stepper.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_ >= warmup:
                    times[precision].append(time.perf_counter() - start)
        mine = [{"method": method, "precision": p, "step_ms": 1000 * statistics.median(times[p]),
                 "step_ms_all": [1000 * t for t in times[p]], "peak_mb": steppers[p].peak_bytes() / 2**20}
                for p in precisions]
        for row in mine:
            row["time_vs_fp32"] = row["step_ms"] / mine[0]["step_ms"]  # precisions[0] is fp32 (checked by run)
            row["memory_vs_fp32"] = row["peak_mb"] / mine[0]["peak_mb"]
        rows += mine
        del steppers
    return rows


def accuracy(methods=METHODS, precisions=("fp32", "bf16"), seeds=(0, 1, 2), epochs: int = 3,
             device: torch.device = torch.device("cpu")) -> dict:
    """Per (method, precision): clean and poisoned test accuracy after a short fine-tune of the demo's shortcut model,
    mean and std over `seeds` (module docstring, part 2)."""
    from ..demo import FINETUNES, SCENARIO, load_setup, measure, region_masks, train_shortcut

    setup = load_setup()
    base, card, _ = train_shortcut(setup)  # fp32, seed 0: the one starting point of every fine-tune
    base = base.to(device)
    data = region_masks(setup.train, setup.artifact)
    settings = {"erm": ({}, {"optimizer": "adam", "lr": 1e-3, "batch_size": 32}),
                **{method: (hparams, overrides) for method, hparams, overrides in FINETUNES.values()}}
    runs = []
    for seed in seeds:
        for method in methods:
            hparams, overrides = settings[method]
            for precision in precisions:
                model = copy.deepcopy(base)
                config = TrainConfig(**{**get_method(method).train_defaults, **overrides, "epochs": epochs,
                                        "seed": seed, "precision": precision})
                start = time.perf_counter()
                train(model, data, config, make_objective(method, model, **hparams), progress=False)
                scores = measure(model.eval(), setup)
                runs.append({"method": method, "precision": precision, "seed": seed,
                             "seconds": time.perf_counter() - start, **{k: scores[k] for k in ("clean", "poisoned", "gap")}})
    summary = []
    for method in methods:
        for precision in precisions:
            mine = [r for r in runs if r["method"] == method and r["precision"] == precision]
            row = {"method": method, "precision": precision, "n": len(mine)}
            for key in ("clean", "poisoned", "gap"):
                values = [r[key] for r in mine]
                row[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
            summary.append(row)
    before = measure(base.eval(), setup)
    return {"scenario": SCENARIO, "arch": card.arch, "base": {k: before[k] for k in ("clean", "poisoned", "gap")},
            "epochs": epochs, "seeds": list(seeds), "settings": {m: settings[m] for m in methods}, "runs": runs,
            "summary": summary}


def run(methods=METHODS, precisions=None, repeats: int = 5, seeds: int = 3, device: str = "cpu",
        batch_size: int = 8, size: int = 224, warmup: int = 1, threads: int | None = 1, epochs: int = 3) -> dict:
    """Both parts (`repeats` 0: accuracy only, `seeds` 0: speed only); `precisions` default fp32 and bf16, and fp16
    on CUDA; `threads` sets torch's intra-op threads for the run (None: as is)."""
    if precisions is None:
        precisions = ("fp32", "bf16", "fp16") if torch.device(device).type == "cuda" else ("fp32", "bf16")
    for name in methods:
        if name not in METHODS:
            raise ModelfixError(f"--methods: unknown method '{name}' (one of {', '.join(METHODS)})")
    for precision in precisions:
        check_precision(precision, device)
    if precisions[0] != "fp32":
        raise ModelfixError("the first precision must be fp32 (the reference)")
    if min(batch_size, size, epochs) < 1 or min(repeats, seeds, warmup) < 0:
        raise ModelfixError("--batch-size must be at least 1, --repeats and --seeds at least 0")
    dev = torch.device(device)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        result = {"device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "precisions": list(precisions), "timing": "median over rounds, the precisions of a method interleaved"}
        if repeats:
            result["speed"] = {"arch": "resnet18", "input": [3, size, size], "batch_size": batch_size,
                               "repeats": repeats, "warmup": warmup,
                               "rows": speed(methods, precisions, batch_size, size, repeats, warmup, dev)}
        if seeds:
            result["accuracy"] = accuracy(methods, precisions, tuple(range(seeds)), epochs, dev)
    finally:
        torch.set_num_threads(old)
    return result


def render(result: dict) -> str:
    """The two tables as Markdown (what docs/benchmarks.md shows)."""
    lines = []
    if "speed" in result:
        s = result["speed"]
        c, h, w = s["input"]
        lines += [f"resnet18 {c}×{h}×{w}, batch {s['batch_size']}, {result['device']}, {result['threads']} thread(s), "
                  f"median of {s['repeats']} steps (precisions interleaved)", "",
                  "| method | precision | step ms | × fp32 time | peak MB | × fp32 memory |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['precision']} | {r['step_ms']:.0f} | {r['time_vs_fp32']:.2f} | "
                  f"{r['peak_mb']:.0f} | {r['memory_vs_fp32']:.2f} |" for r in s["rows"]]
    if "accuracy" in result:
        a = result["accuracy"]
        pct = lambda v: f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"  # noqa: E731
        base = a["base"]
        lines += ["", f"{a['arch']} on {a['scenario']}: the shortcut model (clean {100 * base['clean']:.1f} %, tag "
                  f"pasted {100 * base['poisoned']:.1f} %, gap {100 * base['gap']:.1f}), fine-tuned {a['epochs']} "
                  f"epochs, mean ± std over {len(a['seeds'])} seeds", "",
                  "| method | precision | clean % | tag pasted % | gap (points) |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['precision']} | {pct(r['clean'])} | {pct(r['poisoned'])} | {pct(r['gap'])} |"
                  for r in a["summary"]]
    return "\n".join(lines)
