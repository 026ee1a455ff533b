"""Small tensor operations the attacks share: input checks, rounding, resizing, blurring."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights: the usual RGB -> grayscale conversion (PIL's "L" mode uses them)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless `images` is a uint8 tensor of shape (N, C, H, W) with C in (1, 3)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images.dtype={images.dtype}; allowed: torch.uint8")
    if images.dim() != 4:
        raise ValueError(f"images.shape={tuple(images.shape)}; allowed: (N, C, H, W)")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images have {images.shape[1]} channels; allowed: 1 or 3")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Round float pixel values in [0, 255] units to the nearest integer (ties to even), clip."""
    return images.round().clamp_(0, 255).to(torch.uint8)


def fit_images(images: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Resize uint8 or float (N, C0, h, w) images to float (N, channels, height, width), 0-255.

    Resizing is bilinear with antialiasing; RGB -> 1 channel uses the BT.601 luma weights,
    1 channel -> RGB repeats the channel.
    """
    x = images.to(torch.float32)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True).clamp(0, 255)
    if x.shape[1] == channels:
        return x
    if channels == 1 and x.shape[1] == 3:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=x.dtype, device=x.device)
        return (weights[:, None, None] * x).sum(1, keepdim=True)
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1).clone()
    raise ValueError(f"cannot map {x.shape[1]} channels to {channels}; allowed: 1 <-> 3")


def gaussian_blur_matrices(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Row-stochastic (N, size, size) matrices B with (B @ x) a 1-D Gaussian blur of x, sigma (N,).

    Rows are renormalised at the borders (the truncated kernel sums to one), so a constant
    signal stays constant. A 2-D separable blur of x (N, C, H, W) is `Bh @ x @ Bw^T`.
    """
    pos = torch.arange(size, dtype=torch.float32, device=sigma.device)
    dist2 = (pos[:, None] - pos[None, :]) ** 2
    weights = torch.exp(-dist2[None] / (2 * sigma.to(torch.float32)[:, None, None] ** 2))
    return weights / weights.sum(-1, keepdim=True)
