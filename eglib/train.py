"""Train a StagedNet on uint8 tensors: SGD (nesterov) + per-step cosine LR, seeded and resumable.

The whole data set moves to the device once; batches are slices of it, turned into floats and
augmented there (`eglib.data`). Loss and accuracy are summed on the device and read once per
epoch (and about ten times with the progress bar on), never once per step. With
`checkpoint_path` the state after every epoch (model, optimizer, scheduler, RNG states,
history) is written atomically, and a later call with the same path, settings and seed
continues from it, bit for bit: it also trains with the checkpoint's CPU thread count, since
the intra-op thread count changes the order of floating-point sums (measured: 1 vs 2 threads
differ by 1e-5 in the weights after 8 steps, and the runs drift apart from there).
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from eglib.config import default_device, exact_torch_threads
from eglib.data import augment, iterate_batches, to_float
from eglib.evaluate import evaluating
from eglib.io import config_hash, data_fingerprint, load_state, save_state_atomic
from eglib.models.base import StagedNet
from eglib.params import check_bool, check_float, check_int

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def default_pad(image_size: int) -> int:
    """Crop padding used when `TrainSettings.pad` is None: 1/8 of the side from 32 px up
    (32 -> 4, the CIFAR standard), 1/14 below (28 -> 2: Fashion-MNIST and MNIST objects fill
    most of the frame, and a 4-pixel shift of a 28-pixel digit already cuts strokes off)."""
    return max(1, image_size // 8 if image_size >= 32 else image_size // 14)


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one training run (units in the comments); validated on creation:
    numbers must be finite and in range, flags real bools (ValueError naming the field)."""

    epochs: int  # passes over the training set
    batch_size: int  # images per SGD step
    lr: float = 0.05  # peak learning rate; cosine decay to 0 over all steps
    momentum: float = 0.9
    weight_decay: float = 5e-4  # L2 on all parameters
    nesterov: bool = True
    augment: bool = True  # random crop (+ flip if hflip) on each batch
    pad: int | None = None  # crop padding in pixels; None -> default_pad(image size)
    hflip: bool = False  # random horizontal flips; set from eglib.data.dataset_info(name).hflip
    label_smoothing: float = 0.0
    amp: bool = False  # bf16 autocast on CUDA (ignored on other devices)
    channels_last: bool = (
        False  # channels_last memory format (any device; ~1.3x for cnn-small on CPU)
    )

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        if self.pad is not None:
            check_int("pad", self.pad, 0)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        for flag in ("nesterov", "augment", "hflip", "amp", "channels_last"):
            check_bool(flag, getattr(self, flag))
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0 (got momentum=0)")


class Callback(Protocol):
    """Called after every epoch and probe with the model (in eval mode); adds keys to `row`."""

    def on_epoch_end(self, model: StagedNet, epoch: float, row: dict[str, Any]) -> None:
        """Inspect the model after `epoch` epochs (1-based; a fraction at a probe) and add
        values to the row."""


def min_train_batch(model: nn.Module) -> int:
    """Smallest batch a training step accepts: the guards' `min_batch`, and 2 with BatchNorm."""
    guards = getattr(model, "guards", {})
    need = max((int(getattr(g, "min_batch", 1)) for g in guards.values()), default=1)
    if any(isinstance(m, _BATCHNORMS) for m in model.modules()):
        need = max(need, 2)
    return need


def _check_data(model: StagedNet, images: torch.Tensor, labels: torch.Tensor) -> None:
    """ValueError unless images are uint8 (N, C, H, W) and labels int64 (N,) in [0, classes)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be uint8 (N, C, H, W); got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[1] != model.in_channels:
        raise ValueError(
            f"images have {images.shape[1]} channels; the model takes {model.in_channels}"
        )
    if labels.dtype != torch.int64 or labels.dim() != 1:
        raise ValueError(f"labels must be int64 (N,); got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("no training images (N=0)")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= model.num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"label {bad} out of range; must be in [0, {model.num_classes - 1}]")


def check_probe_steps(steps: Sequence[int], name: str = "probe_steps") -> tuple[int, ...]:
    """`steps` as a tuple: ValueError naming `name` unless they are strictly increasing
    optimizer steps (int >= 0)."""
    if (
        isinstance(steps, (str, bytes))
        or not isinstance(steps, Sequence)
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in steps)
        or any(a >= b for a, b in itertools.pairwise(steps))
    ):
        raise ValueError(
            f"{name}={steps!r}; must be strictly increasing optimizer steps (int >= 0)"
        )
    return tuple(steps)


def _probe_set(steps: Sequence[int], steps_per_epoch: int, total_steps: int) -> set[int]:
    """The probe steps as a set: ValueError for one past the run or at an epoch's end."""
    for step in check_probe_steps(steps):
        if step >= total_steps:
            raise ValueError(
                f"probe step {step} is past the run's last step; allowed: 0 to {total_steps - 1}"
            )
        if step > 0 and step % steps_per_epoch == 0:
            raise ValueError(
                f"probe step {step} is the end of epoch {step // steps_per_epoch}, which is "
                f"evaluated anyway; pick a step that is not a multiple of {steps_per_epoch}"
            )
    return set(steps)


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.SGD:
    """SGD with the settings' learning rate, momentum, weight decay and Nesterov switch."""
    return torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        nesterov=settings.nesterov,
    )


