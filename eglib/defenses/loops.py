"""Training loops the defences share: SGD with a custom loss, per-sample losses, phase tagging.

`eglib.train.train_model` is the run's standard recipe (cross-entropy); the defences that
need another objective (NAD's attention distillation, ABL's LGA and unlearning) use `tune`,
which follows the same conventions: the data set moves to the device once, batches are
slices turned into floats and augmented there, randomness comes from a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from eglib.data import augment, iterate_batches, to_float
from eglib.defenses.base import Defense, DefenseContext, train_on
from eglib.models.base import StagedNet
from eglib.train import default_pad, min_train_batch

LossFn = Callable[[StagedNet, torch.Tensor, torch.Tensor], torch.Tensor]
"""(model, float images (B, C, H, W), labels (B,)) -> scalar loss to minimise."""


def cross_entropy(model: StagedNet, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy of the model's logits (the default `LossFn`)."""
    return F.cross_entropy(model(images), labels)


def tune(
    model: StagedNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: LossFn = cross_entropy,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    cosine: bool = True,
    augment_data: bool = True,
    hflip: bool = False,
    progress: bool = False,
    desc: str = "tune",
) -> list[float]:
    """Minimise `loss_fn` over uint8 `images` (N, C, H, W) / `labels` (N,) with SGD (nesterov).

    The learning rate follows a cosine from `lr` to 0 over all steps (`cosine`) or stays at
    `lr`. A last batch smaller than the model accepts (2 with BatchNorm) is dropped. Returns
    the mean loss of each epoch. The model ends in eval mode on `device`.
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"need as many labels as images, and some: {images.shape[0]}, {labels.shape[0]}"
        )
    need = min_train_batch(model)
    if batch_size < need:
        raise ValueError(f"batch_size={batch_size}; this model needs batches >= {need}")
    n = images.shape[0]
    drop_last = 0 < n % batch_size < need
    steps = epochs * (n // batch_size + (n % batch_size > 0 and not drop_last))
    if steps == 0:
        raise ValueError(f"{n} images: fewer than the smallest batch this model trains on ({need})")
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        trainable, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)) if cosine else 1.0,
    )
    generator = torch.Generator().manual_seed(seed)
    pad = default_pad(images.shape[-1])
    data_x, data_y = images.to(device), labels.to(device)
    losses: list[float] = []
    for _ in tqdm(range(epochs), desc=desc, disable=not progress):
        model.train()
        total, seen = torch.zeros((), device=device), 0
        batches = iterate_batches(
            data_x, data_y, batch_size, shuffle=True, generator=generator, drop_last=drop_last
        )
        for xb_uint8, yb in batches:
            xb = to_float(xb_uint8)
            if augment_data:
                xb = augment(xb, pad=pad, hflip=hflip, generator=generator)
            loss = loss_fn(model, xb, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach() * yb.shape[0]
            seen += yb.shape[0]
        losses.append(float(total.item()) / seen)  # one sync per epoch
    model.eval()
    return losses


@torch.no_grad()
def per_sample_loss(
    model: StagedNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """Cross-entropy of every sample (N,) on the CPU: model in eval mode, no augmentation."""
    model.to(device).eval()
    out = []
    for xb, yb in iterate_batches(
        images, labels, batch_size, shuffle=False, generator=None, drop_last=False
    ):
        logits = model(to_float(xb.to(device)))
        out.append(F.cross_entropy(logits, yb.to(device), reduction="none").cpu())
    return torch.cat(out)


def train_phase(
    ctx: DefenseContext,
    model: StagedNet,
    phase: str,
    keep: torch.Tensor | None = None,
    callbacks: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """`train_on` with every history row tagged `phase` (so a record's history shows which run)."""
    history = train_on(ctx, model, keep=keep, callbacks=callbacks)
    for row in history:
        row.setdefault("phase", phase)
    return history


def poisoned_model(defense: Defense, ctx: DefenseContext) -> StagedNet:
    """The defence's model trained on the poisoned data: the context's cached undefended run
    when it offers one (the same training; its key goes to `ctx.reused`), else trained here."""
    model = defense.build_model(ctx)
    cached = ctx.undefended() if ctx.undefended is not None else None
    if cached is None:
        train_phase(ctx, model, "poisoned")
        return model
    state, history, key = cached
    model.load_state_dict(state)
    ctx.history.extend({**row, "phase": "poisoned"} for row in history)
    ctx.reused = key
    return model.to(ctx.device)


def clean_reserve(ctx: DefenseContext, defense: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The context's clean reserve; ValueError naming `defense` when there is none."""
    if ctx.clean_images is None or ctx.clean_labels is None or len(ctx.clean_labels) == 0:
        raise ValueError(
            f"defence {defense!r} needs clean data: ctx.clean_images is empty "
            "(set ExperimentConfig.clean_reserve > 0)"
        )
    return ctx.clean_images, ctx.clean_labels
