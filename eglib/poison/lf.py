"""Low-frequency trigger (Zeng et al. 2021): a smooth, fixed additive perturbation."""

from __future__ import annotations

from typing import Any

import torch

from eglib.params import check_float
from eglib.poison.base import Attack, register_attack
from eglib.poison.ops import check_images, to_uint8
from eglib.poison.patterns import lowpass_pattern


@register_attack
class LowFrequency(Attack):
    """x' = clip(round(x + amplitude * p)) for a fixed low-pass pattern p, max |p| = 1.

    p is seeded white noise (independent per channel) with every FFT frequency above
    `max_freq` cycles per image, and the mean, removed (`patterns.lowpass_pattern`); its
    peak is scaled to `amplitude` (uint8 units, an L-infinity budget).
    Source defaults (BackdoorBench `config/attack/lf/*.yaml` and `resource/lowFrequency/`):
    all-to-one, target 0, rate 0.1; the trigger there is a universal adversarial
    perturbation of a clean model, kept smooth by a Gaussian low-pass filter, one stored
    .npy file per data set and model. Adaptation: no clean model is needed here; the
    pattern is random but equally band-limited. amplitude = 20 (about 0.08 * 255, the
    same peak as SIG's delta) and max_freq = 3 are our choices, documented, overridable.
    """

    name = "lf"

    def __init__(
        self, *, amplitude: float = 20.0, max_freq: float = 3.0, seed: int = 0, **base: Any
    ) -> None:
        super().__init__(**base)
        check_float("amplitude", amplitude, low=1e-6, high=255.0)
        check_float("max_freq", max_freq, low=1)  # cycles per image
        self.amplitude = amplitude
        self.max_freq = max_freq
        self.seed = seed

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The additive trigger, float (channels, height, width), max |value| = amplitude."""
        generator = torch.Generator().manual_seed(self.seed)
        return self.amplitude * lowpass_pattern(channels, height, width, self.max_freq, generator)

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of `images` (N, C, H, W) uint8 with the low-frequency pattern added."""
        check_images(images)
        pattern = self.pattern(*images.shape[1:]).to(images.device)
        return to_uint8(images.to(torch.float32).add_(pattern))
