"""Attributions (modelfix.explain.attribution), heatmap images (modelfix.explain.heatmap) and `modelfix explain`."""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run
from PIL import Image
from torch import nn

import modelfix.cli  # noqa: F401  (registers every command)
from modelfix.card import InputSpec, ModelCard
from modelfix.errors import ModelfixError
from modelfix.explain.attribution import (COMPOSITES, METHODS, attribute, attribution_details, composite_name,
                                          composite_warnings, relevance_maps, resolve_targets)
from modelfix.explain.heatmap import colorize, image_png_bytes, png_bytes, save_png
from modelfix.zoo import Classifier, build_model, default_input_spec

# ---- helpers -----------------------------------------------------------------------------------------------------


def _hooks(model: nn.Module) -> dict[str, int]:
    found = {}
    for name, m in model.named_modules():
        n = len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(
            getattr(m, "_backward_pre_hooks", {}))
        if n:
            found[name] = n
    return found


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _identical(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def _rand(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---- (a) LRP against relevance computed by hand ----------------------------------------------------------------


def _conv_net() -> Classifier:
    """conv1 (1→2, 2×2) → ReLU → conv2 (2→2, 2×2) → ReLU → flatten → fc (2→2), no biases, on 1×3×3 images,
    normalised with mean 0 and std 0.5 (so the explained input is z = 2x ≥ 0)."""
    conv1, conv2, fc = nn.Conv2d(1, 2, 2, bias=False), nn.Conv2d(2, 2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        conv1.weight.copy_(torch.tensor([[[[1.0, -0.5], [0.25, 0.75]]], [[[-0.5, 1.0], [0.5, -0.25]]]]))
        conv2.weight.copy_(torch.tensor([[[[0.5, -1.0], [1.0, 0.25]], [[0.75, 0.5], [-0.25, 1.0]]],
                                         [[[-0.5, 0.25], [0.5, 1.0]], [[1.0, -0.75], [0.5, 0.5]]]]))
        fc.weight.copy_(torch.tensor([[1.0, -0.5], [0.3, 0.8]]))
    net = nn.Sequential(OrderedDict([("conv1", conv1), ("relu1", nn.ReLU()), ("conv2", conv2), ("relu2", nn.ReLU()),
                                     ("flatten", nn.Flatten()), ("fc", fc)]))
    return Classifier(net, InputSpec(1, 3, 3, (0.0,), (0.5,))).eval()


def _dense(conv: nn.Conv2d, in_shape: tuple[int, int, int], weight: torch.Tensor | None = None) -> torch.Tensor:
    """The conv as a float64 matrix (outputs × inputs), read off its responses to the unit inputs."""
    n = int(np.prod(in_shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    w = (conv.weight if weight is None else weight).detach().double()
    return torch.nn.functional.conv2d(basis, w).reshape(n, -1).T


def _stab(u: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return u + ((u == 0).double() + u.sign()) * eps  # zennit's stabiliser: ε with the sign of the denominator


def _hand_lrp(model: Classifier, x: torch.Tensor, t: int, first_rule: str) -> torch.Tensor:
    """LRP by hand in float64: ε rule on fc, z⁺ on conv2, then z⁺ or Flat on conv1 (inputs are ≥ 0 everywhere)."""
    net = model.net
    z0 = (x.double() / 0.5).flatten()
    m1, m2 = _dense(net.conv1, (1, 3, 3)), _dense(net.conv2, (2, 2, 2))
    v = net.fc.weight.detach().double()
    a1 = torch.relu(m1 @ z0)
    a2 = torch.relu(m2 @ a1)
    logits = v @ a2
    r_out = torch.zeros(2, dtype=torch.float64)
    r_out[t] = logits[t]
    r_a2 = a2 * (v.T @ (r_out / _stab(v @ a2)))                       # ε rule: R_j = a_j Σ_k w_kj R_k / z_k
    m2p = m2.clamp(min=0)
    r_a1 = a1 * (m2p.T @ (r_a2 / _stab(m2p @ a1)))                    # z⁺ rule: R_i = a_i Σ_j w⁺_ji R_j / Σ_i' a_i' w⁺_ji'
    if first_rule == "zplus":
        m1p = m1.clamp(min=0)
        r_z = z0 * (m1p.T @ (r_a1 / _stab(m1p @ z0)))
    else:  # Flat: weights and inputs replaced by ones, i.e. each unit's relevance spread evenly over its receptive field
        ones = _dense(net.conv1, (1, 3, 3), torch.ones_like(net.conv1.weight))
        r_z = ones.T @ (r_a1 / _stab(ones @ torch.ones(9, dtype=torch.float64)))
    return r_z.reshape(1, 3, 3)


@pytest.mark.parametrize("composite,first_rule", [("epsilon-plus", "zplus"), ("epsilon-plus-flat", "flat")])
def test_lrp_matches_the_hand_computed_relevance(composite, first_rule):
    model = _conv_net()
    x = _rand(4, 1, 3, 3, seed=2)
    t = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        a1 = torch.relu(model.net.conv1(x / 0.5))
        logits = model(x)
    assert bool((a1 == 0).any()) and bool((a1 > 0).any())  # some units off: the rules' gating is exercised
    assert bool((logits.gather(1, t[:, None]).abs() > 0.05).all())  # one is negative: explained all the same
    details = attribution_details(model, x, t, method="lrp", composite=composite)
    assert details.values.shape == x.shape
    for i in range(len(x)):
        expected = _hand_lrp(model, x[i], int(t[i]), first_rule).float()
        torch.testing.assert_close(details.values[i], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(details.values.sum(dim=(1, 2, 3)), details.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(details.expected_sum, logits.gather(1, t[:, None]).squeeze(1))


def test_composite_names_and_the_flat_warning():
    assert composite_name("epsilon-gamma-box") == "epsilon_gamma_box"
    assert set(COMPOSITES) == {"epsilon-plus-flat", "epsilon-gamma-box", "epsilon-plus", "epsilon-alpha2-beta1",
                               "epsilon-alpha2-beta1-flat"}
    with pytest.raises(ModelfixError, match="unknown LRP composite 'guided-backprop'.*epsilon-plus-flat"):
        composite_name("guided-backprop")
    mlp = build_model(ModelCard(arch="mlp", num_classes=10, input=default_input_spec("mlp")))
    assert composite_warnings(mlp, "epsilon-plus-flat") and not composite_warnings(mlp, "epsilon-plus")
    assert not composite_warnings(_conv_net(), "epsilon-plus-flat")
    # the warning is true: Flat on a first Linear layer gives every pixel the same relevance
    relevance = attribute(mlp.eval(), _rand(2, 1, 28, 28), torch.tensor([1, 2]), method="lrp")
    assert float(relevance[0].std() / relevance[0].abs().mean()) < 1e-4


# ---- (b) the model is left exactly as it was -------------------------------------------------------------------


def _bn_net(folded: bool = False) -> Classifier:
    """conv1 (1→2, 3×3, pad 1) → ReLU → conv2 (2→3, 3×3, pad 1) → BatchNorm → ReLU → flatten → fc, on 1×5×5.

    The BatchNorm has non-trivial statistics and one negative γ: a positive per-channel scale cancels out of the z⁺,
    ε and ZBox rules (with zero biases), so only a sign flip (which swaps w⁺ and w⁻) makes an unfolded BatchNorm
    visible in the relevance. `folded` gives the same function with the BatchNorm folded into conv2 by hand
    (w·γ/√(v+ε), (b − μ)·γ/√(v+ε) + β)."""
    torch.manual_seed(0)
    conv1, conv2, bn, fc = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(75, 3)
    with torch.no_grad():
        for module in (conv1, conv2, fc):
            module.weight.mul_(3.0)
            module.bias.copy_(-module.bias.abs())
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.05]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.2]))
        bn.weight.copy_(torch.tensor([1.5, -0.7, 1.1]))
        bn.bias.copy_(torch.tensor([-0.1, -0.05, -0.2]))
    if folded:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        merged = nn.Conv2d(2, 3, 3, padding=1)
        with torch.no_grad():
            merged.weight.copy_(conv2.weight * scale[:, None, None, None])
            merged.bias.copy_((conv2.bias - bn.running_mean) * scale + bn.bias)
        block = [("conv2", merged)]
    else:
        block = [("conv2", conv2), ("bn", bn)]
    layers = [("conv1", conv1), ("relu1", nn.ReLU())] + block + [("relu", nn.ReLU(inplace=True)),
                                                                ("flatten", nn.Flatten()), ("fc", fc)]
    return Classifier(nn.Sequential(OrderedDict(layers)), InputSpec(1, 5, 5, (0.2,), (0.4,))).eval()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_leaves_weights_flags_hooks_and_outputs_alone(method):
    model = _bn_net()
    x = _rand(3, 1, 5, 5, seed=1)
    with torch.no_grad():
        before = model(x)
    model.train()
    model.net.conv1.eval()  # a mixed state, which must come back as it was
    model.net.fc.weight.requires_grad_(False)
    training = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    state = _state(model)
    attr = attribute(model, x, torch.tensor([0, 1, 2]), method=method, steps=4, samples=3)
    assert attr.shape == (3, 1, 5, 5)  # C = 1 here, so Grad-CAM's N×1×H×W too
    assert torch.isfinite(attr).all() and attr.abs().sum() > 0
    assert _identical(model, state)  # BatchNorm statistics included: no training-mode forward happened
    assert {name: m.training for name, m in model.named_modules()} == training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())
    assert _hooks(model) == {}
    assert model.net.relu.inplace
    assert not any("forward" in m.__dict__ for m in model.modules())  # no canonizer left a patched forward
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_lrp_with_batchnorm_equals_lrp_of_the_hand_folded_model():
    model, folded = _bn_net(), _bn_net(folded=True)
    x = _rand(4, 1, 5, 5, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), folded(x), atol=1e-5, rtol=1e-5)
        t = model(x).argmax(1)
    for composite in ("epsilon-plus-flat", "epsilon-plus", "epsilon-gamma-box"):
        ours = attribution_details(model, x, t, method="lrp", composite=composite)
        by_hand = attribution_details(folded, x, t, method="lrp", composite=composite)
        torch.testing.assert_close(ours.values, by_hand.values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.values.sum(dim=(1, 2, 3)), ours.logits, atol=1e-4, rtol=1e-4)


# ---- (c) the gradient family -----------------------------------------------------------------------------------


def _mlp(activation: nn.Module | None = None) -> Classifier:
    """flatten → fc1 (4→3) → ReLU → fc2 (3→2) on 1×2×2 images, mean 0.2, std 0.5 (the gradient carries 1/std)."""
    torch.manual_seed(4)
    net = nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc1", nn.Linear(4, 3)),
                                     ("act", activation or nn.ReLU()), ("fc2", nn.Linear(3, 2))]))
    return Classifier(net, InputSpec(1, 2, 2, (0.2,), (0.5,))).eval()


