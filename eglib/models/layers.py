"""Pieces every model family shares: convolutions, the classifier head, init, assembly."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from eglib.models.base import StagedNet, StageInfo

StageSpec = tuple[str, nn.Module, int, int]
"""One stage to assemble: (name, module, output channels, stride of the stage)."""


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows or precedes it)."""
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False
    )


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def classifier_head(
    channels: int, num_classes: int, pre: Sequence[nn.Module] = ()
) -> nn.Sequential:
    """`pre` modules, then global average pool and a linear layer: (B, channels, H, W) -> logits."""
    return nn.Sequential(
        *pre, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes)
    )


def init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, BatchNorm to identity, small normal init for linears.

    The fan-out of a grouped (depthwise) convolution counts one group's outputs, as in timm;
    `kaiming_normal_` would count all of them and shrink depthwise weights by sqrt(groups).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = math.prod(module.kernel_size) * module.out_channels // module.groups
            nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)


def assemble(
    specs: Sequence[StageSpec],
    head: nn.Module,
    *,
    num_classes: int,
    in_channels: int,
    default_guard_stage: str,
) -> StagedNet:
    """Build an initialised StagedNet from stage specs; `feature_info` follows from the strides."""
    infos = []
    reduction = 1
    for name, _, channels, stride in specs:
        reduction *= stride
        infos.append(StageInfo(name, channels, reduction))
    net = StagedNet(
        OrderedDict((name, module) for name, module, _, _ in specs),
        head,
        infos,
        num_classes,
        in_channels,
        default_guard_stage=default_guard_stage,
    )
    init_weights(net)
    return net
