"""zennit canonizers for timm's ResNets and VGGs (timm is an optional extra; this module is imported only for a
timm network).

zennit's `ResNetCanonizer` recognises torchvision's `BasicBlock`/`Bottleneck` classes only, and its replacement
forward calls `self.relu`; timm's blocks are other classes with `act1`/`act2`(/`act3`), an anti-aliasing `aa`, an
optional `se` and `drop_path`, so it cannot be pointed at them. `TimmResidualCanonizer` gives each timm block the
same treatment: a `Sum` module for the residual `x += shortcut` (so LRP's rule for a sum splits the relevance between
the two branches instead of passing all of it down both), and a forward that is timm's (1.0) with that one change.
BatchNorm is merged into the preceding convolution by zennit's `SequentialMergeBatchNorm`: timm registers conv1, bn1,
…, and downsample's conv before its norm in execution order, which is what that canonizer needs. timm's VGG is a
`features` sequence (conv, optional BN, ReLU, pools) and a `pre_logits` `ConvMlp` of plain convolutions, so the
sequential BN merge is all it needs (as zennit's `VGGCanonizer` for torchvision).

A block missing one of the attributes the replacement forward uses (another timm version) is left alone; the LRP
conservation check (`lrp.check_conservation`) then still warns instead of a silently wrong heatmap.
"""

from __future__ import annotations

import torch
from torch import nn
from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
from zennit.layer import Sum

BASIC = ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se", "drop_path", "downsample", "act2")
BOTTLENECK = ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3", "se", "drop_path",
              "downsample", "act3")


def _residual(block: nn.Module, x: torch.Tensor, shortcut: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """The end of both timm blocks: SE, drop path, downsample, then the add (as a `Sum`) and the last activation."""
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    return act(block.canonizer_sum(torch.stack([shortcut, x], dim=-1)))


def basic_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's `BasicBlock.forward` with the residual add as `self.canonizer_sum`."""
    shortcut = x
    x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
    x = self.bn2(self.conv2(x))
    return _residual(self, x, shortcut, self.act2)


def bottleneck_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm's `Bottleneck.forward` with the residual add as `self.canonizer_sum`."""
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
    x = self.bn3(self.conv3(x))
    return _residual(self, x, shortcut, self.act3)


class TimmResidualCanonizer(AttributeCanonizer):
    """Overloads `forward` and adds `canonizer_sum` on every timm ResNet block (module docstring)."""

    def __init__(self):
        super().__init__(self.attribute_map)

    @staticmethod
    def attribute_map(name: str, module: nn.Module) -> dict | None:
        forward = block_forward(module)
        return None if forward is None else {"forward": forward.__get__(module), "canonizer_sum": Sum()}


def block_forward(module: nn.Module):
    """The replacement forward for a timm ResNet block that has every attribute it uses, else None."""
    from timm.models.resnet import BasicBlock, Bottleneck

    for kind, needed, forward in ((BasicBlock, BASIC, basic_block_forward), (Bottleneck, BOTTLENECK, bottleneck_forward)):
        if isinstance(module, kind) and all(hasattr(module, attr) for attr in needed):
            return forward
    return None


class TimmResNetCanonizer(CompositeCanonizer):
    """BatchNorm merged into the convolutions, residual adds as `Sum` modules: zennit's `ResNetCanonizer` for timm."""

    def __init__(self):
        super().__init__((SequentialMergeBatchNorm(), TimmResidualCanonizer()))


class TimmVGGCanonizer(SequentialMergeBatchNorm):
    """timm's VGG (with or without BN): the sequential BN merge, as zennit's `VGGCanonizer` for torchvision."""


def timm_canonizers(net: nn.Module) -> list:
    """The canonizers of a timm network: ResNet (when every block is one this module knows) and VGG; [] for any
    other (the caller's fallbacks and the conservation warning apply)."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    from timm.models.vgg import VGG

    if isinstance(net, ResNet):
        blocks = [m for m in net.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        return [TimmResNetCanonizer()] if all(block_forward(b) is not None for b in blocks) else []
    if isinstance(net, VGG):
        return [TimmVGGCanonizer()]
    return []
