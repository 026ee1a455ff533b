"""The attack interface every poisoning attack implements, and the registry of attacks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch

from eglib.params import check_int
from eglib.registry import add_entry, check_keywords, lookup

LabelPolicy = Literal["all-to-one", "all-to-all"]
LABEL_POLICIES: tuple[str, ...] = ("all-to-one", "all-to-all")


class Attack(ABC):
    """A backdoor attack: stamps a trigger on uint8 images (N, C, H, W) and picks poisoned labels.

    Subclasses set `name`, `clean_label` (True: only target-class samples are poisoned and
    labels never change) and `needs_fit` (True: `fit` must run on training data first, e.g.
    to train a trigger generator or a surrogate model). Parameters are validated in
    `__init__`; a bad value raises ValueError naming it and what is allowed.
    """

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = False
    # noise-mode samples per poisoned sample (WaNet's cross ratio): `poison_dataset` passes that
    # many further samples through `apply_noise` and keeps their labels; 0 = no noise mode
    cross_ratio: float = 0.0
    _fitted: bool = False  # learned attacks set this to True at the end of `fit`

    def __init__(
        self, target: int = 0, label_policy: str = "all-to-one", num_classes: int = 10
    ) -> None:
        if label_policy not in LABEL_POLICIES:
            raise ValueError(f"label_policy={label_policy!r}; allowed: {LABEL_POLICIES}")
        check_int("num_classes", num_classes, 2)
        if check_int("target", target, 0) >= num_classes:
            raise ValueError(f"target={target}; must be in [0, {num_classes - 1}]")
        if self.clean_label and label_policy != "all-to-one":
            raise ValueError(f"{self.name} is clean-label: label_policy must be 'all-to-one'")
        self.target = target
        self.label_policy = label_policy
        self.num_classes = num_classes

    def fit(  # noqa: B027 (an optional hook: a no-op unless the attack learns its trigger)
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> None:
        """Learn whatever the trigger needs from training data (no-op for fixed triggers)."""

    @property
    def fitted(self) -> bool:
        """Whether `apply` is ready: always for fixed triggers, else once `fit` has run."""
        return not self.needs_fit or self._fitted

    @abstractmethod
    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Return triggered copies of uint8 `images` (N, C, H, W); same shape, dtype and device."""

    def apply_test(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The test-time trigger (what `backdoor_testset` stamps); default: `apply`.

        Overridden by attacks whose training poison carries more than the trigger (lc's and
        advnoise's adversarial noise), which stamp the trigger alone at test time.
        """
        return self.apply(images, labels, generator)

    def apply_noise(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-mode copies of `images` that keep their labels (only where `cross_ratio` > 0)."""
        raise NotImplementedError(f"attack {self.name!r} has no noise mode (cross_ratio = 0)")

    def poison_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels the poisoned samples get: the target (all-to-one) or label + 1 mod classes."""
        if self.clean_label:
            return labels.clone()
        if self.label_policy == "all-to-one":
            return torch.full_like(labels, self.target)
        return (labels + 1) % self.num_classes

    def params(self) -> dict[str, Any]:
        """The attack's parameters as plain JSON data (for result records)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and _is_plain(v)}


def _is_plain(value: object) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, (list, tuple)) and all(_is_plain(v) for v in value)
    )


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: add an attack to the registry under `cls.name`."""
    return add_entry(ATTACKS, "attack", cls.name, cls)


def make_attack(name: str, **params: Any) -> Attack:
    """Build the attack called `name` with `params`; an unknown name or parameter lists the
    allowed ones."""
    builder = lookup(ATTACKS, "attack", name)
    check_keywords(builder, "attack", name, params)
    return builder(**params)
