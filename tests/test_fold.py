"""Folding patches into stock weights: every fold the code claims is exact on random inputs; the rest are kept."""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from torch import nn

import modelfix.repair.fold as fold_module
from modelfix.card import InputSpec, ModelCard
from modelfix.checkpoint import load_model, save_model
from modelfix.errors import ModelfixError
from modelfix.repair.fold import fold_patches, fold_plan
from modelfix.repair.patches import ChannelScale, PCAffine, PCASumRatio, attach_patch, patch_entries
from modelfix.zoo import Classifier, build_model, build_net, default_input_spec

TOL = 1e-5


def spec_for(arch: str, size: int | None = None) -> InputSpec:
    spec = default_input_spec(arch)
    return dataclasses.replace(spec, height=size, width=size) if size else spec


def randomise_bn(net: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so a BN fold is tested in eval mode for real."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)


@functools.lru_cache(maxsize=None)
def _template(arch: str, size: int | None) -> tuple[Classifier, ModelCard]:
    torch.manual_seed(0)
    card = ModelCard(arch=arch, num_classes=10, input=spec_for(arch, size))
    model = build_model(card)
    randomise_bn(model.net)
    return model.eval(), card


def make(arch: str, size: int | None = None) -> tuple[Classifier, ModelCard]:
    """A fresh copy of a seeded zoo model with random batch-norm statistics (built once per arch and size)."""
    model, card = _template(arch, size)
    return copy.deepcopy(model), card


def small_vgg(arch: str) -> Classifier:
    """VGG at 32×32 with a narrow classifier (the stock 25088×4096 layer alone costs seconds); same module names."""
    torch.manual_seed(0)
    with torch.device("meta"):
        net = build_net(arch, 10, 3, (32, 32))
        net.classifier[0] = nn.Linear(512 * 7 * 7, 48)
        net.classifier[3] = nn.Linear(48, 40)
        net.classifier[6] = nn.Linear(40, 10)
    net = net.to_empty(device="cpu")
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    randomise_bn(net)
    return Classifier(net, spec_for(arch, 32)).eval()


def scales(n: int, seed: int) -> torch.Tensor:
    """Factors in [0, 1] with about a quarter exact zeros."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, generator=g)
    c[torch.rand(n, generator=g) < 0.25] = 0.0
    c[0] = 0.0
    return c


def pca_map(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M = U diag(c) Uᵀ with a random orthonormal U and shrinkage c in [0, 1] (some 0), and a positive mean."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    c = scales(d, seed + 1).double()
    return (u * c) @ u.T, torch.rand(d, generator=g, dtype=torch.float64)


def inputs(model: Classifier, n: int = 5, seed: int = 3) -> torch.Tensor:
    s = model.input_spec
    return torch.rand(n, s.channels, s.height, s.width, generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_folds_exactly(model: Classifier, expected_into: dict[str, list[str]]) -> list[dict]:
    """Fold all patches; they must all fold into the expected modules and the logits must not move."""
    x = inputs(model)
    patched = logits(model, x)
    result = fold_patches(model)
    assert result.kept == []
    assert {e["target"]: e["into"] for e in result.folded} == expected_into
    assert patch_entries(model) == [] and len(model.patches) == 0
    for module in model.modules():
        assert not module._forward_hooks
    folded = logits(model, x)
    assert (folded - patched).abs().max() <= TOL * patched.abs().max()
    return result.folded


def attach_scales(model: Classifier, targets: list[str]) -> dict[str, torch.Tensor]:
    """A ChannelScale on each target; the logits must change (else an exactness check would prove nothing)."""
    x = inputs(model)
    stock = logits(model, x)
    shapes = {}
    hooks = []
    try:
        for t in targets:
            hook = (lambda t: lambda m, a, out: shapes.__setitem__(t, out.shape[1]))(t)
            hooks.append(model.net.get_submodule(t).register_forward_hook(hook))
        logits(model, x)
    finally:
        for h in hooks:
            h.remove()
    used = {t: scales(shapes[t], seed=i) for i, t in enumerate(targets)}
    for t, c in used.items():
        attach_patch(model, t, ChannelScale(c))
    assert (logits(model, x) - stock).abs().max() > 1e-3 * stock.abs().max()
    return used


# ---------------------------------------------------------------------------------------------------------------
# channel scales


def test_egem_cnn_points_fold_into_their_producers():
    model, _ = make("egem-cnn")
    used = attach_scales(model, ["relu1", "relu2", "relu3"])
    conv1_before = model.net.conv1.weight.detach().clone()
    assert_folds_exactly(model, {"relu1": ["conv1"], "relu2": ["conv2"], "relu3": ["fc1"]})
    c = used["relu1"]
    assert torch.equal(model.net.conv1.weight[c == 0], torch.zeros_like(model.net.conv1.weight[c == 0]))
    assert torch.allclose(model.net.conv1.weight, conv1_before * c.view(-1, 1, 1, 1))
    assert torch.equal(model.net.conv1.bias[c == 0], torch.zeros(int((c == 0).sum())))


def test_mlp_relu_folds_into_fc1():
    model, _ = make("mlp")
    attach_scales(model, ["relu1"])
    assert_folds_exactly(model, {"relu1": ["fc1"]})


def test_resnet18_stem_and_stages_fold():
    """Stem: producer (maxpool ← relu ← bn1). Stages end in add+relu: consumer fold into the next stage's first
    conv and its downsample (both see the stage output), and layer4 through avgpool/flatten into fc."""
    model, _ = make("resnet18", 32)
    used = attach_scales(model, ["maxpool", "layer1", "layer2", "layer3", "layer4"])
    down = model.net.layer4[0].downsample[0].weight.detach().clone()
    assert_folds_exactly(
        model,
        {
            "maxpool": ["bn1"],
            "layer1": ["layer2.0.conv1", "layer2.0.downsample.0"],
            "layer2": ["layer3.0.conv1", "layer3.0.downsample.0"],
            "layer3": ["layer4.0.conv1", "layer4.0.downsample.0"],
            "layer4": ["fc"],
        },
    )
    c = used["layer3"]
    assert torch.allclose(model.net.layer4[0].downsample[0].weight, down * c.view(1, -1, 1, 1))
    assert not model.net.fc.weight[:, used["layer4"] == 0].any()


@pytest.mark.parametrize(
    "arch, convs",
    [("vgg11", [0, 3, 8, 13, 18]), ("vgg11_bn", [1, 5, 12, 19, 26])],  # with BN the producer is the BatchNorm
)
def test_vgg_pools_and_classifier_relus_fold(arch, convs):
    model = small_vgg(arch)
    pools = [n for n, m in model.net.features.named_children() if isinstance(m, nn.MaxPool2d)]
    attach_scales(model, [f"features.{p}" for p in pools] + ["classifier.1", "classifier.4"])
    expected = {f"features.{p}": [f"features.{c}"] for p, c in zip(pools, convs)}
    expected.update({"classifier.1": ["classifier.0"], "classifier.4": ["classifier.3"]})
    assert_folds_exactly(model, expected)


def test_consumer_fold_maps_channels_to_flattened_columns():
    """Producer blocked (BatchNorm without affine): the factors go to the Linear, channel i to columns i·HW…"""
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 3, 3), norm=nn.BatchNorm2d(3, affine=False), relu=nn.ReLU(),
            flatten=nn.Flatten(), fc=nn.Linear(3 * 4 * 4, 5),
        )
    )
    randomise_bn(net)
    model = Classifier(net, InputSpec(1, 6, 6, (0.5,), (0.25,))).eval()
    c = torch.tensor([0.5, 0.0, 2.0])
    attach_patch(model, "relu", ChannelScale(c))
    plan = fold_plan(model, "p0")
    assert plan.foldable and plan.into == ["fc"] and "producer side" not in plan.reason
    weight = net.fc.weight.detach().clone()
    assert_folds_exactly(model, {"relu": ["fc"]})
    assert torch.allclose(net.fc.weight, weight * c.repeat_interleave(16))
    assert not net.fc.weight[:, 16:32].any()


def test_negative_factors_fold_only_where_no_relu_or_maxpool_is_crossed():
    model, _ = make("egem-cnn")
    attach_patch(model, "relu1", ChannelScale(torch.linspace(-1, 1, 8)))
    attach_patch(model, "conv2", ChannelScale(torch.linspace(-1, 1, 16)))  # the conv itself: rows, no ReLU
    plans = {e["target"]: fold_plan(model, e["key"]) for e in patch_entries(model)}
    assert not plans["relu1"].foldable and "negative factors" in plans["relu1"].reason
    assert plans["conv2"].foldable and plans["conv2"].into == ["conv2"]


# ---------------------------------------------------------------------------------------------------------------
# PCA patches


def test_pca_affine_on_a_dense_point_folds_into_the_next_linear():
    model, _ = make("egem-cnn")
    matrix, mean = pca_map(200, seed=5)
    x = inputs(model)
    stock = logits(model, x)
    attach_patch(model, "relu3", PCAffine(matrix, mean))
    assert (logits(model, x) - stock).abs().max() > 1e-3 * stock.abs().max()
    w, b = model.net.fc2.weight.detach().double().clone(), model.net.fc2.bias.detach().double().clone()
    assert_folds_exactly(model, {"relu3": ["fc2"]})
    # the closed form, W' = W·M and b' = b + W·(I − M)·ā (M, ā as the patch stores them, float32)
    m32, a32 = matrix.float().double(), mean.float().double()
    assert torch.allclose(model.net.fc2.weight.double(), w @ m32, atol=1e-6)
    assert torch.allclose(model.net.fc2.bias.double(), b + w @ (a32 - m32 @ a32), atol=1e-6)


def test_pca_affine_on_vgg_classifier_relu_folds_through_dropout():
    model = small_vgg("vgg11")
    matrix, mean = pca_map(48, seed=7)
    attach_patch(model, "classifier.1", PCAffine(matrix, mean))
    assert_folds_exactly(model, {"classifier.1": ["classifier.3"]})


def test_pca_affine_on_a_conv_map_is_kept_unless_it_is_1x1():
    model, _ = make("egem-cnn")
    attach_patch(model, "relu2", PCAffine(*pca_map(16, seed=1)))
    plan = fold_plan(model, "p0")
    assert not plan.foldable and plan.reason == "PCA position mode before a padded conv is not exact at borders"
    # resnet18 layer4 at 32×32 input is 512×1×1: the position mode is the dense map, foldable into fc
    model, _ = make("resnet18", 32)
    attach_patch(model, "layer4", PCAffine(*pca_map(512, seed=2)))
    assert_folds_exactly(model, {"layer4": ["fc"]})


def test_pca_sum_ratio_folds_into_fc_through_the_global_average_pool():
    """At 64×64, layer4 is 512×2×2; a large bias keeps it positive, so no channel sum is 0 and the fold is the
    patch exactly: pooled p' = ā/HW + M(p − ā/HW)."""
    model, _ = make("resnet18", 64)
    with torch.no_grad():
        model.net.layer4[1].bn2.bias += 10.0
    seen = []
    handle = model.net.layer4.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    matrix, mean = pca_map(512, seed=3)
    attach_patch(model, "layer4", PCASumRatio(matrix, mean * 40))
    logits(model, inputs(model))
    handle.remove()
    assert seen[0].shape[2:] == (2, 2) and seen[0].min() > 0
    folded = assert_folds_exactly(model, {"layer4": ["fc"]})
    assert "note" in folded[0]


def test_pca_sum_ratio_fold_with_zero_channel_sums_is_the_pooled_affine_map():
    """Where a channel sum is exactly 0 the patch zeroes the channel and the fold cannot; the folded model is
    then the affine map on the pooled features, computed here by hand."""
    model, _ = make("resnet18", 32)
    stock = copy.deepcopy(model)
    matrix, mean = pca_map(512, seed=4)
    attach_patch(model, "layer4", PCASumRatio(matrix, mean))
    x = inputs(model)
    pooled = []
    handle = stock.net.avgpool.register_forward_hook(lambda m, a, out: pooled.append(out.flatten(1)))
    logits(stock, x)
    handle.remove()
    p = pooled[0].double()
    assert (p == 0).any()  # dead channels: the case the patch's s = 0 guard handles differently
    result = fold_patches(model)
    assert [e["into"] for e in result.folded] == [["fc"]]
    m32, a32 = matrix.float().double(), mean.float().double()  # HW = 1 at 32×32
    refined = a32 + (p - a32) @ m32.T
    expected = refined @ stock.net.fc.weight.double().T + stock.net.fc.bias.double()
    assert (logits(model, x).double() - expected).abs().max() <= TOL * expected.abs().max()


def test_pca_sum_ratio_elsewhere_is_kept():
    model, _ = make("egem-cnn")
    attach_patch(model, "relu2", PCASumRatio(*pca_map(16, seed=1)))
    plan = fold_plan(model, "p0")
    assert not plan.foldable and plan.reason.startswith("input-dependent ratio")


# ---------------------------------------------------------------------------------------------------------------
# what is kept, strict mode, safety


def test_skip_connection_is_not_foldable_and_strict_changes_nothing():
    model, _ = make("resnet18", 32)
    attach_scales(model, ["layer1.0", "layer2"])
    plan = fold_plan(model, "p0")
    assert not plan.foldable
    assert "feeds a skip connection (add) at 'layer1.1'" in plan.reason
    assert "reaches a skip connection (add) at 'layer1.0'" in plan.reason
    state = {k: v.clone() for k, v in model.net.state_dict().items()}
    x = inputs(model)
    patched = logits(model, x)
    with pytest.raises(ModelfixError, match=r"cannot fold every patch: p0 \(layer1\.0, channel_scale\): .*skip"):
        fold_patches(model, strict=True)
    assert all(torch.equal(state[k], v) for k, v in model.net.state_dict().items())
    assert [e["key"] for e in patch_entries(model)] == ["p0", "p1"]
    # not strict: fold what folds, keep the rest with its reason
    result = fold_patches(model)
    assert [e["key"] for e in result.folded] == ["p1"] and [e["key"] for e in result.kept] == ["p0"]
    assert "skip connection" in result.kept[0]["reason"]
    assert [e["key"] for e in patch_entries(model)] == ["p0"]
    assert (logits(model, x) - patched).abs().max() <= TOL * patched.abs().max()


def test_a_fold_never_crosses_a_patch_it_does_not_commute_with():
    """pool2's scale would go to conv2's rows, across relu2's sum-ratio patch (kept): it must go to fc1 instead."""
    model, _ = make("egem-cnn")
    attach_patch(model, "relu2", PCASumRatio(*pca_map(16, seed=2)))
    attach_patch(model, "pool2", ChannelScale(scales(16, seed=3)))
    result = fold_patches(model, keys=["p1"])
    assert [e["into"] for e in result.folded] == [["fc1"]]
    assert [e["key"] for e in patch_entries(model)] == ["p0"]


def test_several_patches_on_one_target():
    model, _ = make("egem-cnn")
    attach_patch(model, "relu1", ChannelScale(scales(8, seed=1)))
    attach_patch(model, "relu1", ChannelScale(scales(8, seed=2)))  # scales commute: both fold
    attach_patch(model, "relu3", PCAffine(*pca_map(200, seed=3)))
    attach_patch(model, "relu3", ChannelScale(scales(200, seed=4)))  # order matters: both kept
    x = inputs(model)
    patched = logits(model, x)
    result = fold_patches(model)
    assert [e["key"] for e in result.folded] == ["p0", "p1"]
    assert [e["key"] for e in result.kept] == ["p2", "p3"]
    assert all("order matters" in e["reason"] for e in result.kept)
    assert (logits(model, x) - patched).abs().max() <= TOL * patched.abs().max()


def test_untraceable_network_keeps_its_patches():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 3)
            self.relu = nn.ReLU()
            self.fc2 = nn.Linear(3, 2)

        def forward(self, x):
            x = x.flatten(1)
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return self.fc2(self.relu(self.fc1(x)))

    model = Classifier(Branchy(), InputSpec(1, 2, 2, (0.0,), (1.0,))).eval()
    attach_patch(model, "relu", ChannelScale(torch.tensor([1.0, 0.0, 0.5])))
    result = fold_patches(model)
    assert result.folded == [] and result.kept[0]["reason"] == "network not traceable by torch.fx"


