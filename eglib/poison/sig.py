"""SIG (Barni et al. 2019): a horizontal sinusoid added to target-class images, labels kept."""

from __future__ import annotations

import math
from typing import Any

import torch

from eglib.params import check_float
from eglib.poison.base import Attack, register_attack
from eglib.poison.ops import check_images, to_uint8


@register_attack
class SIG(Attack):
    """x'[i, j] = clip(round(x[i, j] + delta * sin(2 pi j f / m))), m = image width (clean-label).

    The signal varies along the columns j and is the same on every row and channel.
    Source defaults: Barni et al. and BackdoorBench's `utils/bd_img_transform/sig.py` use
    delta = 20, f = 6; BackdoorBench's `config/attack/sig/default.yaml` raises delta to 40
    (its transform also mixes the signal in with a weight, we add it as the paper does).
    Clean-label, all-to-one, target 0. Adaptation: none needed; f counts periods across the
    image width, so 28 px and 32 px images carry the same 6 periods. Pass `delta=40` for
    BackdoorBench's setting.
    """

    name = "sig"
    clean_label = True

    def __init__(self, *, delta: float = 20.0, f: float = 6.0, **base: Any) -> None:
        super().__init__(**base)
        check_float("delta", delta, low=1e-6, high=255.0)
        check_float("f", f, low=0, low_open=True)  # periods across the image width
        self.delta = delta
        self.f = f

    def signal(self, width: int) -> torch.Tensor:
        """The additive signal along a row, float (width,)."""
        j = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * j * self.f / width)).to(torch.float32)

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of `images` (N, C, H, W) uint8 with the sinusoid added."""
        check_images(images)
        signal = self.signal(images.shape[-1]).to(images.device)
        return to_uint8(images.to(torch.float32).add_(signal))
