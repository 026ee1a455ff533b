"""CIFAR-style ResNets (He et al. 2016; pre-activation: He et al. 2016b): 3x3 stem, no max-pool.

Stages: 'stem', then one 'layerN' per residual stage ('layer1' stride 1, the rest stride 2).
`default_guard_stage` is 'layer1', the first residual stage (the paper's "head").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from eglib.models.base import StagedNet
from eglib.models.layers import StageSpec, assemble, classifier_head, conv1x1, conv3x3
from eglib.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut, ReLU after the sum.

    (B, in_channels, H, W) -> (B, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv twice plus a shortcut, no activation after the sum.

    (B, in_channels, H, W) -> (B, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv1x1(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output (not activated: the next block or the head normalises it)."""
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


def _resnet(
    widths: Sequence[int],
    depths: Sequence[int],
    num_classes: int,
    in_channels: int,
    *,
    preact: bool = False,
) -> StagedNet:
    """A CIFAR ResNet with `depths[i]` blocks of width `widths[i]` in stage 'layer{i+1}'."""
    block = PreActBlock if preact else BasicBlock
    stem: nn.Module = conv3x3(in_channels, widths[0])
    if not preact:
        stem = nn.Sequential(stem, nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    specs: list[StageSpec] = [("stem", stem, widths[0], 1)]
    previous = widths[0]
    for index, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        stride = 1 if index == 0 else 2
        blocks = [block(previous, width, stride)]
        blocks += [block(width, width, 1) for _ in range(depth - 1)]
        specs.append((f"layer{index + 1}", nn.Sequential(*blocks), width, stride))
        previous = width
    pre = [nn.BatchNorm2d(previous), nn.ReLU(inplace=True)] if preact else []
    return assemble(
        specs,
        classifier_head(previous, num_classes, pre),
        num_classes=num_classes,
        in_channels=in_channels,
        default_guard_stage="layer1",
    )


@register_model("cnn-small")
def cnn_small(num_classes: int, in_channels: int) -> StagedNet:
    """The CPU default: a small ResNet, widths 16/32/64, one BasicBlock per stage (~0.08 M params).

    Stages 'stem' (16 ch, /1), 'layer1' (16, /1), 'layer2' (32, /2), 'layer3' (64, /4);
    guard default 'layer1'.
    """
    return _resnet((16, 32, 64), (1, 1, 1), num_classes, in_channels)


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int) -> StagedNet:
    """ResNet-18 (CIFAR): widths 64..512, blocks 2/2/2/2; stages 'stem', 'layer1'..'layer4'.

    Reductions 1, 1, 2, 4, 8; guard default 'layer1'.
    """
    return _resnet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels)


@register_model("resnet34")
def resnet34(num_classes: int, in_channels: int) -> StagedNet:
    """ResNet-34 (CIFAR): widths 64..512, blocks 3/4/6/3; stages 'stem', 'layer1'..'layer4'.

    Reductions 1, 1, 2, 4, 8; guard default 'layer1'.
    """
    return _resnet((64, 128, 256, 512), (3, 4, 6, 3), num_classes, in_channels)


@register_model("preact-resnet18")
def preact_resnet18(num_classes: int, in_channels: int) -> StagedNet:
    """PreAct ResNet-18 (CIFAR; the usual backdoor benchmark model): stem is a bare 3x3 conv.

    Stages 'stem', 'layer1'..'layer4' (reductions 1, 1, 2, 4, 8); stage outputs are not
    activated (the head applies BN-ReLU before pooling); guard default 'layer1'.
    """
    return _resnet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, preact=True)
