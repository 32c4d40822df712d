"""Mixed precision in the training loop and the guided penalties (docs/finetunes.md, "Mixed precision").

The reference is always the same objective computed in plain float32. Under bf16 autocast every penalty whose terms
are second order (RRR, RBR, the R4 family, Cert-R4, IBP-Ex, CRAYON-ATTENTION's Grad-CAM) is computed in float32, so it
must agree with the float32 value to float32 rounding (FP32_TOL); the first-order ones (TAP's activations, PGD-Ex's
loss at x*) see 16-bit activations and must agree within BF16_TOL, a bound on bfloat16's 8-bit mantissa through a
few layers. A control shows the FP32_TOL check can fail: the same RRR penalty left in bf16 misses it.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelfix.card import InputSpec
from modelfix.data import Dataset
from modelfix.errors import ModelfixError
from modelfix.precision import autocast
from modelfix.repair.registry import make_objective
from modelfix.training import TrainConfig, epoch_batches, train
from modelfix.data.transforms import Augment
from modelfix.zoo import Classifier

FP32_TOL = 1e-5  # relative: two float32 evaluations of the same formula
BF16_TOL = 5e-2  # relative: bfloat16 keeps 8 significant bits (2^-8 ≈ 0.4 % per rounding)


def tiny_model(seed: int = 0) -> Classifier:
    """1×8×8 → conv 4 → ReLU → pool → conv 4 → ReLU → pool → linear 3 (every layer the interval bounds support)."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 4, 3, padding=1), act1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(4, 4, 3, padding=1), act2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc=nn.Linear(16, 3)))
    return Classifier(net, InputSpec(1, 8, 8, (0.2,), (0.5,))).eval()


def tiny_data(n: int = 6) -> Dataset:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(n, 1, 8, 8)
    for i in range(n):
        mask[i, :, i % 4:i % 4 + 3, 2:5] = 1
    return Dataset(x=torch.rand(n, 1, 8, 8, generator=g), y=torch.arange(n) % 3, mask=mask,
                   has_mask=torch.ones(n, dtype=torch.bool), class_names=["a", "b", "c"])


def batch_of(data: Dataset) -> dict:
    return next(iter(data.batches(len(data))))


CASES = {  # method: (hyper-parameters, relative tolerance of the penalty's value and parameter gradient under bf16)
    "tap": ({"layers": ["act1", "act2"]}, BF16_TOL),
    "rrr": ({}, FP32_TOL),
    "rbr": ({}, FP32_TOL),
    "erm-l2": ({}, FP32_TOL),
    "r4-rand": ({"eps": 0.3, "samples": 3}, FP32_TOL),
    "smooth-rrr": ({"eps": 0.1, "samples": 3}, FP32_TOL),
    "r4-adv": ({"eps": 0.3, "steps": 3}, FP32_TOL),
    "r4-cert": ({"eps": 0.1}, FP32_TOL),
    "ibp-ex": ({"eps": 0.1}, FP32_TOL),
    "ibp-ex-rrr": ({"eps": 0.1}, FP32_TOL),
    "pgd-ex": ({"eps": 0.3, "steps": 3}, BF16_TOL),
    "crayon-attention": ({"alpha": 2.0, "beta": 3.0, "layer": "act2"}, FP32_TOL),
}


def penalty_and_gradient(method: str, precision: str):
    model, data = tiny_model(), tiny_data()
    hparams = dict(CASES[method][0])
    if method == "crayon-attention":
        hparams.update(data=data, verdicts=["yes", "no", "no", "maybe", "yes", "no"])
    objective = make_objective(method, model, **hparams)
    params = [p for p in model.parameters()]
    torch.manual_seed(0)  # the same random draws (R4's noise) in both precisions
    with autocast(precision, "cpu"):
        task, penalty = objective.terms(model, batch_of(data))
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    flat = torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in zip(params, grads)])
    return float(task.detach()), float(penalty.detach()), flat.float()


def relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", sorted(CASES))
def test_every_penalty_under_bf16_matches_its_fp32_value_and_gradient(method):
    tolerance = CASES[method][1]
    task32, value32, grad32 = penalty_and_gradient(method, "fp32")
    task16, value16, grad16 = penalty_and_gradient(method, "bf16")
    assert value32 > 0 and float(grad32.norm()) > 0  # a penalty that is not trivially 0
    assert relative(value16, value32) <= tolerance
    assert relative(grad16, grad32) <= tolerance
    if method == "rbr":  # its task pass is the one the influence term differentiates: all of RBR is float32
        assert task16 == pytest.approx(task32, rel=FP32_TOL)
    else:  # the task pass really ran in bfloat16 (else this compares float32 with itself) and is still close
        assert task16 != task32 and relative(task16, task32) <= BF16_TOL


def test_control_rrr_left_in_bf16_misses_the_fp32_tolerance():
    """The same RRR penalty (log-prob-sum target, TAP's reduction) with its double backprop under bf16 autocast:
    its gradient is off by far more than FP32_TOL, which is why the penalty runs in float32."""
    _, value32, grad32 = penalty_and_gradient("rrr", "fp32")
    model, data = tiny_model(), tiny_data()
    batch = batch_of(data)
    with autocast("bf16", "cpu"):
        z = ((batch["x"] - model.mean) / model.std).requires_grad_(True)
        (g,) = torch.autograd.grad(F.log_softmax(model.net(z), 1).sum(), z, create_graph=True)
        mask = batch["mask"][:, 0]
        scale = mask.shape[1] * mask.shape[2] / mask.sum(dim=(1, 2))  # D/|M_b|
        value = (scale.pow(2) * (mask * g.sum(1)).pow(2).sum(dim=(1, 2))).mean()
    grads = torch.autograd.grad(value, list(model.parameters()))
    assert relative(float(value.detach()), value32) < BF16_TOL  # the same penalty ...
    assert relative(torch.cat([g.flatten() for g in grads]).float(), grad32) > FP32_TOL  # ... but rounded


# ---- the training loop --------------------------------------------------------------------------------------------


