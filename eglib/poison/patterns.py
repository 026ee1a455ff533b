"""Procedural trigger images made from a seed, so nothing has to be downloaded or shipped.

- `cloud_image`: 1/f ("pink") noise by spectral synthesis; its power spectrum falls as 1/f^2
  like that of natural photographs, so it looks like a coloured cloud. Stands in for the
  Hello Kitty image of the Blended attack.
- `dead_leaves`: the dead-leaves model (occluding discs with power-law radii), a classic
  procedural model of natural images with edges and 1/f statistics. Stands in for the
  PASCAL VOC reflection images of Refool.
- `lowpass_pattern`: white noise with every frequency above a radius removed (low-frequency
  trigger).
"""

from __future__ import annotations

import torch


def _radial_frequency(height: int, width: int) -> torch.Tensor:
    """|f| in cycles per image for each bin of a (height, width) FFT."""
    fy = torch.fft.fftfreq(height) * height
    fx = torch.fft.fftfreq(width) * width
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def cloud_image(
    seed: int, size: int = 64, channels: int = 3, exponent: float = 1.0
) -> torch.Tensor:
    """A uint8 (channels, size, size) 1/f^exponent amplitude-spectrum noise image, each channel
    stretched to [0, 255]; the same seed always gives the same bytes."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(channels, size, size, generator=generator)
    freq = _radial_frequency(size, size)
    amplitude = torch.where(freq > 0, freq.clamp(min=1.0) ** -exponent, torch.zeros_like(freq))
    image = torch.fft.ifft2(torch.fft.fft2(noise) * amplitude).real
    low = image.amin(dim=(1, 2), keepdim=True)
    high = image.amax(dim=(1, 2), keepdim=True)
    return ((image - low) / (high - low) * 255).round().to(torch.uint8)


def dead_leaves(
    count: int, generator: torch.Generator, size: int = 64, channels: int = 3, discs: int = 48
) -> torch.Tensor:
    """`count` uint8 (channels, size, size) dead-leaves images: `discs` discs of random colour
    each, radii drawn from p(r) ~ r^-3 in [0.03, 0.35] * size, later discs on top."""
    r_min, r_max = 0.03 * size, 0.35 * size
    u = torch.rand(count, discs, generator=generator)
    radius = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5  # inverse CDF of r^-3
    centre = torch.rand(count, discs, 2, generator=generator) * size
    colour = torch.randint(0, 256, (count, discs + 1, channels), generator=generator)
    pos = torch.arange(size, dtype=torch.float32) + 0.5
    dy = pos[None, None, :, None] - centre[..., 0, None, None]
    dx = pos[None, None, None, :] - centre[..., 1, None, None]
    inside = dy**2 + dx**2 <= radius[..., None, None] ** 2  # (count, discs, size, size)
    order = torch.arange(1, discs + 1)[None, :, None, None]
    top = (inside * order).amax(dim=1)  # index of the topmost disc, 0 = background
    image = torch.gather(colour, 1, top.reshape(count, -1, 1).expand(-1, -1, channels))
    return image.reshape(count, size, size, channels).permute(0, 3, 1, 2).to(torch.uint8)


def lowpass_pattern(
    channels: int, height: int, width: int, max_freq: float, generator: torch.Generator
) -> torch.Tensor:
    """A float (channels, height, width) zero-mean pattern with max |value| = 1 whose spectrum
    holds only frequencies with 0 < |f| <= max_freq cycles per image (white noise, low-passed)."""
    if max_freq < 1:
        raise ValueError(f"max_freq={max_freq}; must be >= 1 cycle per image")
    noise = torch.randn(channels, height, width, generator=generator)
    freq = _radial_frequency(height, width)
    keep = (freq > 0) & (freq <= max_freq)
    pattern = torch.fft.ifft2(torch.fft.fft2(noise) * keep).real
    return pattern / pattern.abs().amax()
