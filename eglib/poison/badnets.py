"""BadNets (Gu et al. 2017): a small solid square stamped on the image."""

from __future__ import annotations

from typing import Any

import torch

from eglib.params import check_int
from eglib.poison.base import Attack, register_attack
from eglib.poison.ops import check_images

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


@register_attack
class BadNets(Attack):
    """A `size` x `size` square of colour `color` pasted at `location` (dirty-label).

    Source defaults (BackdoorBench `config/attack/badnet/default.yaml` and
    `resource/badnet/generate_white_square.py`): a 3x3 white (255) square in the
    bottom-right corner of a 32 px image, all-to-one, target 0, poison rate 0.1.
    Adaptation: the same 3x3 square in pixels on 28 px grayscale and 32 px colour images
    (no resizing of a 32 px trigger image, so the square stays 3x3 at 28 px).

    Parameters: `size` (side in pixels, >= 1); `location` a corner name from `CORNERS` or a
    (row, col) of the square's top-left pixel; `color` one value in [0, 255] for every
    channel, or one per channel. `base` goes to `Attack` (target, label_policy, num_classes).
    """

    name = "badnets"

    def __init__(
        self,
        *,
        size: int = 3,
        location: str | tuple[int, int] = "bottom-right",
        color: int | tuple[int, ...] = 255,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        check_int("size", size, 1)
        if isinstance(location, str):
            if location not in CORNERS:
                raise ValueError(f"location={location!r}; allowed: {CORNERS} or (row, col)")
        elif not isinstance(location, (tuple, list)) or len(location) != 2:
            raise ValueError(f"location={location!r}; allowed: {CORNERS} or (row, col)")
        else:
            for axis, value in zip(("row", "col"), location, strict=True):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(
                        f"location={location!r}; its {axis} {value!r} must be an int >= 0"
                    )
        if not isinstance(color, (int, tuple, list)):
            raise ValueError(f"color={color!r}; allowed: 1 or 3 values in [0, 255]")
        colors = (color,) if isinstance(color, int) else tuple(color)
        valid = (isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colors)
        if len(colors) not in (1, 3) or not all(valid):
            raise ValueError(f"color={color!r}; allowed: 1 or 3 values in [0, 255]")
        self.size = size
        self.location = location if isinstance(location, str) else tuple(location)
        self.color = color if isinstance(color, int) else colors

    def corner(self, height: int, width: int) -> tuple[int, int]:
        """(row, col) of the square's top-left pixel on a height x width image."""
        if isinstance(self.location, str):
            row = height - self.size if self.location.startswith("bottom") else 0
            col = width - self.size if self.location.endswith("right") else 0
        else:
            row, col = self.location
        if row + self.size > height or col + self.size > width:
            raise ValueError(
                f"a {self.size}x{self.size} square at (row, col)=({row}, {col}) does not fit "
                f"a {height}x{width} image"
            )
        return row, col

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of `images` (N, C, H, W) uint8 with the square pasted on."""
        check_images(images)
        channels, height, width = images.shape[1:]
        colors = (self.color,) if isinstance(self.color, int) else self.color
        if len(colors) not in (1, channels):
            raise ValueError(
                f"color={self.color!r} has {len(colors)} values; images have {channels} channels"
            )
        value = torch.tensor(colors, dtype=torch.uint8, device=images.device).view(-1, 1, 1)
        row, col = self.corner(height, width)
        out = images.clone()
        out[:, :, row : row + self.size, col : col + self.size] = value
        return out
