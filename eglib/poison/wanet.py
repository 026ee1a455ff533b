"""WaNet (Nguyen & Tran 2021): a fixed smooth warp of the image as the trigger."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from eglib.params import check_float, check_int
from eglib.poison.base import Attack, register_attack
from eglib.poison.ops import check_images, to_uint8


@register_attack
class WaNet(Attack):
    """Warp every image by one fixed, seeded, smooth flow field (dirty-label), with noise mode.

    The field: a (2, k, k) control grid drawn uniformly in [-1, 1] from `seed`, divided by
    its mean absolute value, upsampled bicubically (align_corners) to H x W; the sampling
    grid is clamp((identity + s * field / size) * grid_rescale, -1, 1) in grid_sample's
    [-1, 1] coordinates (size = W for x, H for y), applied with bilinear `grid_sample`
    (align_corners=True) and rounded to uint8. With s = 0 and grid_rescale = 1 it is the
    identity.
    Noise mode: `apply_noise` adds to that grid a fresh uniform [-1, 1] / size offset per
    sample and pixel; `poison_dataset` takes `cross_ratio` x (poisoned count) further samples
    outside the poisoned ones, warps them so and keeps their labels, so the network must
    learn the exact warp, not "any warp".
    Source defaults (BackdoorBench `config/attack/wanet/default.yaml`, Nguyen & Tran):
    k = 4, s = 0.5, grid_rescale = 1, cross_ratio = 2, all-to-one, target 0, rate 0.1.
    Adaptation: none; the field is built at the input size, so 28 px and 32 px images get
    the same warp in relative units. (BackdoorBench also trains with random crop and
    rotation; augmentation belongs to the training loop here.)
    """

    name = "wanet"

    def __init__(
        self,
        *,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
        seed: int = 0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        check_int("k", k, 2)  # the control grid's size
        check_float("s", s, low=0)
        check_float("grid_rescale", grid_rescale, low=0, low_open=True)
        check_float("cross_ratio", cross_ratio, low=0)
        self.k = k
        self.s = s
        self.grid_rescale = grid_rescale
        self.cross_ratio = cross_ratio
        self.seed = seed
        control = torch.rand(1, 2, k, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        self._control = control / control.abs().mean()

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The fixed sampling grid, float (1, height, width, 2) in grid_sample's (x, y) order."""
        if height < self.k or width < self.k:
            raise ValueError(f"images of {height}x{width} are smaller than the k={self.k} grid")
        field = F.interpolate(
            self._control, size=(height, width), mode="bicubic", align_corners=True
        ).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij"
        )
        identity = torch.stack((xs, ys), dim=-1)[None]
        scale = torch.tensor([width, height], dtype=torch.float32)
        return ((identity + self.s * field / scale) * self.grid_rescale).clamp(-1, 1)

    def _warp(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Sample uint8 `images` at `grid` (N or 1, H, W, 2), bilinear, back to uint8."""
        grid = grid.to(images.device).expand(images.shape[0], -1, -1, -1)
        warped = F.grid_sample(
            images.to(torch.float32),
            grid,
            mode="bilinear",
            padding_mode="border",
            align_corners=True,
        )
        return to_uint8(warped)

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of `images` (N, C, H, W) uint8 warped by the fixed field."""
        check_images(images)
        return self._warp(images, self.grid(*images.shape[2:]))

    def apply_noise(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Copies warped by the fixed field plus a random per-sample offset (labels kept)."""
        check_images(images)
        n, _, height, width = images.shape
        offset = torch.rand(n, height, width, 2, generator=generator) * 2 - 1
        scale = torch.tensor([width, height], dtype=torch.float32)
        return self._warp(images, (self.grid(height, width) + offset / scale).clamp(-1, 1))