def test_a_fold_that_changes_the_outputs_is_a_bug_and_changes_nothing(monkeypatch):
    model, _ = make("egem-cnn")
    attach_scales(model, ["relu1", "relu3"])
    state = {k: v.clone() for k, v in model.net.state_dict().items()}
    real_apply = fold_module._apply

    def broken(net, edits):
        real_apply(net, edits)
        with torch.no_grad():
            net.fc2.bias.add_(1.0)

    monkeypatch.setattr(fold_module, "_apply", broken)
    with pytest.raises(RuntimeError, match="bug in modelfix.repair.fold"):
        fold_patches(model)
    assert all(torch.equal(state[k], v) for k, v in model.net.state_dict().items())
    assert [e["target"] for e in patch_entries(model)] == ["relu1", "relu3"]


def test_unknown_key_is_refused():
    model, _ = make("mlp")
    attach_scales(model, ["relu1"])
    with pytest.raises(ModelfixError, match=r"no patch p7 in the model \(patches: p0\)"):
        fold_patches(model, keys=["p7"])


def test_folded_model_saves_as_a_stock_checkpoint(tmp_path):
    model, card = make("egem-cnn")
    attach_scales(model, ["relu1", "relu2", "relu3"])
    x = inputs(model)
    patched = logits(model, x)
    fold_patches(model, strict=True)
    path = save_model(model, card, tmp_path / "folded.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert tensors and not any(k.startswith("modelfix.patch.") for k in tensors)
    loaded, loaded_card = load_model(path)
    assert loaded_card.patches == []
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert (logits(loaded, x) - patched).abs().max() <= TOL * patched.abs().max()
    # the stock architecture loads it strictly
    plain = build_net("egem-cnn", 10, 1, (28, 28))
    plain.load_state_dict(tensors, strict=True)
