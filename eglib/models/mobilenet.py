"""CIFAR-style MobileNetV2 (Sandler et al. 2018): stride-1 3x3 stem, first two strides removed.

Stages 'stem' (32 ch) and 'layer1'..'layer7', one per row of the paper's Table 2 (16, 24, 32,
64, 96, 160, 320 channels; reductions 1, 1, 2, 4, 4, 8, 8). The head holds the 1x1 conv to
1280 channels, global average pool and the linear layer. `default_guard_stage` is 'layer2',
the first stage with a residual connection (the analogue of a ResNet's 'layer1').
"""

from __future__ import annotations

import torch
from torch import nn

from eglib.models.base import StagedNet
from eglib.models.layers import StageSpec, assemble, classifier_head, conv1x1, conv3x3
from eglib.models.registry import register_model

# (expansion t, channels c, blocks n, stride s) per stage; CIFAR: strides of rows 2 and the
# stem set to 1 (ImageNet: 2), so a 32 px input ends at 4 px.
MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def _conv_bn_relu6(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection; skip when shapes match.

    (B, in_channels, H, W) -> (B, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(conv1x1(in_channels, hidden)))
        layers += [
            _conv_bn_relu6(conv3x3(hidden, hidden, stride, groups=hidden)),
            conv1x1(hidden, out_channels),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, plus the input when the shapes match."""
        out = self.block(x)
        return x + out if self.residual else out


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int) -> StagedNet:
    """MobileNetV2 (CIFAR), width 1.0: stages 'stem', 'layer1'..'layer7'; guard default 'layer2'."""
    specs: list[StageSpec] = [
        ("stem", _conv_bn_relu6(conv3x3(in_channels, STEM_CHANNELS)), STEM_CHANNELS, 1)
    ]
    previous = STEM_CHANNELS
    for index, (expansion, width, depth, stride) in enumerate(MOBILENETV2_STAGES):
        blocks = [
            InvertedResidual(
                previous if i == 0 else width, width, stride if i == 0 else 1, expansion
            )
            for i in range(depth)
        ]
        specs.append((f"layer{index + 1}", nn.Sequential(*blocks), width, stride))
        previous = width
    head = classifier_head(
        LAST_CHANNELS, num_classes, [_conv_bn_relu6(conv1x1(previous, LAST_CHANNELS))]
    )
    return assemble(
        specs,
        head,
        num_classes=num_classes,
        in_channels=in_channels,
        default_guard_stage="layer2",
    )
