"""PYTHONPATH=. python docs/perf/poison_ab.py: poison() against the previous algorithm (tests/test_perf.py)."""
import sys, time, statistics, torch
sys.path.insert(0, "tests")  # run from the repository root
torch.set_num_threads(1)
from test_perf import _old_poison
from modelfix.data import Dataset, parse_artifact, poison
gen = torch.Generator().manual_seed(0)
n = 20000
d = Dataset(x=torch.rand(n, 1, 28, 28, generator=gen), y=torch.randint(0, 10, (n,), generator=gen), class_names=[str(i) for i in range(10)])
a = parse_artifact("corner-patch")
fs = {"old": lambda: _old_poison(d, a, 1.0, "random", 0, 8192), "new": lambda: poison(d, a, 1.0, "random", 0)}
ts = {k: [] for k in fs}
for f in fs.values(): f()
for _ in range(9):
    for k, f in fs.items():
        t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
med = {k: statistics.median(v) for k, v in ts.items()}
print("poison(20000 MNIST, corner-patch, level 1) new/old", round(med["new"] / med["old"], 3))
