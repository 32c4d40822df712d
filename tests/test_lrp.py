"""LRP through zennit (modelfix.explain.lrp): conservation, patches, clean-up, the relevance-share approval rule."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

from modelfix.card import InputSpec, ModelCard
from modelfix.data.dataset import Dataset
from modelfix.errors import ModelfixError
from modelfix.explain import conservation, lrp, relevance_share
from modelfix.repair import patches
from modelfix.zoo import Classifier, build_model, default_input_spec


def _model(arch: str, input_spec: InputSpec | None = None, scale: float = 1.0, seed: int = 0, **kwargs) -> Classifier:
    """A random-weight model; for the small nets every bias made ≤ 0 and every parameter scaled by `scale`.

    Why: with `zero_params='bias'` the ε rule passes on `R_j·z̃_j/(z̃_j + ε)`, `z̃` the pre-activation without bias.
    A unit alive only through a positive bias has `z̃_j ≈ 0` but relevance ∝ its activation, and there the rule
    divides by a float32 sum that cancels to ~0: conservation broke by 4e-4 on one item of the default init. With
    biases ≤ 0 an active unit has `z̃_j ≥ z_j > 0`, so the rule is conservative up to ε by construction (the biases
    still matter: without `zero_bias` they absorb relevance, see below). PyTorch's init also gives these nets tiny
    logits (~0.05); `scale` makes them O(1), against which the fixed 1e-6 stabilisers are negligible.
    """
    torch.manual_seed(seed)
    spec = input_spec or default_input_spec(arch)
    model = build_model(ModelCard(arch=arch, num_classes=10, input=spec, arch_kwargs=kwargs)).eval()
    if not arch.startswith("resnet"):
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                    module.bias.copy_(-module.bias.abs())
            for p in model.parameters():
                p.mul_(scale)
    return model


def _inputs(model: Classifier, n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    spec = model.input_spec
    x = torch.rand(n, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        target = model(x).argmax(1)  # the largest logit: clearly nonzero, so the ratio is well defined
    return x, target


def _hooks(model: nn.Module) -> dict[str, list]:
    """Every hook on every module of `model`, by module name (empty dict: none anywhere)."""
    found = {}
    for name, module in model.named_modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values(), *module._backward_hooks.values(),
                 *getattr(module, "_backward_pre_hooks", {}).values()]
        if hooks:
            found[name] = hooks
    return found


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _identical(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


# ---- conservation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_relevance_sums_to_the_logit_on_egem_cnn(composite):
    model = _model("egem-cnn", scale=3.0)
    x, target = _inputs(model)
    relevance, logit = lrp(model, x, target, composite=composite)
    assert relevance.shape == x.shape
    with torch.no_grad():
        expected = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(logit, expected, rtol=1e-6, atol=1e-6)  # no canonizer here: the logits themselves
    assert bool((logit > 0.5).all())
    ratio = relevance.sum(dim=(1, 2, 3)) / logit
    assert (ratio - 1).abs().max() < 1e-4


def test_relevance_sits_on_pixels_not_on_the_normalisation():
    # mean/std ≠ 0/1: explaining the Classifier itself would scale the relevance by 1/std (1/0.3081 ≈ 3.2)
    spec = InputSpec(1, 28, 28, (0.1307,), (0.3081,))
    model = _model("mlp", spec, scale=3.0, hidden=32)
    x, target = _inputs(model)
    ratio = conservation(model, x, target)
    assert (ratio - 1).abs().max() < 1e-4


def test_patched_model_conserves_relevance_of_the_patched_logit():
    model = _model("egem-cnn", scale=3.0)
    x, _ = _inputs(model)
    generator = torch.Generator().manual_seed(3)
    # relu1 and relu3 as the default EGEM points; pool2 too, because on an activation the ReLU's own Pass rule
    # already passes the patched relevance through, while on a module without a rule (MaxPool) only the patch's
    # own Pass keeps the scale from entering the relevance: without it this test fails.
    for target, channels in [("relu1", 8), ("pool2", 16), ("relu3", 200)]:
        scale = 0.2 + 0.8 * torch.rand(channels, generator=generator)
        patches.attach_patch(model, target, patches.ChannelScale(scale))
    unpatched = _model("egem-cnn", scale=3.0)
    with torch.no_grad():
        target = model(x).argmax(1)
        patched_logit = model(x).gather(1, target[:, None]).squeeze(1)
        plain_logit = unpatched(x).gather(1, target[:, None]).squeeze(1)
    assert (patched_logit - plain_logit).abs().min() > 1e-3  # the patches do change the explained logit
    relevance, logit = lrp(model, x, target)
    torch.testing.assert_close(logit, patched_logit, rtol=1e-6, atol=1e-6)
    ratio = relevance.sum(dim=(1, 2, 3)) / patched_logit
    assert (ratio - 1).abs().max() < 1e-4
    # the patch hooks are still in place, and nothing else is
    assert sorted(_hooks(model)) == ["net.pool2", "net.relu1", "net.relu3"]
    assert all(isinstance(h, patches._ApplyPatch) for hooks in _hooks(model).values() for h in hooks)


def test_resnet18_with_canonizer_conserves_relevance():
    spec = dataclasses.replace(default_input_spec("resnet18"), height=32, width=32)
    model = _model("resnet18", spec)
    for m in model.modules():  # non-trivial BN statistics, so the canonizer's merge actually matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x, target = _inputs(model, n=3)
    relevance, logit = lrp(model, x, target)
    # BN merged into the convs, the residual sum explicit (Norm rule), biases zeroed in the rules: conserved up to
    # the 1e-6 stabilisers (measured max |ratio − 1| ≈ 1e-6 here), so the same 1e-4 bound as the small nets.
    ratio = relevance.sum(dim=(1, 2, 3)) / logit
    assert (ratio - 1).abs().max() < 1e-4
    with torch.no_grad():  # the logit explained is the canonized model's: equal to the plain one up to BN's eps
        expected = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(logit, expected, rtol=1e-3, atol=1e-3)


def test_with_biases_the_relevance_is_not_conserved():
    model = _model("egem-cnn", scale=3.0)
    x, target = _inputs(model)
    ratio = conservation(model, x, target, zero_bias=False)
    assert (ratio - 1).abs().max() > 1e-3  # the biases absorb relevance: zero_bias is what makes it exact


# ---- clean-up ----------------------------------------------------------------------------------------------------


def test_lrp_leaves_no_hooks_flags_or_weight_changes():
    spec = dataclasses.replace(default_input_spec("resnet18"), height=32, width=32)
    model = _model("resnet18", spec)
    x, target = _inputs(model, n=2)
    model.net.layer1.train()  # a mixed state, which must come back as it was (and BN must not update)
    frozen = model.net.conv1.weight
    frozen.requires_grad_(False)
    inplace = {name: m.inplace for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
    training = {name: m.training for name, m in model.named_modules()}
    state = _state(model)
    relevance, _ = lrp(model, x, target)
    assert torch.isfinite(relevance).all()
    assert _hooks(model) == {}
    assert _identical(model, state)
    assert not any("forward" in m.__dict__ or hasattr(m, "canonizer_sum") for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == training
    assert {name: m.inplace for name, m in model.named_modules() if isinstance(m, nn.ReLU)} == inplace
    assert not frozen.requires_grad and all(p.requires_grad for p in model.parameters() if p is not frozen)


def test_lrp_cleans_up_after_an_exception_inside():
    model = _model("egem-cnn", scale=3.0)
    key = patches.attach_patch(model, "relu1", patches.ChannelScale(torch.full((8,), 0.5)))
    x, target = _inputs(model)
    state = _state(model)

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.net.fc1.register_forward_hook(boom)  # raises inside zennit's context, after the canonizers
    try:
        with pytest.raises(RuntimeError, match="boom"):
            lrp(model, x, target)
    finally:
        handle.remove()
    hooks = _hooks(model)
    assert list(hooks) == ["net.relu1"] and [h.key for h in hooks["net.relu1"]] == [key]
    assert _identical(model, state)
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    relevance, logit = lrp(model, x, target)  # and it still works
    assert (relevance.sum(dim=(1, 2, 3)) / logit - 1).abs().max() < 1e-4


def test_lrp_works_inside_no_grad_and_rejects_unknown_composites():
    model = _model("egem-cnn", scale=3.0)
    x, target = _inputs(model, n=2)
    with torch.no_grad():
        relevance, logit = lrp(model, x, target)
    assert (relevance.sum(dim=(1, 2, 3)) / logit - 1).abs().max() < 1e-4
    with pytest.raises(ModelfixError, match="unknown LRP composite 'guided_backprop'"):
        lrp(model, x, target, composite="guided_backprop")
    assert _hooks(model) == {}


# ---- relevance share ---------------------------------------------------------------------------------------------


def _halves_model() -> Classifier:
    """1×1 conv (weight 1) → ReLU → Linear(16 → 2) on 4×4 images: class 0 reads only the left half (weights w0 ≥ 0),
    class 1 only the right half. The first layer gets the Flat rule, which for a 1×1 kernel returns each position's
    relevance to that position; the Linear's ε rule gives position i the relevance x_i·w_ti·logit/z = x_i·w_ti.
    So the share of a mask is Σ_mask x·w_t / Σ x·w_t, exactly."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    fc = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        left = torch.zeros(4, 4)
        left[:, :2] = 1
        w = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4) / 16
        fc.weight.copy_(torch.stack([(w * left).flatten(), (w * (1 - left)).flatten()]))
    net = nn.Sequential(OrderedDict([("conv", conv), ("relu", nn.ReLU()), ("flatten", nn.Flatten()), ("fc", fc)]))
    return Classifier(net, InputSpec(1, 4, 4, (0.0,), (1.0,))).eval()