def _cosine(total_steps: int) -> Callable[[int], float]:
    """LR factor at optimizer step `step`: cosine from 1 to 0 over `total_steps`."""

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return factor


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to another run (other settings, seed or training data)."""


def _run_fingerprint(settings: TrainSettings, seed: int, n: int) -> str:
    """What a checkpoint must match to be resumed: settings, seed and data set size."""
    return config_hash({"settings": settings, "seed": seed, "n": n})


def train_model(
    model: StagedNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    *,
    seed: int,
    device: str | torch.device | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    eval_fn: Callable[[StagedNet], Mapping[str, float | None]] | None = None,
    probe_steps: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Train `model` in place on uint8 `images` (N, C, H, W) and int64 `labels` (N,).

    Returns the history: one row per epoch {epoch (1-based), step (optimizer steps so far),
    loss, train_acc (on the augmented batches), lr (at the epoch's first step), seconds
    (training time of the epoch, probes included), threads (torch's intra-op CPU threads),
    **eval_fn(model), **keys the callbacks add}. `probe_steps` (optimizer steps, 0: before the
    first) evaluate the model mid-epoch as at an epoch's end (eval mode, then back): each
    gives a row {step, epoch (a fraction), **eval_fn(model), **callbacks' keys, seconds}, kept
    in a list under `probes` in the row of the epoch it fell in. Probes do not change the
    training: the weights are the same with and without them. The model ends
    on `device` (default: `default_device()`) in eval mode. A last batch smaller than
    `min_train_batch(model)` is dropped each epoch. Shuffling, augmentation and any randomness
    inside the model (dropout) come from `seed` only; the caller's global RNG state is left
    untouched. With `checkpoint_path`, an existing checkpoint of the same run (same settings,
    seed, images and labels) is resumed, with the thread count its epochs were trained with
    (the caller's count is restored on return); a different run's raises
    CheckpointMismatchError (one written before checkpoints recorded their data resumes with
    a warning). Bit-identical results
    need the same torch version, device and thread count. `amp` applies on CUDA only.
    """
    _check_data(model, images, labels)
    dev = torch.device(device) if device is not None else default_device()
    n = images.shape[0]
    need = min_train_batch(model)
    if settings.batch_size < need:
        raise ValueError(f"batch_size={settings.batch_size}; this model needs batches >= {need}")
    remainder = n % settings.batch_size
    drop_last = 0 < remainder < need
    steps_per_epoch = n // settings.batch_size + (remainder > 0 and not drop_last)
    if steps_per_epoch == 0:
        raise ValueError(f"{n} training images: fewer than the smallest batch ({need})")
    total_steps = settings.epochs * steps_per_epoch
    probes = _probe_set(probe_steps, steps_per_epoch, total_steps)

    on_cuda = dev.type == "cuda"
    channels_last = settings.channels_last
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = make_optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total_steps))
    generator = torch.Generator().manual_seed(seed)
    fingerprint = _run_fingerprint(settings, seed, n)
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    data = data_fingerprint(images, labels) if ckpt is not None else ""
    history: list[dict[str, Any]] = []
    pad = settings.pad if settings.pad is not None else default_pad(images.shape[-1])

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> the model's float input (augmented, in the right memory format)."""
        x = to_float(batch)
        if settings.augment:
            x = augment(x, pad=pad, hflip=settings.hflip, generator=generator)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def probe(step: int) -> dict[str, Any]:
        """The model's evaluation after `step` optimizer steps, as at an epoch's end."""
        start = time.perf_counter()
        row: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch}
        with evaluating(model):
            if eval_fn is not None:
                row.update(eval_fn(model))
            for callback in callbacks:
                callback.on_epoch_end(model, row["epoch"], row)
        row["seconds"] = time.perf_counter() - start
        return row

    rng_devices = [dev] if on_cuda else []
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=rng_devices, device_type=dev.type))
        torch.manual_seed(seed)
        if ckpt is not None and ckpt.exists():
            history = _resume(ckpt, fingerprint, data, model, optimizer, scheduler, generator, dev)
        threads = int(history[-1].get("threads", 0)) if history else 0
        stack.enter_context(exact_torch_threads(threads or torch.get_num_threads()))
        data_x, data_y = images.to(dev), labels.to(dev)
        for epoch in range(len(history) + 1, settings.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            bar = tqdm(
                total=steps_per_epoch, desc=f"epoch {epoch}/{settings.epochs}", disable=not progress
            )
            batches = iterate_batches(
                data_x,
                data_y,
                settings.batch_size,
                shuffle=True,
                generator=generator,
                drop_last=drop_last,
            )
            first = (epoch - 1) * steps_per_epoch  # optimizer steps before this epoch
            probed = [probe(0)] if epoch == 1 and 0 in probes else []

            def after_step(
                step: int, first: int = first, probed: list[dict[str, Any]] = probed
            ) -> None:
                """Probe the model when `step` of this epoch is one of the probe steps."""
                if first + step in probes:
                    probed.append(probe(first + step))

            loss, acc = _train_epoch(
                model,
                batches,
                prepare,
                optimizer,
                scheduler,
                settings,
                amp=on_cuda and settings.amp,
                bar=bar,
                after_step=after_step if probes else None,
            )
            row: dict[str, Any] = {
                "epoch": epoch,
                "step": first + steps_per_epoch,
                "loss": loss,
                "train_acc": acc,
                "lr": lr,
                "seconds": time.perf_counter() - start,
                "threads": torch.get_num_threads(),
            }
            model.eval()
            if eval_fn is not None:
                row.update(eval_fn(model))
            for callback in callbacks:
                callback.on_epoch_end(model, epoch, row)
            bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()})
            if probed:
                row["probes"] = probed
            history.append(row)
            bar.close()
            if ckpt is not None:
                _save_checkpoint(
                    ckpt, fingerprint, data, model, optimizer, scheduler, generator, history
                )
    model.eval()
    return history


