"""Clean accuracy (ACC), attack success rate (ASR), and both under the three test protocols.

A guard that filters a batch's spectrum makes a prediction depend on the other images of
its batch, so a guarded model's ACC and ASR are reported under three protocols (see the
spec's "Evaluation protocol"):

- 'per_sample': guards use their running estimates (eval_mode 'running'), so each image is
  classified on its own, as a deployed model would;
- 'mixed': guards filter each batch (eval_mode 'batch'); every batch holds clean test images
  with triggered images spread among them at the poison rate;
- 'pure': guards filter each batch; ACC from batches of clean images only, ASR from batches
  of triggered images only.

Batches of a pass are near-equal in size (`torch.tensor_split`), so no tiny last batch
skews a batch-wise filter. A model without guards gives the same numbers under all three.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from eglib.data import check_paired_images, check_uint8_images, to_float
from eglib.params import check_float, check_int

# A guard's behaviour in eval mode: 'running' filters each sample with its running estimates,
# 'batch' filters each batch as a whole (as in training)
EVAL_MODES: tuple[str, ...] = ("running", "batch")

# The batches of the 'mixed' and 'pure' protocols (a batch-wise guard's ACC and ASR depend on
# it): every table, record and the explorer evaluate at this size.
EVAL_BATCH_SIZE = 256

PROTOCOLS: tuple[str, ...] = ("per_sample", "mixed", "pure")


class TriggeredLike(Protocol):
    """What evaluation needs of `eglib.poison.TriggeredSet`: triggered images and their labels."""

    @property
    def images(self) -> torch.Tensor:
        """Triggered uint8 images (N, C, H, W)."""

    @property
    def labels(self) -> torch.Tensor:
        """The labels the attacker wants (N,)."""

    @property
    def source_labels(self) -> torch.Tensor:
        """The true labels of the images before the trigger (N,)."""


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_labels(labels: torch.Tensor, n: int, name: str) -> None:
    if labels.dtype != torch.int64 or labels.shape != (n,):
        raise ValueError(f"{name} must be int64 ({n},); got {labels.dtype} {tuple(labels.shape)}")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with `model` in eval mode and no gradients; afterwards every submodule
    gets back its own train/eval flag (`model.train(flag)` would set them all to the
    container's, e.g. put a wrapped eval-mode model's BatchNorm layers into train mode)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, flag in flags:
            module.training = flag


def predict_batches(
    model: nn.Module, batches: Sequence[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """Predicted classes (CPU int64) of uint8 batches fed to the model one batch each, in order
    (`evaluating`: eval mode, no gradients, each submodule's train/eval flag restored after)."""
    with evaluating(model):
        preds = [model(to_float(b.to(device))).argmax(1) for b in batches]
    return torch.cat(preds).cpu()


def even_batches(images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Split into ceil(N / batch_size) consecutive batches whose sizes differ by at most one."""
    return torch.tensor_split(images, math.ceil(images.shape[0] / batch_size))


def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Predicted classes (CPU int64 (N,)) of uint8 `images`, in near-equal batches <= batch_size.

    `device` None: the model's device; otherwise the model is moved there.
    """
    check_uint8_images(images)
    check_int("batch_size", batch_size, 1)
    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    return predict_batches(model, even_batches(images, batch_size), dev)


def _acc(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels."""
    return (preds == labels.cpu()).double().mean().item()


def _counted(
    images: torch.Tensor, target_labels: torch.Tensor, source_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The triggered images that count for ASR (source label != target) and their targets."""
    keep = (source_labels != target_labels).nonzero().squeeze(1)
    if keep.numel() == 0:
        raise ValueError("no triggered sample has a source label different from its target")
    return images[keep.to(images.device)], target_labels[keep].cpu()


def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """Fraction of uint8 `images` classified as `labels` (int64 (N,))."""
    check_uint8_images(images)
    _check_labels(labels, images.shape[0], "labels")
    return _acc(predict(model, images, batch_size=batch_size, device=device), labels)


def attack_success_rate(
    model: nn.Module,
    triggered_images: torch.Tensor,
    target_labels: torch.Tensor,
    source_labels: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """Fraction of triggered images classified as their target, among those whose source
    label differs from the target; the others are left out before predicting (ValueError if
    none is left)."""
    check_uint8_images(triggered_images, "triggered_images")
    n = triggered_images.shape[0]
    _check_labels(target_labels, n, "target_labels")
    _check_labels(source_labels, n, "source_labels")
    images, targets = _counted(triggered_images, target_labels, source_labels)
    return _acc(predict(model, images, batch_size=batch_size, device=device), targets)


def attack_success_rates(
    model: nn.Module,
    clean_images: torch.Tensor,
    triggered_images: torch.Tensor,
    target_labels: torch.Tensor,
    source_labels: torch.Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> tuple[float, float | None]:
    """(`attack_success_rate`, the ASR among the images the model classifies correctly
    without the trigger), each image predicted once; both count source label != target, row
    i of `triggered_images` is row i of `clean_images` with the trigger. A model that puts
    every image in the target class scores 100 % on the first and has no image for the
    second: None when none is classified correctly."""
    for images, name in ((clean_images, "clean_images"), (triggered_images, "triggered_images")):
        check_uint8_images(images, name)
    check_paired_images(clean_images, triggered_images)
    n = triggered_images.shape[0]
    _check_labels(target_labels, n, "target_labels")
    _check_labels(source_labels, n, "source_labels")
    counted = (source_labels != target_labels).nonzero().squeeze(1).cpu()
    if counted.numel() == 0:
        raise ValueError("no triggered sample has a source label different from its target")
    rows = counted.to(triggered_images.device)
    hits = predict(model, triggered_images[rows], batch_size=batch_size, device=device)
    clean_rows = clean_images[rows.to(clean_images.device)]
    clean = predict(model, clean_rows, batch_size=batch_size, device=device)
    targets, right = target_labels.cpu()[counted], clean == source_labels.cpu()[counted]
    asr = _acc(hits, targets)
    return asr, (_acc(hits[right], targets[right]) if bool(right.any()) else None)


def find_guards(model: nn.Module) -> list[nn.Module]:
    """The model's guards that have an `eval_mode` (modules in `model.guards`, if any)."""
    guards = getattr(model, "guards", {})
    return [g for g in guards.values() if hasattr(g, "eval_mode")]


@contextmanager
def guards_eval_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Within the block every guard of `model` has `eval_mode = mode`; restored after."""
    guards: list[Any] = find_guards(model)  # Any: nn.Module types attributes as Tensor | Module
    saved = [g.eval_mode for g in guards]
    try:
        for g in guards:
            g.eval_mode = mode
        yield
    finally:
        for g, old in zip(guards, saved, strict=True):
            g.eval_mode = old


def mixed_batches(
    n_clean: int, n_triggered: int, poison_rate: float, batch_size: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index pairs (clean rows, triggered rows) of the batches of the 'mixed' protocol.

    Construction: every clean and every triggered image takes part at least once. The
    triggered images need ceil(n_triggered * (1 - r) / r) clean companions to sit at the
    poison rate r; the clean images are repeated (a fresh seeded permutation each round) when
    there are fewer, and the triggered ones when there are more. Both sequences are split
    into the same number of near-equal chunks, B = ceil(total / batch_size), so every batch
    holds about batch_size images of which a fraction r is triggered. The two orders are
    drawn independently: a triggered image can share its batch with its own clean original
    (measured: 215 of 9000 triggered slots, 2.4 %, for 10000 clean and 9000 triggered test
    images at 10 % in batches of 256, seed 0), and a chunk spanning two permutation rounds
    can hold a clean image twice.
    """
    poison_rate = check_float(
        "poison_rate", poison_rate, low=0.0, high=1.0, low_open=True, high_open=True
    )
    check_int("batch_size", batch_size, 2)  # a mixed batch holds clean and triggered images
    check_int("n_clean", n_clean, 1)
    check_int("n_triggered", n_triggered, 1)
    ratio = poison_rate / (1 - poison_rate)
    slots_clean = max(n_clean, math.ceil(n_triggered / ratio))
    slots_trig = max(n_triggered, round(slots_clean * ratio))
    clean_order = _repeated_permutation(n_clean, slots_clean, generator)
    trig_order = _repeated_permutation(n_triggered, slots_trig, generator)
    n_batches = math.ceil((slots_clean + slots_trig) / batch_size)
    return list(
        zip(
            torch.tensor_split(clean_order, n_batches),
            torch.tensor_split(trig_order, n_batches),
            strict=True,
        )
    )


def _repeated_permutation(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`length` indices in [0, n): seeded permutations of range(n), concatenated and cut."""
    rounds = math.ceil(length / n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(rounds)])[:length]


def _mixed_predictions(
    model: nn.Module,
    clean_images: torch.Tensor,
    triggered_images: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions in mixed batches: (clean rows, their preds, triggered rows, their preds)."""
    inputs = [torch.cat([clean_images[c], triggered_images[t]]) for c, t in batches]
    preds = predict_batches(model, inputs, device)
    sizes = [n for c, t in batches for n in (len(c), len(t))]
    parts = torch.split(preds, sizes)
    clean_rows = torch.cat([c for c, _ in batches])
    trig_rows = torch.cat([t for _, t in batches])
    return clean_rows, torch.cat(parts[0::2]), trig_rows, torch.cat(parts[1::2])


def _per_image_rate(hits: torch.Tensor, rows: torch.Tensor, n: int) -> float:
    """Mean over the distinct images in `rows` of each image's mean hit (equal weight each)."""
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, torch.ones(len(rows)).double())
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, hits.double())
    seen = count > 0
    return (total[seen] / count[seen]).mean().item()


def evaluate_protocols(
    model: nn.Module,
    clean_images: torch.Tensor,
    clean_labels: torch.Tensor,
    triggered: TriggeredLike,
    *,
    poison_rate: float,
    batch_size: int = EVAL_BATCH_SIZE,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """ACC and ASR under the three protocols: {'per_sample'|'mixed'|'pure': {'acc', 'asr'}}.

    `triggered` is a `TriggeredSet` (images, labels = the attacker's targets, source_labels);
    only its samples whose source label differs from the target take part. 'mixed' builds
    its batches with `mixed_batches` (seeded by `seed`): every clean and triggered image takes
    part, repeated where the poison rate needs it; ACC and ASR weigh each image once (the mean
    of its repeats). Guards' eval modes are restored afterwards, even on error. A model with
    no guard predicts each image independently of its batch, so its three protocols are the
    per-sample numbers, computed once (the mixed batches are ~10x the test set at 10 %).
    """
    check_uint8_images(clean_images, "clean_images")
    _check_labels(clean_labels, clean_images.shape[0], "clean_labels")
    trig_x, target, source = triggered.images, triggered.labels, triggered.source_labels
    check_uint8_images(trig_x, "triggered.images")
    _check_labels(target, trig_x.shape[0], "triggered.labels")
    _check_labels(source, trig_x.shape[0], "triggered.source_labels")
    if trig_x.shape[1:] != clean_images.shape[1:]:
        raise ValueError(
            f"triggered images {tuple(trig_x.shape[1:])} and clean images "
            f"{tuple(clean_images.shape[1:])} differ in shape"
        )
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    trig_x, target = _counted(trig_x, target, source)  # the others take no part at all
    clean_labels = clean_labels.cpu()
    batches = mixed_batches(
        clean_images.shape[0],
        trig_x.shape[0],
        poison_rate,
        batch_size,
        torch.Generator().manual_seed(seed),
    )

    def pure() -> dict[str, float]:
        clean = predict_batches(model, even_batches(clean_images, batch_size), dev)
        trig = predict_batches(model, even_batches(trig_x, batch_size), dev)
        return {"acc": _acc(clean, clean_labels), "asr": _acc(trig, target)}

    with guards_eval_mode(model, "running"):
        result = {"per_sample": pure()}
    if not find_guards(model):
        return {protocol: dict(result["per_sample"]) for protocol in PROTOCOLS}
    with guards_eval_mode(model, "batch"):
        c_rows, c_preds, t_rows, t_preds = _mixed_predictions(
            model, clean_images, trig_x, batches, dev
        )
        result["mixed"] = {
            "acc": _per_image_rate(c_preds == clean_labels[c_rows], c_rows, clean_images.shape[0]),
            "asr": _per_image_rate(t_preds == target[t_rows], t_rows, trig_x.shape[0]),
        }
        result["pure"] = pure()
    return result