def test_relevance_share_matches_the_closed_form():
    model = _halves_model()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 4, 4, generator=generator) + 0.1
    x[4] = 0.0  # no relevance at all: share 0
    y = torch.tensor([0, 1, 0, 1, 0])
    data = Dataset(x=x, y=y, class_names=["left", "right"])
    quadrant = torch.zeros(5, 1, 4, 4)
    quadrant[:, :, :2, :] = 1  # the top half: a part of each class's half
    shares = relevance_share(model, data, quadrant, batch_size=2, progress=False)
    weights = model.net.fc.weight.detach().reshape(2, 1, 4, 4)
    for i in range(4):
        contribution = (x[i] * weights[y[i]]).double()
        expected = float((contribution * quadrant[i]).sum() / contribution.sum())
        assert shares[i].item() == pytest.approx(expected, abs=1e-5)
    assert shares[4].item() == 0.0
    # the true class is what is explained: a left-half mask holds all of class 0's relevance and none of class 1's
    left = torch.zeros(5, 1, 4, 4)
    left[..., :2] = 1
    shares = relevance_share(model, data, left, progress=False)
    torch.testing.assert_close(shares[:4], torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-5, rtol=0)
    with pytest.raises(ModelfixError, match="relevance mask must have shape"):
        relevance_share(model, data, left[:3], progress=False)


class UnknownBlockNet(nn.Module):
    """Conv → BatchNorm → ReLU → pool → Linear, not an nn.Sequential: no canonizer is known for it."""

    def __init__(self, batchnorm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if batchnorm else nn.Identity()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


def test_conservation_warning_fires_on_a_net_without_canonizer_and_only_there():
    import warnings

    from modelfix.errors import ModelfixWarning
    from modelfix.explain.lrp import lrp

    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    for batchnorm, expect in ((True, True), (False, False)):
        net = UnknownBlockNet(batchnorm).eval()
        if batchnorm:  # running statistics far from (0, 1), so an unmerged BN breaks conservation visibly
            net.bn.running_mean.fill_(0.7)
            net.bn.running_var.fill_(0.05)
        model = Classifier(net, InputSpec(1, 8, 8, (0.0,), (1.0,))).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            relevance, logit = lrp(model, x, 0)
        conserved = relevance.sum(dim=(1, 2, 3)) / logit  # the quantity the warning is about, computed here
        fired = [w for w in caught if issubclass(w.category, ModelfixWarning) and "not conserved" in str(w.message)]
        assert bool(fired) == expect, (batchnorm, conserved)
        if expect:
            assert bool(((conserved - 1).abs() > 0.05).any())
