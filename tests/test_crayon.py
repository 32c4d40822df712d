"""CRAYON (methods_posthoc.md §6): Grad-CAM / input-gradient saliency against closed forms on tiny float64 nets,
CRAYON-ATTENTION's penalty against its formula and its θ-gradient against central finite differences (both loss
variants), and CRAYON-PRUNING's fold against the channel-masked original model."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck import assert_fd_gradient

from modelfix.card import InputSpec, ModelCard
from modelfix.data.dataset import Dataset
from modelfix.errors import ModelfixError
from modelfix.explain.gradcam import default_cam_layer, normalise_maps, saliency_maps
from modelfix.repair.crayon import feature_layer, head_link, prune_crayon, random_channels
from modelfix.repair.guidance.crayon_attention import CrayonAttention, map_terms
from modelfix.repair.methods import get_method, make_objective
from modelfix.training import TrainConfig, train
from modelfix.zoo import Classifier, build_model, build_net, default_input_spec

F64 = torch.float64
SPEC = InputSpec(1, 6, 6, (0.2,), (0.5,))


def cam_net(seed: int = 0) -> Classifier:
    """1×6×6 → conv 3 (pad 1) → BatchNorm → Softplus → pool 3 (2×2) → flatten → linear 3, float64.
    BatchNorm with non-trivial running statistics checks the eval-mode convention; std ≠ 1 the pixel-space input."""
    torch.manual_seed(seed)
    net = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 3, 3, padding=1), bn=nn.BatchNorm2d(3), act=nn.Softplus(), pool=nn.MaxPool2d(3),
        flatten=nn.Flatten(), fc=nn.Linear(12, 3)))
    net.bn.running_mean.uniform_(-0.3, 0.3)
    net.bn.running_var.uniform_(0.5, 2.0)
    return Classifier(net, SPEC).double()


def tiny_data(n: int = 6, seed: int = 1) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(x=torch.rand(n, 1, 6, 6, generator=g), y=torch.arange(n) % 3)


def batch_of(data: Dataset, index) -> dict:
    index = torch.as_tensor(index)
    return {"x": data.x[index].to(F64), "y": data.y[index], "mask": data.mask[index], "has_mask": data.has_mask[index],
            "group": data.group[index], "index": index}


# ---- saliency -------------------------------------------------------------------------------------------------


def test_gradcam_equals_the_closed_form_of_a_linear_head():
    """After `act`, pool → flatten → fc, so ∂z_y/∂A = pool's routing of W_y: nonzero only at each 3×3 window's
    argmax. Closed form: w_c = mean_hw of that, map = ReLU(Σ_c w_c A_c), A from the eval-mode conv block."""
    model = cam_net().train()
    data = tiny_data()
    x, y = data.x.to(F64), data.y
    bn_state = copy.deepcopy(model.net.bn.state_dict())
    maps = saliency_maps(model, x, y, layer="act")
    assert model.training and model.net.bn.training  # flags restored
    assert all(torch.equal(a, b) for a, b in zip(bn_state.values(), model.net.bn.state_dict().values()))

    with torch.no_grad():
        z = (x - model.mean) / model.std
        a = model.net.act(F.batch_norm(model.net.conv(z), model.net.bn.running_mean, model.net.bn.running_var,
                                       model.net.bn.weight, model.net.bn.bias, False, 0.0, model.net.bn.eps))
        expected = torch.empty(len(x), 6, 6, dtype=F64)
        for n in range(len(x)):
            w_y = model.net.fc.weight[y[n]].view(3, 2, 2)
            grad = torch.zeros(3, 6, 6, dtype=F64)
            for c in range(3):
                for i in range(2):
                    for j in range(2):
                        window = a[n, c, 3 * i:3 * i + 3, 3 * j:3 * j + 3]
                        k = int(window.argmax())
                        grad[c, 3 * i + k // 3, 3 * j + k % 3] = w_y[c, i, j]
            weights = grad.mean(dim=(1, 2))
            expected[n] = torch.relu((weights.view(3, 1, 1) * a[n]).sum(0))
    assert maps.shape == (6, 6, 6) and not maps.requires_grad
    torch.testing.assert_close(maps, expected, rtol=1e-12, atol=1e-12)
    assert float(expected.amax()) > 0  # the closed form is not trivially zero
    # per-item independence: an item's map does not depend on its batch
    torch.testing.assert_close(saliency_maps(model, x[2:3], y[2:3], layer="act"), maps[2:3], rtol=1e-12, atol=0)
    # the default layer of a small net is the activation after the last conv
    assert default_cam_layer(model.net) == "act"
    torch.testing.assert_close(saliency_maps(model, x, y), maps, rtol=0, atol=0)


def test_input_gradient_map_of_an_mlp_is_the_absolute_true_class_gradient():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, 3))
    model = Classifier(net, InputSpec(2, 3, 3, (0.1, 0.3), (0.5, 2.0))).double()
    x = torch.rand(4, 2, 3, 3, dtype=F64)
    y = torch.tensor([2, 0, 1, 2])
    assert default_cam_layer(net) is None
    maps = saliency_maps(model, x, y)
    with torch.no_grad():
        z = ((x - model.mean) / model.std).flatten(1)
        slope = 1 - torch.tanh(z @ net[1].weight.T + net[1].bias).pow(2)
        dz = (net[3].weight[y] * slope) @ net[1].weight  # ∂z_y/∂(normalised input), N×18
        dx = dz.view(4, 2, 3, 3) / model.std  # chain rule to pixel space
    torch.testing.assert_close(maps, dx.abs().sum(1), rtol=1e-12, atol=1e-14)
    # layer="input" asks for the same map on a conv net too
    conv, x6 = cam_net().eval(), torch.rand(4, 1, 6, 6, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(conv(x6).gather(1, y.view(-1, 1)).sum(), x6)
    torch.testing.assert_close(saliency_maps(conv, x6.detach(), y, layer="input"), grad.abs().sum(1))


def test_normalise_maps_and_layer_errors():
    m = torch.tensor([[[0.0, 2.0], [1.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]]], dtype=F64)
    out = normalise_maps(m)
    torch.testing.assert_close(out[0], (m[0] + 1e-10) / (2 + 1e-10))
    assert torch.equal(out[1], torch.ones(2, 2, dtype=F64))  # an all-zero map becomes uniform
    model, data = cam_net(), tiny_data()
    with pytest.raises(ModelfixError, match="'fc' is not a conv feature map"):
        saliency_maps(model, data.x.to(F64), data.y, layer="fc")
    with pytest.raises(ModelfixError, match="not a module"):
        saliency_maps(model, data.x.to(F64), data.y, layer="nope")


def test_default_cam_layers_of_the_torchvision_families():
    assert default_cam_layer(build_net("resnet18", 2, 3, (32, 32))) == "layer4"
    assert default_cam_layer(build_net("vgg11", 2, 3, (32, 32))) == "features.20"
    assert default_cam_layer(build_net("densenet121", 2, 3, (32, 32))) == "features.norm5"
    assert default_cam_layer(build_net("egem-cnn", 2, 1, (28, 28))) == "relu2"


# ---- CRAYON-ATTENTION -----------------------------------------------------------------------------------------

VERDICTS = ["yes", "no", "maybe", "no", "yes", "yes"]


def perturbed(model: nn.Module, seed: int = 5) -> nn.Module:
    """The model after some training: M' differs from the frozen M."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def linear_net(seed: int = 0) -> Classifier:
    """flatten → linear 36→3 on 1×6×6, float64: the true-class input-gradient map is |W_y| / std by hand."""
    torch.manual_seed(seed)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)), SPEC).double()


