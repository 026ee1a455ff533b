"""Adaptive attack (reviewers' ask): adversarial noise breaking natural features, then BadNets."""

from __future__ import annotations

from typing import Any

import torch

from eglib.poison._fitted import check_labelled
from eglib.poison._surrogate import SurrogateAttack
from eglib.poison.badnets import BadNets
from eglib.poison.base import register_attack


@register_attack
class AdversarialNoiseBadNets(SurrogateAttack):
    """Dirty-label BadNets whose poisoned images first get PGD noise against their own class.

    Every image `apply` poisons (they all become target-class training samples) is moved by
    untargeted L_inf PGD away from its true label on a surrogate trained on the clean data,
    as lc does, so its natural features no longer support its source class; then the BadNets
    square is pasted on and `poison_labels` relabels it (all-to-one by default; the
    "target-class images" of the request are the images that become target-class samples:
    `poison_dataset` draws dirty-label all-to-one rows from the other classes). The
    question it asks EigenGuard: does the trigger stay a dominant, low-rank direction when the
    poisoned samples' natural features are broken, or does the network now fit them with
    many directions? The test-time trigger (`apply_test`, used by `backdoor_testset`) is
    the BadNets square alone: the noise is a property of the training poison, and adding it
    to test images would mix a transfer adversarial attack into the ASR.

    Source defaults: none (an adaptive attack asked for in the reviews); the parts keep
    their references' defaults: BadNets as `eglib.poison.badnets.BadNets` (3x3 white square,
    bottom-right), PGD and surrogate as in `SurrogateAttack` / lc (eps 8/255, 20 steps of
    2/255, random start from the `apply` generator, cnn-small surrogate shared with lc).
    Parameters: `size`, `location`, `color` go to BadNets; PGD and surrogate parameters as
    in `SurrogateAttack`; `fit_size`, `progress` as in `FittedAttack`.
    """

    name = "advnoise"

    def __init__(
        self,
        *,
        size: int = 3,
        location: str | tuple[int, int] = "bottom-right",
        color: int | tuple[int, ...] = 255,
        **rest: Any,
    ) -> None:
        super().__init__(**rest)
        self._badnets = BadNets(
            size=size,
            location=location,
            color=color,
            target=self.target,
            label_policy=self.label_policy,
            num_classes=self.num_classes,
        )
        self.size = self._badnets.size
        self.location = self._badnets.location
        self.color = self._badnets.color

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """PGD away from `labels` on every row (random start from `generator`), then BadNets."""
        check_labelled(images, labels)
        noisy = self.adversarial(images, labels, generator)
        return self._badnets.apply(noisy, labels, generator)

    def apply_test(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The test-time trigger: the BadNets square alone (needs no fit)."""
        return self._badnets.apply(images, labels, generator)
