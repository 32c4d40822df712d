"""LRP canonizers for timm's ResNets and VGGs (modelfix.explain.timm_canonizers); skipped without timm.

The references are independent of the canonizers: relevance must sum to the explained logit (LRP's conservation,
which a residual add left to plain autograd breaks by a factor 2 per block), and on a VGG with BatchNorm the heatmap
must equal the heatmap of a copy whose BN was folded into the convolutions by hand (the folding re-typed below).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from modelfix.card import InputSpec  # noqa: E402
from modelfix.errors import ModelfixWarning  # noqa: E402
from modelfix.explain.lrp import canonizers_for, lrp  # noqa: E402
from modelfix.zoo import Classifier  # noqa: E402


def timm_model(name: str, seed: int = 0, low: float = 0.5, **kwargs) -> Classifier:
    """A random timm net at 32×32 with BN statistics far from (0, 1), so merging them matters; BN scales drawn from
    U(low, 1.5)."""
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, num_classes=4, **kwargs)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(low, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return Classifier(net, InputSpec(3, 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))).eval()


def inputs(model: Classifier, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.mark.parametrize("name, canonizer", [("resnet18", "TimmResNetCanonizer"), ("resnet50", "TimmResNetCanonizer"),
                                             ("vgg11", "TimmVGGCanonizer"), ("vgg11_bn", "TimmVGGCanonizer")])
def test_timm_resnets_and_vggs_conserve_relevance(name, canonizer):
    kwargs = {"mlp_ratio": 1 / 64} if name.startswith("vgg") else {}  # a narrow pre_logits ConvMlp: a fast test
    model = timm_model(name, **kwargs)
    assert [type(c).__name__ for c in canonizers_for(model.net)] == [canonizer]
    x, target = inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelfixWarning)
        relevance, logit = lrp(model, x, target)
    ratio = relevance.sum(dim=(1, 2, 3)) / logit
    assert (ratio - 1).abs().max() < 1e-4, ratio  # measured ≈ 1e-5; unsummed residuals give 256 (resnet18)
    with torch.no_grad():  # the canonized forward (BN merged, residual Sum) computes the same logit
        expected = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(logit, expected, rtol=1e-3, atol=1e-3)


def folded(model: Classifier) -> Classifier:
    """A copy with every Conv2d→BatchNorm2d of `features` folded by hand: w' = w·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β,
    the BN replaced by Identity."""
    copy_ = copy.deepcopy(model)
    layers = copy_.net.features
    for i in range(1, len(layers)):
        conv, bn = layers[i - 1], layers[i]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            scale = bn.weight.data / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias.data if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.data = conv.weight.data * scale[:, None, None, None]
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.data)
            layers[i] = nn.Identity()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy_.modules())
    return copy_


def test_timm_vgg_bn_heatmap_equals_the_heatmap_of_the_hand_folded_net():
    # BN scales of both signs: with zeroed biases a positive per-channel scale cancels in the z⁺ rule, so only a
    # negative one (which flips which weights count as positive) tells a merged BN from an unmerged one
    model = timm_model("vgg11_bn", low=-1.5, mlp_ratio=1 / 64)
    x, target = inputs(model)
    relevance, _ = lrp(model, x, target)
    reference, _ = lrp(folded(model), x, target)
    error = float((relevance - reference).norm() / reference.norm())
    assert error < 1e-3, error  # measured 2e-5 (float32 folding order); with BN left unmerged 3e-2


def test_a_timm_net_without_a_canonizer_still_warns():
    torch.manual_seed(0)
    model = Classifier(timm.create_model("regnetx_002", pretrained=False, num_classes=4),
                       InputSpec(3, 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))).eval()
    assert canonizers_for(model.net) == []
    x, target = inputs(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        relevance, logit = lrp(model, x, target)
    ratio = relevance.sum(dim=(1, 2, 3)) / logit
    assert bool(((ratio - 1).abs() > 0.05).any())  # really not conserved: the warning is about this
    assert any(issubclass(w.category, ModelfixWarning) and "not conserved" in str(w.message) for w in caught)


def test_a_timm_resnet_block_of_another_shape_gets_no_canonizer():
    """A block missing an attribute the replacement forward uses (another timm version) is not canonized: the whole
    net falls back to no canonizer, so the conservation warning can fire instead of a silently wrong heatmap."""
    net = timm.create_model("resnet18", pretrained=False, num_classes=4)
    del net.layer2[1].aa
    assert canonizers_for(net) == []
