"""Blended attack (Chen et al. 2017): a fixed image mixed into the whole picture."""

from __future__ import annotations

from typing import Any

import torch

from eglib.params import check_float
from eglib.poison.base import Attack, register_attack
from eglib.poison.ops import check_images, fit_images, to_uint8
from eglib.poison.patterns import cloud_image


@register_attack
class Blend(Attack):
    """x' = round((1 - alpha) * x + alpha * t) for a fixed trigger image t (dirty-label).

    Source defaults (BackdoorBench `config/attack/blended/default.yaml`): the Hello Kitty
    image (`resource/blended/hello_kitty.jpeg`) at alpha 0.2 for training and testing,
    all-to-one, target 0. Adaptation: we cannot ship that image, so t is a 64x64 colour
    1/f-noise "cloud" made from `seed` (`patterns.cloud_image`), resized (bilinear,
    antialiased) to the input size and, for 1-channel data, converted to gray with the
    BT.601 luma weights. `pattern` (uint8 (C, h, w)) replaces it with any image of your own.
    Rounding: computed in float32, rounded to the nearest integer (ties to even), so every
    pixel is within 0.5 of the formula.
    """

    name = "blend"

    def __init__(
        self, *, alpha: float = 0.2, seed: int = 0, pattern: torch.Tensor | None = None, **base: Any
    ) -> None:
        super().__init__(**base)
        check_float("alpha", alpha, low=0.0, high=1.0)
        if alpha == 0:
            raise ValueError("alpha=0 leaves no trigger; must be in (0, 1]")
        if pattern is not None and (pattern.dtype != torch.uint8 or pattern.dim() != 3):
            raise ValueError(
                f"pattern must be a uint8 (C, h, w) tensor, got {pattern.dtype} "
                f"{tuple(pattern.shape)}"
            )
        self.alpha = alpha
        self.seed = seed
        self.pattern_source = "cloud" if pattern is None else "tensor"
        self._pattern = cloud_image(seed) if pattern is None else pattern.cpu()

    def trigger(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The trigger image t as float (channels, height, width) in 0-255 units."""
        return fit_images(self._pattern[None], channels, height, width)[0]

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of `images` (N, C, H, W) uint8 blended with the trigger image."""
        check_images(images)
        trigger = self.trigger(*images.shape[1:]).to(images.device)
        return to_uint8(images.to(torch.float32).mul_(1 - self.alpha).add_(self.alpha * trigger))