def hand_penalty(w0: torch.Tensor, w1: torch.Tensor, y: torch.Tensor, verdicts: list, alpha: float, beta: float,
                 variant: str) -> float:
    """CRAYON-ATTENTION's penalty for a linear model, written out element by element: the frozen map is built from
    the weights at construction (w0), the current map from the weights now (w1); M = |W_y|/std per pixel."""
    std = 0.5
    n_yes, n_no = verdicts.count("yes"), verdicts.count("no")
    total = 0.0
    for n in range(len(y)):
        orig = [abs(float(w0[y[n], k])) / std for k in range(36)]
        top = max(v + 1e-10 for v in orig)
        m = [(v + 1e-10) / top for v in orig]
        cur = [abs(float(w1[y[n], k])) / std for k in range(36)]
        if variant == "preprint":
            top = max(v + 1e-10 for v in cur)
            cur = [(v + 1e-10) / top for v in cur]
        rel = sum(c * (1 - mk) for c, mk in zip(cur, m))
        irrel = sum(c * mk for c, mk in zip(cur, m))
        if variant == "normalized":  # released code: by the map mass, α and β per answer of the whole set
            rel, irrel = rel / sum(1 - mk for mk in m), irrel / sum(m)
            a, b = alpha / n_yes, beta / n_no
        else:
            a, b = alpha, beta
        if verdicts[n] == "yes":
            total += a * rel
        elif verdicts[n] == "no":
            total += b * irrel
    return total / len(y)


