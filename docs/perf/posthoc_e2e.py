"""Usage: PYTHONPATH=. python docs/perf/posthoc_e2e.py MODEL CLEAN COMMAND N REPEATS [keep-incorrect] [-- EXTRA...]
A post-hoc command end to end in plain forward passes over its refinement set (`modelfix.bench.posthoc_cost.run`,
1 torch thread, allocator policy on as in every command). With PYTHONPATH pointing at another checkout, the same
measurement of that version (this file loads the bench module by path)."""
import importlib.util, json, sys, pathlib
import torch
torch.set_num_threads(1)
from modelfix.runtime import configure_allocator; configure_allocator()
args = sys.argv[1:]
extra = args[args.index("--") + 1:] if "--" in args else []
args = args[:args.index("--")] if "--" in args else args
path = pathlib.Path(__file__).resolve().parents[2] / "modelfix" / "bench" / "posthoc_cost.py"
spec = importlib.util.spec_from_file_location("posthoc_cost", path)
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
result = bench.run(args[0], args[1], args[2], tuple(extra), samples_per_class=int(args[3]), repeats=int(args[4]),
                   keep_incorrect="keep-incorrect" in args[5:])
print(json.dumps({k: (round(v, 3) if isinstance(v, float) else [round(t, 3) for t in v] if isinstance(v, list) else v)
                  for k, v in result.items()}))
