"""CIFAR-style VGG-16 with BatchNorm (Simonyan & Zisserman 2015), global-average-pool head.

Stages 'block1'..'block5' (64, 128, 256, 512, 512 channels): each block after the first
starts with a 2x2 max-pool (ceil mode, so any size >= 16 works), then 3x3 conv-BN-ReLU
layers; reductions 1, 2, 4, 8, 16. The fifth pool of the classic net is replaced by the
head's global average pool. `default_guard_stage` is 'block2' (after four conv layers, as
deep as a ResNet's 'layer1', the paper's early "head").
"""

from __future__ import annotations

from torch import nn

from eglib.models.base import StagedNet
from eglib.models.layers import StageSpec, assemble, classifier_head, conv3x3
from eglib.models.registry import register_model

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (channels, conv layers)


@register_model("vgg16")
def vgg16(num_classes: int, in_channels: int) -> StagedNet:
    """VGG-16-BN (CIFAR): 13 conv layers in 5 blocks, one linear layer; guard default 'block2'."""
    specs: list[StageSpec] = []
    previous = in_channels
    for index, (width, depth) in enumerate(VGG16_BLOCKS):
        layers: list[nn.Module] = []
        if index > 0:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        for _ in range(depth):
            layers += [conv3x3(previous, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            previous = width
        specs.append((f"block{index + 1}", nn.Sequential(*layers), width, 1 if index == 0 else 2))
    return assemble(
        specs,
        classifier_head(previous, num_classes),
        num_classes=num_classes,
        in_channels=in_channels,
        default_guard_stage="block2",
    )
