"""PYTHONPATH=. python docs/perf/threads.py 7: 1 thread against all cores, alternated."""
import os, sys, time, statistics, copy, torch
from modelfix.card import ModelCard
from modelfix.zoo import build_model, default_input_spec
from modelfix.evaluate import predict
from modelfix.bench.cost import _model, _batch, _Runner
allc = os.cpu_count()
mlp = build_model(ModelCard(arch="mlp", num_classes=10, input=default_input_spec("mlp"))).eval()
cnn = build_model(ModelCard(arch="tap-cnn", num_classes=10, input=default_input_spec("tap-cnn"))).eval()
x = torch.rand(10000, 1, 28, 28)
torch.manual_seed(0)
erm = _Runner("erm", _model("tap-cnn", torch.device("cpu")), _batch("tap-cnn", 64, torch.device("cpu")))
work = {"predict mlp 10000": lambda: predict(mlp, x, 512), "predict tap-cnn 1024": lambda: predict(cnn, x[:1024], 256),
        "erm step tap-cnn 64": erm.step}
for name, f in work.items():
    ts = {1: [], allc: []}
    f()
    for _ in range(int(sys.argv[1])):
        for n in ts:
            torch.set_num_threads(n); t = time.perf_counter(); f(); ts[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in ts.items()}
    print(name, f"threads {allc}/1 time ratio", round(med[allc] / med[1], 3), "1-thread s", round(med[1], 3), flush=True)
