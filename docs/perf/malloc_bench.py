"""PYTHONPATH=. python docs/perf/malloc_bench.py tap-cnn 256 5 erm,r4-cert
Interleaved in-process: ERM step time with glibc default vs mallopt options. Usage: arch batch rounds"""
import ctypes, sys, time, statistics, copy, torch
torch.set_num_threads(1)
from modelfix.bench.cost import _model, _batch, _Runner
libc = ctypes.CDLL("libc.so.6")
def opts(name):
    if name == "default":
        libc.mallopt(-4, 65536); libc.mallopt(-1, 128*1024)
    elif name == "mmapmax0+trim":
        libc.mallopt(-4, 0); libc.mallopt(-1, 1 << 30)
    elif name == "thresh32M+trim":
        libc.mallopt(-4, 65536); libc.mallopt(-3, 32 << 20); libc.mallopt(-1, 1 << 30)
arch, bs, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
methods = sys.argv[4].split(",") if len(sys.argv) > 4 else ["erm"]
names = ["default", "mmapmax0+trim", "thresh32M+trim"]
torch.manual_seed(0)
base = _model(arch, torch.device("cpu")); batch = _batch(arch, bs, torch.device("cpu"))
for method in methods:
    r = _Runner(method, copy.deepcopy(base), batch)
    r.step()
    times = {n: [] for n in names}
    for i in range(rounds):
        for n in names:
            opts(n); r.step()  # one step to settle the heap under this policy
            t = time.perf_counter(); r.step(); times[n].append(time.perf_counter() - t)
    opts("default")
    med = {n: statistics.median(v) for n, v in times.items()}
    print(arch, bs, method, {n: round(med[n] / med["default"], 3) for n in names}, "default_ms", round(1000*med["default"]))
