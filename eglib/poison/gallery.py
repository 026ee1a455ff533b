"""Example images for the attack gallery figure: clean, triggered and the amplified change."""

from __future__ import annotations

from typing import Any

import torch

from eglib.poison.base import Attack, make_attack
from eglib.poison.ops import check_images


def attack_examples(
    name: str | Attack, images: torch.Tensor, labels: torch.Tensor, seed: int, **params: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean, poisoned, diff_amplified), all uint8 (N, C, H, W), for attack `name` (built
    with `params`) or an attack instance, applied to every image given.

    diff_amplified = |poisoned - clean| * gain with one gain for the whole batch,
    255 / max |difference| (at least 1), so the largest change shows as white and the
    relative sizes of changes across images stay comparable. An attack that needs fitting
    and is not fitted yet is fitted on (images, labels) first.
    """
    check_images(images)
    attack = make_attack(name, **params) if isinstance(name, str) else name
    generator = torch.Generator().manual_seed(seed)
    if not attack.fitted:
        attack.fit(images, labels, generator)
    poisoned = attack.apply(images, labels, generator)
    diff = (poisoned.to(torch.int16) - images.to(torch.int16)).abs().to(torch.float32)
    gain = 255.0 / max(float(diff.max()), 1.0)
    amplified = (diff * gain).round().clamp(0, 255).to(torch.uint8)
    return images.clone(), poisoned, amplified