def _train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: TrainSettings,
    *,
    amp: bool,
    bar: tqdm,
    after_step: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """One pass of SGD steps over uint8 `batches`; returns (mean loss, accuracy) of the pass.

    `after_step(step)` runs after each step (1-based within the pass). Loss and correct
    counts are summed on the device and read once at the end; with the progress bar on, its
    postfix also reads them about ten times per pass.
    """
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    refresh = max(1, (bar.total or 0) // 10)
    for step, (batch, labels) in enumerate(batches, 1):
        x = prepare(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits, labels, label_smoothing=settings.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
        bar.update()
        if after_step is not None:
            after_step(step)
        if not bar.disable and step % refresh == 0:
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}"
            )
    return loss_sum.item() / seen, correct.item() / seen


def _save_checkpoint(
    path: Path,
    fingerprint: str,
    data: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    history: list[dict[str, Any]],
) -> None:
    """Write the state after the last epoch of `history` (tensors and plain data only)."""
    state: dict[str, Any] = {
        "fingerprint": fingerprint,
        "data": data,
        "epoch": len(history),
        "history": json.dumps(history),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
        "cpu_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    save_state_atomic(path, state)


def _resume(
    path: Path,
    fingerprint: str,
    data: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Load a checkpoint written by this run into the live objects; return its history."""
    state = load_state(path)
    if state.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"checkpoint {path} belongs to another run (settings, seed or data size differ: "
            f"{state.get('fingerprint')!r} != {fingerprint!r}); delete it or pass another path"
        )
    if "data" not in state:  # written before checkpoints recorded their data
        warnings.warn(
            f"checkpoint {path} does not record its training data; resuming it unchecked",
            stacklevel=3,
        )
    elif state["data"] != data:
        raise CheckpointMismatchError(
            f"checkpoint {path} was trained on other images or labels (data digest "
            f"{state['data']!r} != {data!r}); delete it or pass another path"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # casts its tensors to the params' device
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["cpu_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    history: list[dict[str, Any]] = json.loads(state["history"])
    if len(history) != state["epoch"]:
        raise ValueError(f"checkpoint {path} is inconsistent: epoch {state['epoch']}")
    return history