def _closed_form(model: Classifier, x: torch.Tensor, t: int, relu: bool = True) -> tuple[torch.Tensor, float]:
    """(∂z_t/∂x, z_t) in float64: z = V·φ(W·(x − m)/s + b) + c, ∂z_t/∂x = (V_t ⊙ φ'(h)) W / s."""
    w, b = model.net.fc1.weight.detach().double(), model.net.fc1.bias.detach().double()
    v, c = model.net.fc2.weight.detach().double(), model.net.fc2.bias.detach().double()
    h = w @ ((x.double().flatten() - 0.2) / 0.5) + b
    gate = (h > 0).double() if relu else torch.ones_like(h)
    z = v @ (h * gate) + c
    return ((v[t] * gate) @ w / 0.5).reshape(1, 2, 2), float(z[t])


def test_gradient_and_gradient_times_input_match_the_closed_form():
    model = _mlp()
    x = _rand(5, 1, 2, 2, seed=5)
    t = torch.tensor([0, 1, 1, 0, 1])
    grad = attribute(model, x, t, method="gradient", batch_size=2)
    for i in range(5):
        expected, _ = _closed_form(model, x[i], int(t[i]))
        torch.testing.assert_close(grad[i].double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(attribute(model, x, t, method="gradxinput"), x * attribute(model, x, t, method="gradient"))


def test_integrated_gradients_completeness():
    x = _rand(4, 1, 2, 2, seed=6) + 0.2
    t = torch.tensor([0, 1, 0, 1])
    # a linear network: the gradient is constant along the path, so even one Riemann point is exact
    linear = _mlp(nn.Identity())
    details = attribution_details(linear, x, t, method="integrated-gradients", steps=1)
    for i in range(4):
        _, zx = _closed_form(linear, x[i], int(t[i]), relu=False)
        _, z0 = _closed_form(linear, torch.zeros(1, 2, 2), int(t[i]), relu=False)
        assert float(details.values[i].sum()) == pytest.approx(zx - z0, abs=1e-5)
        assert float(details.expected_sum[i]) == pytest.approx(zx - z0, abs=1e-5)
    # with ReLUs: Σ attribution → z_t(x) − z_t(0) as the Riemann sum refines
    model = _mlp()
    details = attribution_details(model, x, t, method="integrated-gradients", steps=64)
    for i in range(4):
        _, zx = _closed_form(model, x[i], int(t[i]))
        _, z0 = _closed_form(model, torch.zeros(1, 2, 2), int(t[i]))
        assert abs(float(details.values[i].sum()) - (zx - z0)) < 1e-2 * max(1.0, abs(zx - z0))


def test_smoothgrad_is_reproducible_and_batching_independent():
    model = _mlp()
    x = _rand(5, 1, 2, 2, seed=7)
    t = torch.tensor([0, 1, 1, 0, 1])
    first = attribute(model, x, t, method="smoothgrad", samples=8, noise=0.2)
    assert torch.equal(first, attribute(model, x, t, method="smoothgrad", samples=8, noise=0.2))
    torch.testing.assert_close(first, attribute(model, x, t, method="smoothgrad", samples=8, noise=0.2, batch_size=2))
    assert not torch.equal(first, attribute(model, x, t, method="smoothgrad", samples=8, noise=0.2, seed=1))
    gradient = attribute(model, x, t, method="gradient")
    assert (first - gradient).abs().max() > 1e-3  # the noise does move the gates
    torch.testing.assert_close(attribute(model, x, t, method="smoothgrad", samples=8, noise=0.0), gradient)


def test_gradcam_is_upsampled_and_refuses_nets_without_conv():
    model = _bn_net()
    x = _rand(2, 1, 5, 5, seed=8)
    attr = attribute(model, x, torch.tensor([0, 1]), method="gradcam")
    assert attr.shape == (2, 1, 5, 5) and bool((attr >= 0).all())
    mlp = _mlp()
    with pytest.raises(ModelfixError, match="Grad-CAM needs a conv layer"):
        attribute(mlp, _rand(2, 1, 2, 2), torch.tensor([0, 1]), method="gradcam")
    # --layer input: CRAYON's |input gradient| map
    maps = attribute(mlp, _rand(2, 1, 2, 2), torch.tensor([0, 1]), method="gradcam", layer="input")
    torch.testing.assert_close(maps, attribute(mlp, _rand(2, 1, 2, 2), torch.tensor([0, 1])).abs())


def test_resolve_targets_and_relevance_maps():
    model = _mlp()
    x = _rand(6, 1, 2, 2, seed=9)
    y = torch.tensor([1, 0, 1, 0, 1, 0])
    assert torch.equal(resolve_targets(model, x, y, "true"), y)
    with torch.no_grad():
        assert torch.equal(resolve_targets(model, x, y, "pred", batch_size=4), model(x).argmax(1))
    assert torch.equal(resolve_targets(model, x, y, "1"), torch.ones(6, dtype=torch.long))
    for bad in ("2", "-1", "cat", 1.5):
        with pytest.raises(ModelfixError, match="--target"):
            resolve_targets(model, x, y, bad)
    attr = _rand(2, 3, 4, 4)
    torch.testing.assert_close(relevance_maps(attr), attr[:, 0] + attr[:, 1] + attr[:, 2])


# ---- (d) heatmap images ----------------------------------------------------------------------------------------


def test_colorize_symmetric_colours():
    maps = torch.zeros(3, 2, 2)
    maps[0] = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    maps[2, 0, 0] = float("nan")
    rgb = colorize(maps, "bwr")
    assert rgb.shape == (3, 2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0].tolist() == [255, 0, 0]          # the largest positive value: full red
    assert rgb[0, 0, 1].tolist() == [128, 128, 255]      # −½ of the max |value|: half-way to blue
    assert rgb[0, 1, 0].tolist() == [255, 255, 255]      # zero: white
    assert rgb[0, 1, 1].tolist() == [255, 128, 128]      # +½: half-way to red
    assert (rgb[1] == 255).all() and (rgb[2] == 255).all()  # an all-zero map (and NaN) is white, not garbage
    negative = colorize(-maps[:1], "bwr")
    assert negative[0, 0, 0].tolist() == [0, 0, 255]      # the sign picks the side
    hot = colorize(maps, "coldnhot")
    assert hot[0, 0, 0].tolist() == [255, 255, 255] and hot[0, 1, 0].tolist() == [0, 0, 0]
    assert hot[0, 0, 1].tolist() == [0, 0, 255] and (hot[1] == 0).all()
    stretched = colorize(torch.tensor([[[0.0, 1.0, 2.0]]]), "bwr", symmetric=False)
    assert stretched[0, 0].tolist() == [[0, 0, 255], [255, 255, 255], [255, 0, 0]]


def test_png_bytes_and_atomic_save(tmp_path):
    rgb = colorize(torch.tensor([[[1.0, -1.0], [0.0, 0.5]]]), "bwr")[0]
    image = Image.open(io.BytesIO(png_bytes(rgb, scale=3)))
    assert image.size == (6, 6) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((5, 0)) == (0, 0, 255)
    gray = Image.open(io.BytesIO(image_png_bytes(torch.tensor([[[0.0, 2.0]]]), scale=1)))
    assert gray.mode == "L" and np.asarray(gray).tolist() == [[0, 255]]  # clamped to [0, 1]
    colour = Image.open(io.BytesIO(image_png_bytes(torch.ones(3, 2, 2) * torch.tensor([1.0, 0.0, 0.5])[:, None, None])))
    assert colour.mode == "RGB" and colour.size == (8, 8) and colour.getpixel((0, 0)) == (255, 0, 128)
    path = save_png(tmp_path / "sub" / "h.png", rgb)
    assert Image.open(path).size == (8, 8) and sorted(p.name for p in path.parent.iterdir()) == ["h.png"]


# ---- (e) the command -------------------------------------------------------------------------------------------


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_explain_command_on_the_shortcut_model(shortcut, tmp_path):
    sha = _sha(shortcut)
    out = tmp_path / "lrp"
    result = run("explain", shortcut, "--data", "decoy-digits:test-contaminated", "--method", "lrp", "--composite",
                 "epsilon-plus", "--target", "pred", "--limit", "6", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "explain.json").read_text())
    assert doc["method"] == "lrp" and doc["composite"] == "epsilon-plus" and doc["canonizers"] == []
    assert doc["n"] == 6 and doc["warnings"] == []
    assert abs(doc["conservation"]["min"] - 1) < 1e-4 and abs(doc["conservation"]["max"] - 1) < 1e-4
    # the shortcut shows: the 4×4 corner patch (16 of 784 pixels) holds far more than its share of |relevance|
    assert doc["artifact_share"]["n"] == 6 and doc["artifact_share"]["mean"] > 4 * 16 / 784
    arrays = np.load(out / "attributions.npz")
    assert arrays["attributions"].shape == (6, 1, 28, 28) and arrays["attributions"].dtype == np.float32
    assert arrays["maps"].shape == (6, 28, 28) and arrays["indices"].tolist() == list(range(6))
    assert arrays["targets"].shape == arrays["labels"].shape == (6,)
    np.testing.assert_allclose(arrays["attributions"].sum(axis=(1, 2, 3)), arrays["logits"], rtol=1e-4)
    heatmaps = sorted((out / "heatmaps").iterdir())
    assert [p.name for p in heatmaps] == [name.split("/")[1] for name in doc["files"]["heatmaps"]]
    label, target = heatmaps[0].stem.split("_")[1:]
    assert label == str(arrays["labels"][0]) and target == f"t{arrays['targets'][0]}"
    for path in heatmaps + sorted((out / "inputs").iterdir()):
        with Image.open(path) as image:
            assert image.size == (112, 112)
    assert len(list((out / "inputs").iterdir())) == 6
    assert _sha(shortcut) == sha  # the model file is untouched

    # Grad-CAM on an MLP: one line, exit 2, nothing written
    result = run("explain", shortcut, "--method", "gradcam", "--limit", "2", "-o", tmp_path / "cam")
    assert_one_line_error(result, "Grad-CAM needs a conv layer")
    assert not (tmp_path / "cam").exists()
    # usage errors: one line, exit 2, before any work
    for args, fragment in [(("--method", "saliency"), "unknown attribution method 'saliency'"),
                           (("--composite", "zplus"), "unknown LRP composite 'zplus'"),
                           (("--target", "10"), "--target 10"), (("--target", "best"), "--target"),
                           (("--limit", "-1"), "--limit"), (("--cmap", "jet"), "unknown colour map")]:
        assert_one_line_error(run("explain", shortcut, *args, "-o", tmp_path / "bad"), fragment)
    assert_one_line_error(run("explain", shortcut, "-o", shortcut), "existing file")
    assert_one_line_error(run("explain", shortcut, "-o", out), "not empty")
    assert not (tmp_path / "bad").exists() and _sha(shortcut) == sha


