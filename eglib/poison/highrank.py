"""High-rank adaptive attack: many small random triggers for one target, against spectral guards."""

from __future__ import annotations

from typing import Any

import torch

from eglib.params import check_float, check_int
from eglib.poison.base import Attack, register_attack
from eglib.poison.ops import check_images


@register_attack
class HighRank(Attack):
    """Stamp one of `num_patterns` random sparse white patterns on each image (dirty-label).

    The family is fixed by `seed` and the image size: pattern p is a `size` x `size` window
    at a random position in which each pixel is set (to 255 in every channel) with
    probability `density` (at least one pixel per pattern). Each triggered image gets a
    pattern drawn from the passed generator; all map to the target. The trigger's effect
    therefore spreads over many feature directions instead of one, which is what a defence
    that damps the top singular directions (EigenGuard) relies on. This is the adaptive
    attack the reviewers asked for; it has no BackdoorBench counterpart. Defaults (ours):
    64 patterns of 4 x 4 with density 0.5, on both 28 px and 32 px images. At test time
    every triggered image also gets a random member of the family.
    """

    name = "highrank"

    def __init__(
        self,
        *,
        num_patterns: int = 64,
        size: int = 4,
        density: float = 0.5,
        seed: int = 0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        self.num_patterns = check_int("num_patterns", num_patterns, 1)
        self.size = check_int("size", size, 1)
        self.density = check_float("density", density, low=1e-6, high=1.0)
        self.seed = check_int("seed", seed, 0)

    def family(self, height: int, width: int) -> torch.Tensor:
        """The patterns' pixel masks, bool (num_patterns, 1, height, width)."""
        if self.size > min(height, width):
            raise ValueError(f"size={self.size} does not fit a {height}x{width} image")
        generator = torch.Generator().manual_seed(self.seed)
        p, s = self.num_patterns, self.size
        window = torch.rand(p, s, s, generator=generator) < self.density
        window[~window.flatten(1).any(1), s // 2, s // 2] = True  # no empty pattern
        rows = torch.randint(0, height - s + 1, (p,), generator=generator)
        cols = torch.randint(0, width - s + 1, (p,), generator=generator)
        masks = torch.zeros(p, height, width, dtype=torch.bool)
        offsets = torch.arange(s)
        r = (rows[:, None] + offsets)[:, :, None].expand(p, s, s)
        c = (cols[:, None] + offsets)[:, None, :].expand(p, s, s)
        masks[torch.arange(p)[:, None, None].expand(p, s, s), r, c] = window
        return masks[:, None]

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of `images` (N, C, H, W) uint8, each with one random pattern of the family."""
        check_images(images)
        masks = self.family(*images.shape[2:])
        pick = torch.randint(self.num_patterns, (images.shape[0],), generator=generator)
        stamp = masks[pick].to(images.device)
        return images.masked_fill(stamp, 255)
