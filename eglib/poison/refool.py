"""Refool (Liu et al. 2020): reflections of other images, blurred or ghosted, as the trigger."""

from __future__ import annotations

from typing import Any

import torch

from eglib.params import check_float
from eglib.poison.base import Attack, register_attack
from eglib.poison.ops import check_images, fit_images, gaussian_blur_matrices, to_uint8
from eglib.poison.patterns import dead_leaves

GAMMA = 2.2  # images are mixed in linear light, as in the Refool code: v -> v ** 2.2
SIGMA_LEVELS = 33  # focal-blur sigmas: this many evenly spaced values of sigma_range
_Layers = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # bank, blurred, shifted


@register_attack
class Refool(Attack):
    """Mix a reflection layer into each image: x' = ((1 - alpha) x^g + alpha R(r)^g)^(1/g).

    Per poisoned image (all draws from the passed generator): a reflection image r from a
    bank, and with probability `ghost_rate` a ghost effect R(r) = w r + (1 - w) shift(r)
    (shift by 1..max(1, round(ghost_shift * size)) pixels down and right, edge-replicated,
    w = |b - U(0.15, 0.5)| with b in {0, 1}), else a focal blur R(r) = Gaussian blur of r
    with sigma drawn uniformly from `SIGMA_LEVELS` = 33 evenly spaced values of
    `sigma_range` (steps of 0.125 for [1, 5]: the blurred and shifted bank is computed
    once per image shape and each image only picks from it). Values in [0, 1], g = 2.2,
    rounded back to uint8.
    The bank: `reflections` (uint8 (R, C, h, w), e.g. MNIST digits or CIFAR images as
    reflections on Fashion-MNIST), else `num_reflections` dead-leaves images drawn from `seed`
    (`patterns.dead_leaves`), resized to the input and made gray for 1-channel data.
    Source defaults (BackdoorBench `config/attack/refool/default.yaml`, Refool code):
    PASCAL VOC reflection images, ghost_rate 0.49, sigma -1 (random in [1, 5]), alpha_t 0.4
    (the transmission weight in the ghost branch; the original code draws it in
    [0.55, 0.95]), clean_label False, all-to-one, target 0, rate 0.1. Liu et al. poison
    clean-label: use "refool-clean" for that. Adaptations: no VOC images (dead leaves, or
    a tensor you pass); one reflection weight `alpha` = 0.4 for both branches, in the
    range of the original's 1 - alpha_t; ghost shifts of 1-3 px for 28-32 px images (the
    original's 3-8 px are meant for large photos); no brightness correction or vignetting
    mask of the focal branch.
    """

    name = "refool"

    def __init__(
        self,
        *,
        alpha: float = 0.4,
        ghost_rate: float = 0.49,
        sigma_range: tuple[float, float] = (1.0, 5.0),
        ghost_shift: float = 0.1,
        num_reflections: int = 16,
        seed: int = 0,
        reflections: torch.Tensor | None = None,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        check_float("alpha", alpha, low=1e-6, high=1.0)
        check_float("ghost_rate", ghost_rate, low=0.0, high=1.0)
        check_float("ghost_shift", ghost_shift, low=0.0, high=0.5)
        low, high = sigma_range
        check_float("sigma_range[0]", low, low=0, low_open=True)
        check_float("sigma_range[1]", high, low=low)
        if reflections is not None and (reflections.dtype != torch.uint8 or reflections.dim() != 4):
            raise ValueError(
                f"reflections must be uint8 (R, C, h, w), got {reflections.dtype} "
                f"{tuple(reflections.shape)}"
            )
        if reflections is None and num_reflections < 1:
            raise ValueError(f"num_reflections={num_reflections}; must be >= 1")
        self.alpha = alpha
        self.ghost_rate = ghost_rate
        self.sigma_range = (float(low), float(high))
        self.ghost_shift = ghost_shift
        self.seed = seed
        if reflections is None:
            self.reflection_source = "dead-leaves"
            self._bank = dead_leaves(num_reflections, torch.Generator().manual_seed(seed))
        else:
            self.reflection_source = "tensor"
            self._bank = reflections.cpu()
        self.num_reflections = self._bank.shape[0]
        self._layers: dict[tuple[int, int, int], _Layers] = {}

    def max_shift(self, height: int, width: int) -> int:
        """The largest ghost shift in pixels on a height x width image (at least 1)."""
        return max(1, round(self.ghost_shift * min(height, width)))

    def layers(self, channels: int, height: int, width: int) -> _Layers:
        """The bank in linear light, float in [0, 1], and its two effects, precomputed:
        bank (R, C, H, W); blurred (R, L, C, H, W), one per sigma of `SIGMA_LEVELS`;
        shifted (R, S * S, C, H, W), one per ghost shift (dy, dx) in 1..S, S = `max_shift`.
        Cached per image shape."""
        key = (channels, height, width)
        if key not in self._layers:
            self._layers[key] = self._make_layers(channels, height, width)
        return self._layers[key]

    def _make_layers(self, channels: int, height: int, width: int) -> _Layers:
        """Compute what `layers` returns."""
        bank = (fit_images(self._bank, channels, height, width) / 255) ** GAMMA
        sigmas = torch.linspace(*self.sigma_range, SIGMA_LEVELS)
        rows = gaussian_blur_matrices(sigmas, height)[None, :, None]
        cols = gaussian_blur_matrices(sigmas, width)[None, :, None].transpose(-1, -2)
        blurred = rows @ bank[:, None] @ cols
        steps = torch.arange(1, self.max_shift(height, width) + 1)
        dy, dx = (t.flatten() for t in torch.meshgrid(steps, steps, indexing="ij"))
        row_index = (torch.arange(height)[None] - dy[:, None]).clamp(0, height - 1)  # (K, H)
        col_index = (torch.arange(width)[None] - dx[:, None]).clamp(0, width - 1)  # (K, W)
        shifted = bank[:, :, row_index[:, :, None], col_index[:, None, :]].transpose(1, 2)
        return bank, blurred, shifted

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of `images` (N, C, H, W) uint8 with a random reflection each."""
        check_images(images)
        n, channels, height, width = images.shape
        device = images.device
        bank, blurred, shifted = (t.to(device) for t in self.layers(channels, height, width))
        pick = torch.randint(bank.shape[0], (n,), generator=generator).to(device)
        level = torch.randint(SIGMA_LEVELS, (n,), generator=generator).to(device)
        ghost = (torch.rand(n, generator=generator) < self.ghost_rate).nonzero().flatten()
        shift = torch.randint(shifted.shape[1], (len(ghost),), generator=generator)
        weight = (
            torch.randint(0, 2, (len(ghost),), generator=generator)
            - 0.15
            - 0.35 * torch.rand(len(ghost), generator=generator)
        ).abs()
        ghost, shift, w = ghost.to(device), shift.to(device), weight.to(device)[:, None, None, None]
        layer = blurred[pick, level]
        layer[ghost] = w * bank[pick[ghost]] + (1 - w) * shifted[pick[ghost], shift]
        mixed = images.to(torch.float32).div_(255).pow_(GAMMA).mul_(1 - self.alpha)
        mixed.add_(layer, alpha=self.alpha).clamp_(0, 1).pow_(1 / GAMMA).mul_(255)
        return to_uint8(mixed)


@register_attack
class RefoolClean(Refool):
    """Refool as Liu et al. poison: clean-label (target-class images only, labels kept)."""

    name = "refool-clean"
    clean_label = True