def test_explain_command_gradcam_on_a_cnn(tmp_path):
    from modelfix.checkpoint import save_model

    card = ModelCard(arch="egem-cnn", num_classes=10, input=default_input_spec("egem-cnn"))
    torch.manual_seed(0)
    path = save_model(build_model(card).eval(), card, tmp_path / "cnn.safetensors")
    sha = _sha(path)
    out = tmp_path / "cam"
    result = run("explain", path, "--data", "decoy-digits:test", "--method", "gradcam", "--target", "3",
                 "--limit", "3", "--cmap", "coldnhot", "-o", out)
    assert result.exit_code == 0, result.stderr
    arrays = np.load(out / "attributions.npz")
    assert arrays["attributions"].shape == (3, 1, 28, 28) and arrays["targets"].tolist() == [3, 3, 3]
    assert (arrays["maps"] >= 0).all()
    doc = json.loads((out / "explain.json").read_text())
    assert doc["composite"] is None and "conservation" not in doc and "artifact_share" not in doc
    assert all(name.endswith("_t3.png") for name in doc["files"]["heatmaps"])
    with Image.open(out / doc["files"]["heatmaps"][0]) as image:
        assert image.size == (112, 112) and image.mode == "RGB"
    assert _sha(path) == sha
    # an output inside a data folder given as input is refused
    (tmp_path / "data").mkdir()
    assert_one_line_error(run("explain", path, "--data", tmp_path / "data", "-o", tmp_path / "data" / "x"), "inside the input")