@pytest.mark.parametrize("variant", ["preprint", "normalized"])
def test_crayon_attention_penalty_equals_the_hand_formula_of_a_linear_model(variant):
    model, data = linear_net().eval(), tiny_data()
    w0 = model.net[1].weight.detach().clone()
    objective = CrayonAttention(model, data, VERDICTS, alpha=2.0, beta=3.0, variant=variant)
    perturbed(model)
    w1 = model.net[1].weight.detach().clone()
    order = [3, 0, 2, 5, 1, 4]  # shuffled: M is picked by index
    batch = batch_of(data, order)
    task, penalty = objective.terms(model, batch)
    expected = hand_penalty(w0, w1, data.y[order], [VERDICTS[i] for i in order], 2.0, 3.0, variant)
    assert expected > 0
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-10)
    loss, parts = objective(model, batch)
    assert parts == {"task": float(task.detach()), "penalty": float(penalty.detach())}
    torch.testing.assert_close(loss, task + penalty, rtol=1e-12, atol=0)


def test_released_crayon_loss_scales_with_the_head_and_the_preprint_loss_does_not():
    """The released code normalises only the frozen map, so multiplying the head by c multiplies M' and the released
    penalty by c (the audit measured 0.00196 → 0.00098 → 0.00020 at c = 1, 0.5, 0.1); the preprint's M' is
    max-normalised, so its penalty does not move (up to the 1e-10 in the normalisation)."""
    data = tiny_data()
    batch = batch_of(data, [0, 1, 2, 3, 4, 5])
    values = {}
    for variant in ("normalized", "preprint"):
        model = linear_net(seed=2).eval()
        objective = CrayonAttention(model, data, VERDICTS, alpha=2.0, beta=3.0, variant=variant)
        perturbed(model)
        base = float(objective.terms(model, batch)[1].detach())
        for c in (0.5, 0.1):
            scaled = copy.deepcopy(model)
            with torch.no_grad():
                scaled.net[1].weight.mul_(c)
            values[variant, c] = (base, float(objective.terms(scaled, batch)[1].detach()))
    for c in (0.5, 0.1):
        base, now = values["normalized", c]
        assert now == pytest.approx(c * base, rel=1e-9)
        base, now = values["preprint", c]
        assert now == pytest.approx(base, rel=1e-8)


@pytest.mark.parametrize("variant", ["preprint", "normalized"])
def test_crayon_attention_gradcam_penalty_fd_gradient(variant):
    # seed 4: no item's original map is all zero; eval mode: the task pass must not move BatchNorm statistics
    # between the finite-difference evaluations
    model, data = cam_net(seed=4).eval(), tiny_data()
    objective = CrayonAttention(model, data, VERDICTS, alpha=2.0, beta=3.0, variant=variant, layer="act")
    perturbed(model)
    batch = batch_of(data, [3, 0, 2, 5])
    assert float(objective.terms(model, batch)[1].detach()) > 0
    torch.testing.assert_close(objective.terms(model, batch)[0], F.cross_entropy(model(batch["x"]), batch["y"]),
                               rtol=1e-12, atol=0)
    assert_fd_gradient(model, lambda m_: objective.terms(m_, batch)[1])


