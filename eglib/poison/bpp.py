"""BppAttack (Wang et al. 2022): colour-depth squeezing, with Floyd-Steinberg dithering."""

from __future__ import annotations

from typing import Any

import torch

from eglib.config import torch_threads
from eglib.params import check_bool, check_int
from eglib.poison.base import Attack, register_attack
from eglib.poison.ops import check_images, to_uint8


def quantize(values: torch.Tensor, levels: int) -> torch.Tensor:
    """Nearest of `levels` evenly spaced values in [0, 255] (float in, float out)."""
    step = 255.0 / (levels - 1)
    return (values / step).round_().clamp_(0, levels - 1).mul_(step)


def floyd_steinberg(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Floyd-Steinberg error diffusion of float (N, C, H, W) images to `levels` values.

    The diffusion runs left to right along a row (7/16 of the error to the right
    neighbour), and each finished row passes 3/16, 5/16, 1/16 of its errors to the row
    below. It is sequential in pixel position only: every step works on all N * C image
    channels at once, on a (H, W, N * C) layout so each step reads contiguous memory, on
    one thread (`torch_threads(1)`: thousands of small ops gain nothing from waking threads).
    """
    n, c, height, width = images.shape
    step = 255.0 / (levels - 1)
    # in units of one level; a fresh contiguous buffer (for C = 1 the reshape is only a view)
    buf = (images.permute(2, 3, 0, 1) / step).reshape(height, width, n * c).contiguous()
    with torch_threads(1):
        out = _diffuse(buf, levels - 1)
    return (out * step).reshape(height, width, n, c).permute(2, 3, 0, 1)


def _diffuse(buf: torch.Tensor, top: int) -> torch.Tensor:
    """Floyd-Steinberg on a (H, W, M) buffer in level units (changed in place) to 0..top."""
    height, width, m = buf.shape
    out = torch.empty_like(buf)
    errors = torch.empty(width, m, dtype=buf.dtype, device=buf.device)
    for i in range(height):
        row = buf[i]
        for j in range(width):
            if j > 0:
                row[j].add_(errors[j - 1], alpha=7 / 16)
            torch.round(row[j], out=out[i, j]).clamp_(0, top)
            torch.sub(row[j], out[i, j], out=errors[j])
        if i + 1 < height:
            below = buf[i + 1]
            below.add_(errors, alpha=5 / 16)
            below[:-1].add_(errors[1:], alpha=3 / 16)
            below[1:].add_(errors[:-1], alpha=1 / 16)
    return out


@register_attack
class Bpp(Attack):
    """Squeeze each channel to `squeeze_num` levels, optionally with dithering (dirty-label).

    Without dithering x' = round(round(x / 255 * (s - 1)) / (s - 1) * 255); with it the
    rounding error is diffused by Floyd-Steinberg (`floyd_steinberg`). Either way each
    channel holds at most `squeeze_num` distinct values.
    Source defaults: BackdoorBench `config/attack/bpp/default.yaml`: squeeze_num 8,
    dithering False, neg_ratio 0.1, all-to-one, target 0, rate 0.1 (its
    `original_default.yaml`: rate 0.2, neg_ratio 0.2, dithering False too). Wang et al.
    use Floyd-Steinberg dithering to keep the squeezed images natural-looking, so our
    default is squeeze_num 8 with dithering on; `dithering=False` gives BackdoorBench's
    default. Not implemented: the paper's contrastive-adversarial negative samples
    (neg_ratio), which need the model under training. Adaptation: none; squeezing is per
    pixel and size-free (the dithering loop is 784 steps at 28 px, 1024 at 32 px).
    """

    name = "bpp"

    def __init__(self, *, squeeze_num: int = 8, dithering: bool = True, **base: Any) -> None:
        super().__init__(**base)
        if check_int("squeeze_num", squeeze_num, 2) > 255:
            raise ValueError(f"squeeze_num={squeeze_num}; must be in [2, 255]")
        self.squeeze_num = squeeze_num
        self.dithering = check_bool("dithering", dithering)

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of `images` (N, C, H, W) uint8 squeezed to `squeeze_num` levels per channel."""
        check_images(images)
        values = images.to(torch.float32)
        if self.dithering:
            return to_uint8(floyd_steinberg(values, self.squeeze_num))
        return to_uint8(quantize(values, self.squeeze_num))
