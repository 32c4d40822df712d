"""Usage: PYTHONPATH=. python docs/perf/ab_cert.py ARCH BATCH ROUNDS [OLD_INTERVALS_PY]
OLD_INTERVALS_PY (default /tmp/perf/base_intervals.py): git show ec93c0e:modelfix/repair/intervals.py > /tmp/perf/base_intervals.py
In one process, interleaved: ERM, then Cert-R4 and IBP-Ex steps with the old and the current interval module
(swapped into guidance.certified), 1 thread, allocator policy on; model and batch as bench cost builds them (NCHW)."""
import importlib.util, sys, time, statistics, copy, torch
torch.set_num_threads(1)
from modelfix.runtime import configure_allocator; configure_allocator()
spec = importlib.util.spec_from_file_location("old_intervals", sys.argv[4] if len(sys.argv) > 4 else "/tmp/perf/base_intervals.py")
old = importlib.util.module_from_spec(spec); sys.modules["old_intervals"] = old; spec.loader.exec_module(old)
from modelfix.repair import intervals as new
from modelfix.repair.guidance import certified
from modelfix.bench.cost import _model, _batch, _Runner
arch, bs, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
base = _model(arch, torch.device("cpu")); batch = _batch(arch, bs, torch.device("cpu"))
runners = {m: _Runner(m, copy.deepcopy(base), batch) for m in ("erm", "r4-cert", "ibp-ex")}
def use(mod):
    certified.input_gradient_bounds, certified.interval_forward, certified.masked_box = mod.input_gradient_bounds, mod.interval_forward, mod.masked_box
times = {k: [] for k in ("erm", "r4-cert old", "r4-cert new", "ibp-ex old", "ibp-ex new")}
for m in ("r4-cert", "ibp-ex"):
    for mod in (old, new): use(mod); runners[m].step()
runners["erm"].step()
for i in range(rounds):
    t = time.perf_counter(); runners["erm"].step(); times["erm"].append(time.perf_counter() - t)
    for m in ("r4-cert", "ibp-ex"):
        for tag, mod in (("old", old), ("new", new)):
            use(mod); t = time.perf_counter(); runners[m].step(); times[f"{m} {tag}"].append(time.perf_counter() - t)
med = {k: statistics.median(v) for k, v in times.items()}
print(arch, bs, "rounds", rounds, {k: round(v / med["erm"], 2) for k, v in med.items()}, "erm_ms", round(1000 * med["erm"]),
      "r4 new/old", round(med["r4-cert new"] / med["r4-cert old"], 3), "ibp new/old", round(med["ibp-ex new"] / med["ibp-ex old"], 3))
