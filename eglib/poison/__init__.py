"""Backdoor attacks on uint8 image batches, the poisoned training set and the triggered test set.

Every attack module is imported here so the registry `ATTACKS` is complete:
badnets, blend, sig, wanet, lf, bpp, refool, refool-clean, highrank;
learned (fitted on the training data first): lc, ssba, inputaware, advnoise.
"""

from __future__ import annotations

from eglib.poison import (  # noqa: F401
    advnoise,
    badnets,
    blend,
    bpp,
    highrank,
    inputaware,
    lc,
    lf,
    refool,
    sig,
    ssba,
    wanet,
)
from eglib.poison.base import ATTACKS, Attack, make_attack, register_attack
from eglib.poison.dataset import PoisonedSet, TriggeredSet, backdoor_testset, poison_dataset
from eglib.poison.gallery import attack_examples

__all__ = [
    "ATTACKS",
    "Attack",
    "PoisonedSet",
    "TriggeredSet",
    "attack_examples",
    "backdoor_testset",
    "make_attack",
    "poison_dataset",
    "register_attack",
]
