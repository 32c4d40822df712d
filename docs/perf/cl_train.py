"""Usage: PYTHONPATH=. python docs/perf/cl_train.py ARCH BATCH ROUNDS METHODS
Training steps (`bench cost`'s runner: zero_grad, objective, backward, Adam) in NCHW against channels-last (model and
batch converted once, as `training.train` does), alternated in one process, 1 thread, allocator policy on."""
import copy, statistics, sys, time, torch
torch.set_num_threads(1)
from modelfix.runtime import configure_allocator; configure_allocator()
from modelfix.bench.cost import _batch, _model, _Runner
arch, bs, rounds, methods = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
torch.manual_seed(0)
base, batch = _model(arch, torch.device("cpu")), _batch(arch, bs, torch.device("cpu"))
cl_batch = {**batch, "x": batch["x"].contiguous(memory_format=torch.channels_last)}
runners = {}
for m in methods:
    runners[m, "nchw"] = _Runner(m, copy.deepcopy(base), batch)
    runners[m, "cl"] = _Runner(m, copy.deepcopy(base).to(memory_format=torch.channels_last), cl_batch)
for r in runners.values():
    r.step()
times = {k: [] for k in runners}
for _ in range(rounds):
    for k, r in runners.items():
        t = time.perf_counter(); r.step(); times[k].append(time.perf_counter() - t)
med = {k: statistics.median(v) for k, v in times.items()}
print(arch, bs, "rounds", rounds, {m: {"nchw_ms": round(1000 * med[m, "nchw"]), "cl/nchw": round(med[m, "cl"] / med[m, "nchw"], 3),
      **({f"x{methods[0]} nchw": round(med[m, "nchw"] / med[methods[0], "nchw"], 2),
          f"x{methods[0]} cl": round(med[m, "cl"] / med[methods[0], "cl"], 2)} if m != methods[0] else {})} for m in methods})