def test_crayon_attention_penalty_is_exactly_zero_without_yes_no_feedback():
    model, data = cam_net(), tiny_data()
    batch = batch_of(data, [0, 1, 2, 3])
    maybe = CrayonAttention(model, data, ["maybe"] * 6, alpha=5.0, beta=5.0, layer="act")
    task, penalty = maybe.terms(perturbed(model), batch)
    assert float(penalty) == 0.0 and not penalty.requires_grad
    torch.testing.assert_close(task, F.cross_entropy(model(batch["x"]), batch["y"]), rtol=0, atol=0)
    only_yes = CrayonAttention(model, data, ["yes"] * 6, alpha=0.0, beta=5.0, layer="act")  # α = 0: yes is ignored
    assert float(only_yes.terms(model, batch)[1]) == 0.0
    # released-code normalisation where the original map was all zero (M ≡ 1 after normalising): 0, not 0/0
    ones, current = torch.ones(1, 2, 2, dtype=F64), torch.rand(1, 2, 2, dtype=F64)
    rel, irrel = map_terms(current, ones, "normalized")
    assert float(rel) == 0.0 and float(irrel) == pytest.approx(float(current.sum()) / 4)


def test_crayon_attention_registry_feedback_checks_and_training():
    model, data = cam_net(seed=4).float(), tiny_data()
    method = get_method("crayon-attention")
    assert method.kind == "finetune" and not method.needs_masks and "Yes-no" in method.paper
    assert method.train_defaults == {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4}
    objective = make_objective("crayon-attention", model, data=data, verdicts=VERDICTS, beta=10.0)
    assert isinstance(objective, CrayonAttention) and objective.beta == 10.0 and objective.alpha == 0.0
    assert objective.maps.shape == (6, 6, 6)  # default layer of the small net: act, 6×6
    assert objective.describe()["feedback"] == {"yes": 3, "no": 2, "maybe": 1}
    with pytest.raises(ModelfixError, match="needs --feedback"):
        make_objective("crayon-attention", model)
    with pytest.raises(ModelfixError, match="5 verdicts for 6"):
        CrayonAttention(model, data, VERDICTS[:5])
    with pytest.raises(ModelfixError, match="not 'perhaps'"):
        CrayonAttention(model, data, VERDICTS[:5] + ["perhaps"])
    with pytest.raises(ModelfixError, match="labels differ"):
        objective(model, {**next(data.batches(2)), "y": torch.tensor([1, 1])})
    result = train(model, data, TrainConfig(epochs=2, batch_size=4, **method.train_defaults), objective,
                   progress=False)
    assert result.history[-1]["penalty"] > 0


# ---- CRAYON-PRUNING -------------------------------------------------------------------------------------------


def prune_net(kind: str, seed: int = 0) -> Classifier:
    """float64; "flatten": conv 4 → ReLU → pool 3 (2×2) → flatten → fc (16 inputs, 4 per channel);
    "avgpool": conv 4 → ReLU → global average pool → flatten → fc (4 inputs)."""
    torch.manual_seed(seed)
    pool = nn.MaxPool2d(3) if kind == "flatten" else nn.AdaptiveAvgPool2d(1)
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3, padding=1), relu=nn.ReLU(), pool=pool,
                                    flatten=nn.Flatten(), fc=nn.Linear(16 if kind == "flatten" else 4, 3)))
    return Classifier(net, SPEC).double()


