"""Poisoned training sets and triggered test sets built from an attack."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from eglib.params import check_float, check_int
from eglib.poison.base import Attack
from eglib.poison.ops import check_images


@dataclass
class PoisonedSet:
    """A training set after poisoning.

    images: uint8 (N, C, H, W), triggered at `poison_idx` (and noise-warped at `noise_idx`);
    labels: int64 (N,), the poisoned rows relabelled by the attack's policy;
    true_labels: the labels before poisoning; poison_idx / noise_idx: sorted int64 rows;
    attack_name / attack_params: the attack, as plain data for result records.
    """

    images: torch.Tensor
    labels: torch.Tensor
    true_labels: torch.Tensor
    poison_idx: torch.Tensor
    attack_name: str
    attack_params: dict[str, Any]
    noise_idx: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))


@dataclass
class TriggeredSet:
    """A test set with the trigger on: images (uint8), labels the attacker wants, the images'
    true (source) labels, and idx, the rows of the clean test set they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    source_labels: torch.Tensor
    idx: torch.Tensor


def poison_dataset(
    images: torch.Tensor, labels: torch.Tensor, attack: Attack, rate: float, seed: int
) -> PoisonedSet:
    """Poison round(rate * N) samples of (images, labels) with `attack`, seeded by `seed`.

    The samples are drawn from the target class for clean-label attacks, from the other
    classes for all-to-one dirty-label attacks, and from all for all-to-all ones; only those
    rows get the trigger (one batched `attack.apply`) and the attack's labels. An attack with
    `cross_ratio` > 0 (WaNet's noise mode) also gets round(cross_ratio * count) further rows
    from the rest, passed through `attack.apply_noise`, labels kept. An attack that
    `needs_fit` and is not `fitted` is first fitted on (images, labels).
    Inputs are left unchanged; same inputs and seed give the same bytes.
    """
    _check_data(images, labels, attack.num_classes)
    check_float("rate", rate, low=0.0, high=1.0, low_open=True)
    check_int("seed", seed, 0)
    generator = torch.Generator().manual_seed(seed)
    _fit_if_needed(attack, images, labels, generator)
    labels_cpu = labels.cpu()
    if attack.clean_label:
        pool, pool_name = (labels_cpu == attack.target).nonzero().flatten(), "target-class"
    elif attack.label_policy == "all-to-one":
        pool, pool_name = (labels_cpu != attack.target).nonzero().flatten(), "non-target"
    else:
        pool, pool_name = torch.arange(len(labels_cpu)), "all"
    count = round(rate * len(labels_cpu))
    if count < 1:
        raise ValueError(f"rate={rate} of {len(labels_cpu)} samples poisons none; raise the rate")
    if count > len(pool):
        raise ValueError(
            f"rate={rate} asks for {count} poisoned samples but {attack.name!r} can only use "
            f"the {len(pool)} {pool_name} samples (target={attack.target}); lower the rate"
        )
    poison_idx = _draw(pool, count, generator)
    out_images, out_labels = images.clone(), labels.clone()
    rows = poison_idx.to(images.device)
    out_images[rows] = attack.apply(images[rows], labels[rows], generator)
    out_labels[rows] = attack.poison_labels(labels[rows])
    noise_idx = torch.empty(0, dtype=torch.int64)
    if attack.cross_ratio > 0:
        rest = torch.ones(len(labels_cpu), dtype=torch.bool)
        rest[poison_idx] = False
        noise_count = round(attack.cross_ratio * count)
        if noise_count > int(rest.sum()):
            raise ValueError(
                f"cross_ratio={attack.cross_ratio} asks for {noise_count} noise samples beside "
                f"{count} poisoned ones, but only {int(rest.sum())} remain; lower the rate"
            )
        noise_idx = _draw(rest.nonzero().flatten(), noise_count, generator)
        noise_rows = noise_idx.to(images.device)
        out_images[noise_rows] = attack.apply_noise(images[noise_rows], generator)
    return PoisonedSet(
        images=out_images,
        labels=out_labels,
        true_labels=labels.clone(),
        poison_idx=poison_idx,
        attack_name=attack.name,
        attack_params=attack.params(),
        noise_idx=noise_idx,
    )


def backdoor_testset(
    images: torch.Tensor, labels: torch.Tensor, attack: Attack, seed: int
) -> TriggeredSet:
    """Trigger a test set: for all-to-one attacks (clean-label ones too) its non-target
    samples, relabelled to the target; for all-to-all ones every sample, labelled y + 1 mod C.
    Seeded by `seed` (for attacks with random triggers). A learned attack must be fitted on
    training data first (ValueError otherwise: fitting here would use the test set)."""
    _check_data(images, labels, attack.num_classes)
    check_int("seed", seed, 0)
    generator = torch.Generator().manual_seed(seed)
    if not attack.fitted:
        raise ValueError(
            f"attack {attack.name!r} is not fitted: fit it on training data first "
            "(poison_dataset does); fitting on the test set would leak test images to the attacker"
        )
    labels_cpu = labels.cpu()
    if attack.label_policy == "all-to-one":
        idx = (labels_cpu != attack.target).nonzero().flatten()
        wanted = torch.full_like(labels_cpu[idx], attack.target)
    else:
        idx = torch.arange(len(labels_cpu))
        wanted = (labels_cpu + 1) % attack.num_classes
    rows = idx.to(images.device)
    return TriggeredSet(
        images=attack.apply_test(images[rows], labels[rows], generator),
        labels=wanted.to(labels.device),
        source_labels=labels[rows].clone(),
        idx=idx,
    )


def _check_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless images are uint8 (N, C, H, W) and labels int64 (N,) in
    [0, num_classes) (the attack's class count, which its label policy relies on)."""
    check_images(images)
    if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"labels must be int64 of shape ({images.shape[0]},), got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels span [{int(labels.min())}, {int(labels.max())}]; the attack has "
            f"num_classes={num_classes}, so they must be in [0, {num_classes - 1}]"
        )


def _fit_if_needed(
    attack: Attack, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> None:
    """Run `attack.fit` on (images, labels) when the attack needs it and has not been fitted."""
    if not attack.fitted:
        attack.fit(images, labels, generator)


def _draw(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct entries of the int64 `pool`, drawn with `generator`, sorted."""
    return pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values