def test_training_under_bf16_runs_and_records_its_precision():
    data = tiny_data()
    model = tiny_model()
    config = TrainConfig(epochs=2, batch_size=3, lr=1e-2, precision="bf16")
    objective = make_objective("rrr", model, lam=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    result = train(model, data, config, objective, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it stepped
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay float32
    assert config.to_dict()["precision"] == "bf16"  # what the card's history records


def test_fp16_on_cpu_and_an_unknown_precision_are_refused():
    with pytest.raises(ModelfixError, match="fp16 needs a CUDA device"):
        train(tiny_model(), tiny_data(), TrainConfig(epochs=1, precision="fp16"), progress=False)
    with pytest.raises(ModelfixError, match="--precision must be one of fp32, bf16, fp16"):
        TrainConfig(precision="bfloat16")


# ---- augmentation in the training stream ---------------------------------------------------------------------------


def test_augmented_training_stream_keeps_each_mask_on_its_bright_square():
    """Each image is dark with one bright square, and its mask marks exactly that square. After the random resized
    crop + flip of the training stream, the mask must still sit on the bright pixels: every pixel brighter than
    0.75 is masked and every masked pixel is brighter than 0.25 (bilinear images blur a square's edge by at most
    one pixel; masks are nearest-neighbour), and the crop must have moved something."""
    n, size = 8, 32
    x, mask = torch.zeros(n, 1, size, size), torch.zeros(n, 1, size, size)
    for i in range(n):
        top, left = 4 + 2 * i, 20 - 2 * i
        x[i, :, top:top + 8, left:left + 8] = 1.0
        mask[i, :, top:top + 8, left:left + 8] = 1.0
    data = Dataset(x=x, y=torch.zeros(n, dtype=torch.long), mask=mask, has_mask=torch.ones(n, dtype=torch.bool),
                   class_names=["a"])
    augment = Augment(scale=(0.5, 1.0))
    moved = 0
    for batch, _ in epoch_batches(data, 4, torch.Generator().manual_seed(0), augment, seed=3):
        for img, m, i in zip(batch["x"], batch["mask"], batch["index"].tolist()):
            bright, marked = img[0] > 0.75, m[0] > 0.5
            assert bool(marked.any())
            assert bool(marked[bright].all()), f"item {i}: bright pixels outside the mask"
            assert bool((img[0][marked] > 0.25).all()), f"item {i}: mask pixels off the square"
            moved += int(not torch.equal(m, data.mask[i]))
    assert moved >= n // 2  # most items were really cropped or flipped


# ---- the commands ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """`train --method rrr --precision bf16 --augment`, one epoch: the options reach the run and the card."""
    import json

    from cli_helpers import run

    from modelfix.checkpoint import load_model

    out = tmp_path_factory.mktemp("precision") / "m.safetensors"
    result = run("train", "--method", "rrr", "--data", "decoy-digits:train", "--epochs", "1", "--precision", "bf16",
                 "--augment", "--device", "cpu", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    config = json.loads(result.stdout)["config"]
    assert (config["precision"], config["augment"]) == ("bf16", True)
    _, card = load_model(out)
    assert (card.history[-1]["config"]["precision"], card.history[-1]["config"]["augment"]) == ("bf16", True)
    return out


def test_evaluate_and_explain_run_under_bf16_and_say_so(bf16_model, tmp_path):
    import json

    from cli_helpers import run

    result = run("evaluate", bf16_model, "--data", "decoy-digits:test", "--precision", "bf16", "--device", "cpu",
                 "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["precision"] == "bf16" and 0 <= doc["levels"][0]["accuracy"] <= 1
    result = run("explain", bf16_model, "--data", "decoy-digits:test", "--method", "gradient", "--limit", "4",
                 "--precision", "bf16", "--device", "cpu", "-o", tmp_path / "maps", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["precision"] == "bf16"


@pytest.mark.parametrize("command", ["train", "finetune", "evaluate", "explain"])
def test_fp16_on_cpu_is_one_line_exit_2_and_nothing_written(bf16_model, tmp_path, command):
    from cli_helpers import assert_one_line_error, run

    out = tmp_path / "out"
    model = [] if command == "train" else [bf16_model]
    result = run(command, *model, "--data", "decoy-digits:test", "--precision", "fp16", "--device", "cpu",
                 *([] if command == "evaluate" else ["-o", out]))
    assert_one_line_error(result, "fp16 needs a CUDA device", "bf16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs CUDA (none here)")
def test_fp16_training_on_cuda_scales_the_loss_and_keeps_the_rrr_penalty_in_float32():
    model, data = tiny_model().cuda(), tiny_data()
    objective = make_objective("rrr", model, lam=1.0)
    batch = {k: v.cuda() for k, v in batch_of(data).items()}
    reference = float(objective.terms(model, batch)[1])
    with autocast("fp16", "cuda"):
        task, penalty = objective.terms(model, batch)
    assert relative(float(penalty.detach()), reference) <= FP32_TOL
    result = train(model, data, TrainConfig(epochs=2, batch_size=3, lr=1e-2, precision="fp16"), objective,
                   progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_bench_precision_smoke():
    """The benchmark's speed part on a 32×32 resnet18 (one step each): one row per method and precision, fp32 the
    reference, and its Markdown table."""
    from modelfix.bench.precision import render, run

    result = run(methods=("erm", "rrr"), repeats=1, seeds=0, batch_size=2, size=32, warmup=0)
    rows = result["speed"]["rows"]
    assert [(r["method"], r["precision"]) for r in rows] == [("erm", "fp32"), ("erm", "bf16"), ("rrr", "fp32"),
                                                              ("rrr", "bf16")]
    assert all(r["step_ms"] > 0 and r["peak_mb"] > 0 for r in rows)
    assert rows[1]["time_vs_fp32"] == pytest.approx(rows[1]["step_ms"] / rows[0]["step_ms"])
    assert "| rrr | bf16 |" in render(result) and "accuracy" not in result
    with pytest.raises(ModelfixError, match="fp16 needs a CUDA device"):
        run(precisions=("fp32", "fp16"), seeds=0, device="cpu")
