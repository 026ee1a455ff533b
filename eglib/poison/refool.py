"""Refool (Liu et al. 2020): reflections of other images, blurred or ghosted, as the trigger."""

from __future__ import annotations

from typing import Any

import torch

from eglib.params import check_float, check_int
from eglib.poison.base import Attack, register_attack
from eglib.poison.ops import check_images, fit_images, gaussian_blur_matrices, to_uint8
from eglib.poison.patterns import dead_leaves

GAMMA = 2.2  # images are mixed in linear light, as in the Refool code: v -> v ** 2.2
SIGMA_LEVELS = 33  # focal-blur sigmas: this many evenly spaced values of sigma_range


@register_attack
class Refool(Attack):
    """Mix a reflection layer into each image: x' = ((1 - alpha) x^g + alpha R(r)^g)^(1/g).

    Per poisoned image (all draws from the passed generator): a reflection image r from a
    bank, and with probability `ghost_rate` a ghost effect R(r) = w r + (1 - w) shift(r)
    (shift by 1..max(1, round(ghost_shift * size)) pixels down and right, edge-replicated,
    w = |b - U(0.15, 0.5)| with b in {0, 1}), else a focal blur R(r) = Gaussian blur of r
    with sigma drawn uniformly from `SIGMA_LEVELS` = 33 evenly spaced values of
    `sigma_range` (steps of 0.125 for [1, 5]). Only the reflections drawn for a batch are
    resized, blurred or shifted (in one vectorised pass), so memory grows with the batch,
    not with the bank. Values in [0, 1], g = 2.2, rounded back to uint8.
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
        if not isinstance(sigma_range, (tuple, list)) or len(sigma_range) != 2:
            raise ValueError(
                f"sigma_range={sigma_range!r}; must be a pair (low, high) of numbers, "
                "0 < low <= high"
            )
        low, high = sigma_range
        check_float("sigma_range[0]", low, low=0, low_open=True)
        check_float("sigma_range[1]", high, low=low)
        check_int("num_reflections", num_reflections, 1)
        check_int("seed", seed, 0)
        if reflections is not None and (
            not isinstance(reflections, torch.Tensor)
            or reflections.dtype != torch.uint8
            or reflections.dim() != 4
            or reflections.shape[0] < 1
            or reflections.shape[1] not in (1, 3)
        ):
            shown = (
                f"{reflections.dtype} {tuple(reflections.shape)}"
                if isinstance(reflections, torch.Tensor)
                else type(reflections).__name__
            )
            raise ValueError(
                f"reflections must be uint8 (R, C, h, w) with R >= 1 and C in (1, 3), got {shown}"
            )
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

    def max_shift(self, height: int, width: int) -> int:
        """The largest ghost shift in pixels on a height x width image (at least 1)."""
        return max(1, round(self.ghost_shift * min(height, width)))

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of `images` (N, C, H, W) uint8 with a random reflection each."""
        check_images(images)
        n, channels, height, width = images.shape
        steps = self.max_shift(height, width)
        pick = torch.randint(self.num_reflections, (n,), generator=generator)
        level = torch.randint(SIGMA_LEVELS, (n,), generator=generator)
        is_ghost = torch.rand(n, generator=generator) < self.ghost_rate
        ghost = is_ghost.nonzero().flatten()
        shift = torch.randint(steps * steps, (len(ghost),), generator=generator)
        weight = (
            torch.randint(0, 2, (len(ghost),), generator=generator)
            - 0.15
            - 0.35 * torch.rand(len(ghost), generator=generator)
        ).abs()
        if n == 0:
            return images.clone()
        # the drawn reflections only (each distinct one resized once), in linear light
        drawn, which = pick.unique(return_inverse=True)
        base = (fit_images(self._bank[drawn], channels, height, width) / 255) ** GAMMA
        layer = torch.empty(n, channels, height, width)
        # focal blur Bh(sigma) @ r @ Bw(sigma)^T, once per distinct (reflection, sigma) drawn
        focal = (~is_ghost).nonzero().flatten()
        pairs, pair_of = (which[focal] * SIGMA_LEVELS + level[focal]).unique(return_inverse=True)
        sigmas = torch.linspace(*self.sigma_range, SIGMA_LEVELS)[pairs % SIGMA_LEVELS]
        rows = gaussian_blur_matrices(sigmas, height)[:, None]
        cols = gaussian_blur_matrices(sigmas, width)[:, None].transpose(-1, -2)
        layer[focal] = (rows @ base[pairs // SIGMA_LEVELS] @ cols)[pair_of]
        # ghost: w r + (1 - w) r shifted by (dy, dx) in 1..steps (edge-replicated), the shift
        # once per distinct (reflection, shift) drawn; shift k = (dy - 1) * steps + (dx - 1)
        pairs, pair_of = (which[ghost] * steps * steps + shift).unique(return_inverse=True)
        source, shift = base[pairs // (steps * steps)], pairs % (steps * steps)
        dy, dx = shift // steps + 1, shift % steps + 1
        row_index = (torch.arange(height)[None] - dy[:, None]).clamp(0, height - 1)  # (P, H)
        col_index = (torch.arange(width)[None] - dx[:, None]).clamp(0, width - 1)  # (P, W)
        shifted = source.gather(2, row_index[:, None, :, None].expand_as(source))
        shifted = shifted.gather(3, col_index[:, None, None, :].expand_as(source))
        w = weight[:, None, None, None]
        layer[ghost] = w * base[which[ghost]] + (1 - w) * shifted[pair_of]
        mixed = images.to(torch.float32).div_(255).pow_(GAMMA).mul_(1 - self.alpha)
        mixed.add_(layer.to(images.device), alpha=self.alpha).clamp_(0, 1).pow_(1 / GAMMA).mul_(255)
        return to_uint8(mixed)


@register_attack
class RefoolClean(Refool):
    """Refool as Liu et al. poison: clean-label (target-class images only, labels kept)."""

    name = "refool-clean"
    clean_label = True