def masked_outputs(model: Classifier, layer: str, prune: list[int], head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`model` with the `prune` channels of `layer` multiplied by 0 by a forward hook, and `head` as its fc."""
    reference = copy.deepcopy(model)
    reference.net.fc.load_state_dict(head.state_dict())
    keep = torch.ones(4, dtype=F64)
    keep[prune] = 0
    handle = reference.net.get_submodule(layer).register_forward_hook(
        lambda m, args, out: out * keep.view(1, -1, *([1] * (out.dim() - 2))))
    try:
        with torch.no_grad():
            return reference(x)
    finally:
        handle.remove()


@pytest.mark.parametrize("kind, layer, given, positions", [
    ("flatten", "pool", None, 4),  # default: the module before the head, flattened 2×2 maps
    ("avgpool", "relu", None, 1),  # default, walking back over flatten and the global average pool
    ("avgpool", "conv", "conv", 1),  # a pre-ReLU map (DenseNet's norm5): ReLU(0) = 0 keeps the fold exact
])
def test_prune_fold_equals_the_channel_masked_model(kind, layer, given, positions):
    model, data = prune_net(kind), tiny_data(n=12)
    original = copy.deepcopy(model.state_dict())
    link = head_link(model, given, data.x)
    assert (link.layer, link.kind, link.n_channels, link.positions) == (layer, kind, 4, positions)
    x = data.x.to(F64)

    exact, trace0 = prune_crayon(model, data, [2, 0], layer=given, epochs=0, progress=False)
    with torch.no_grad():
        assert torch.equal(exact(x), masked_outputs(model, layer, [0, 2], model.net.fc, x))

    pruned, trace = prune_crayon(model, data, [2, 0, 2], layer=given, epochs=3, lr=1e-2, batch_size=5,
                                 progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # the input is untouched
    w = pruned.net.fc.weight.detach()
    cols = [c for j in (0, 2) for c in range(j * positions, (j + 1) * positions)]
    assert float(w[:, cols].abs().max()) == 0.0  # stay pruned through the fine-tune
    assert not torch.allclose(w, exact.net.fc.weight)  # the head did train
    for name, value in pruned.state_dict().items():
        if not name.startswith("net.fc."):
            assert torch.equal(value, original[name])  # only the last linear layer moves
    # the reference head keeps the ORIGINAL (nonzero) weights of the pruned columns: masking must make them irrelevant
    head = copy.deepcopy(pruned.net.fc)
    with torch.no_grad():
        head.weight[:, cols] = model.net.fc.weight[:, cols]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_outputs(model, layer, [0, 2], head, x), rtol=0, atol=1e-6)
        logits = pruned(x)
    assert trace["pruned"] == [0, 2] and trace["n_channels"] == 4 and trace["layer"] == layer
    assert trace["epochs"] == 3 and trace["lr"] == 1e-2 and trace["warnings"] == []
    assert trace["final_loss"] == pytest.approx(float(F.cross_entropy(logits, data.y)), rel=1e-9)
    assert trace["accuracy_after"] == pytest.approx(float((logits.argmax(1) == data.y).double().mean()))
    with torch.no_grad():
        before = model(x)
    assert trace["accuracy_before"] == pytest.approx(float((before.argmax(1) == data.y).double().mean()))
    assert trace0["final_loss"] == trace0["loss_pruned"]


def test_prune_errors_empty_list_and_random_baseline():
    model, data = prune_net("flatten"), tiny_data()
    with pytest.raises(ModelfixError, match="layer 'relu' is not followed by a linear layer"):
        feature_layer(model, "relu", data.x)  # a max-pool sits between relu and the head
    with pytest.raises(ModelfixError, match="not a module"):
        feature_layer(model, "relu9")
    with pytest.raises(ModelfixError, match="channel 4 is out of range"):
        prune_crayon(model, data, [4], progress=False)
    copy_, trace = prune_crayon(model, data, [], progress=False)
    assert trace["warnings"] == ["no 'no' verdicts: nothing pruned"] and copy_ is not model
    assert all(torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), model.state_dict().values()))
    picks = random_channels(2048, 20, seed=3)
    assert picks == random_channels(2048, 20, seed=3) != random_channels(2048, 20, seed=4)
    assert len(set(picks)) == 20 and picks == sorted(picks) and 0 <= min(picks) and max(picks) < 2048
    with pytest.raises(ModelfixError):
        random_channels(4, 5, 0)


def test_default_pruned_layers_of_zoo_models():
    """ResNet prunes layer4 (through avgpool), egem-cnn the ReLU feeding fc2; checked by a dry run on noise."""
    import dataclasses

    spec = dataclasses.replace(default_input_spec("resnet18"), height=32, width=32)
    resnet = build_model(ModelCard(arch="resnet18", num_classes=3, input=spec))
    assert feature_layer(resnet) == "layer4"
    egem = build_model(ModelCard(arch="egem-cnn", num_classes=3, input=default_input_spec("egem-cnn")))
    assert head_link(egem).layer == "relu3" and head_link(egem).n_channels == 200
