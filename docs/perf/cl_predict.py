"""PYTHONPATH=. python docs/perf/cl_predict.py tap-cnn 1024 5: predict in channels-last against NCHW."""
import sys, time, statistics, torch
torch.set_num_threads(1)
from modelfix.card import ModelCard
from modelfix.zoo import build_model, default_input_spec
from modelfix.evaluate import predict
arch, n = sys.argv[1], int(sys.argv[2])
spec = default_input_spec(arch)
if arch == "resnet18":
    import dataclasses; spec = dataclasses.replace(spec, height=64, width=64)
m = build_model(ModelCard(arch=arch, num_classes=10, input=spec)).eval()
x = torch.rand(n, spec.channels, spec.height, spec.width)
def nchw():  # the plain loop predict() used to be: NCHW, inference_mode
    with torch.inference_mode():
        return torch.cat([m(x[i:i + 256]).argmax(1) for i in range(0, n, 256)])
def cl():  # predict() now: channels-last for a net with Conv2d
    return predict(m, x, 256)
def grad_mode():  # the plain loop under no_grad instead of inference_mode
    with torch.no_grad():
        return torch.cat([m(x[i:i+256]).argmax(1) for i in range(0, n, 256)])
a, b = nchw(), cl(); print("same argmax", bool((a == b).all()))
with torch.inference_mode():
    l1 = m(x[:256])
m.to(memory_format=torch.channels_last)
with torch.inference_mode():
    l2 = m(x[:256])
m.to(memory_format=torch.contiguous_format)
print("max logit diff", float((l1 - l2).abs().max()))
ts = {"nchw": [], "cl": [], "no_grad": []}
for _ in range(int(sys.argv[3])):
    for k, f in (("nchw", nchw), ("cl", cl), ("no_grad", grad_mode)):
        t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
med = {k: statistics.median(v) for k, v in ts.items()}
print(arch, n, "cl/nchw", round(med["cl"] / med["nchw"], 3), "no_grad/inference_mode", round(med["no_grad"] / med["nchw"], 3))
