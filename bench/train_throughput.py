"""Training-loop throughput: `train_model` against a bare forward + backward + SGD step.

Both train the same model (cnn-small by default) from the same initial weights on the same
batches: the loop does everything `train_model` does (uint8 -> float, crop + flip
augmentation on the device, cosine LR, loss/accuracy bookkeeping, progress off); the bare
step gets those batches ready-made as floats. Their images/s ratio is the loop's overhead
(target >= 0.9). Runs alternate loop / bare `--repeats` times; the medians are reported.
Also timed with channels_last (CPU) or with bf16 autocast + channels_last (CUDA).

Usage: python bench/train_throughput.py [--n 4096] [--batch-size 128] [--repeats 3]
Prints a table, then one line of JSON, also written to figures/bench/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from eglib.config import default_device
from eglib.data import augment, iterate_batches, to_float
from eglib.io import environment_info, write_json_atomic
from eglib.models import make_model
from eglib.models.base import StagedNet
from eglib.train import TrainSettings, default_pad, make_optimizer, train_model

OUT = Path(__file__).resolve().parents[1] / "figures" / "bench" / "train_throughput.json"
SHAPE = (1, 28, 28)  # Fashion-MNIST-sized input
CLASSES = 10


class _Clock:
    """Wall and process-CPU seconds of a block (CUDA synchronised at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall = self.cpu = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> _Clock:
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _fresh_model(name: str, device: torch.device) -> StagedNet:
    """The same initial weights every time."""
    torch.manual_seed(0)
    return make_model(name, CLASSES, in_channels=SHAPE[0]).to(device)


def time_loop(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    device: torch.device,
) -> tuple[int, float, float]:
    """(images, wall s, CPU s) of one epoch of `train_model` (the whole call)."""
    model = _fresh_model(name, device)
    with _Clock(device) as clock:
        train_model(model, images, labels, settings, seed=0, device=device, progress=False)
    return images.shape[0] // settings.batch_size * settings.batch_size, clock.wall, clock.cpu


def premade_batches(
    images: torch.Tensor, labels: torch.Tensor, settings: TrainSettings, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The float batches one epoch of the loop would see (shuffled, augmented), on `device`."""
    generator = torch.Generator().manual_seed(0)
    pad = default_pad(images.shape[-1])
    batches = []
    for xb, yb in iterate_batches(
        images.to(device),
        labels.to(device),
        settings.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=True,
    ):
        x = augment(to_float(xb), pad=pad, hflip=settings.hflip, generator=generator)
        if settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, yb))
    return batches


def time_bare(
    name: str,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    settings: TrainSettings,
    device: torch.device,
) -> tuple[int, float, float]:
    """(images, wall s, CPU s) of forward + loss + backward + SGD step over ready-made batches."""
    model = _fresh_model(name, device).train()
    amp = settings.amp and device.type == "cuda"
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = make_optimizer(model, settings)
    with _Clock(device) as clock:
        for x, y in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return sum(len(y) for _, y in batches), clock.wall, clock.cpu


def measure(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    device: torch.device,
    repeats: int,
) -> dict[str, float]:
    """Median images/s (wall, and per process-CPU second) of the loop and the bare step.

    The two alternate `repeats` times after a warm-up of each. Images per CPU second tell
    what one dedicated core would do when other processes share the machine's cores.
    """
    batches = premade_batches(images, labels, settings, device)
    warm = 4 * settings.batch_size
    time_loop(name, images[:warm], labels[:warm], settings, device)
    time_bare(name, batches[:4], settings, device)
    runs: dict[str, list[tuple[int, float, float]]] = {"loop": [], "bare": []}
    for _ in range(repeats):
        runs["loop"].append(time_loop(name, images, labels, settings, device))
        runs["bare"].append(time_bare(name, batches, settings, device))
    out: dict[str, float] = {}
    for key, timings in runs.items():
        out[f"{key}_img_s"] = statistics.median(n / wall for n, wall, _ in timings)
        out[f"{key}_img_per_cpu_s"] = statistics.median(n / cpu for n, _, cpu in timings)
    out["ratio"] = out["loop_img_s"] / out["bare_img_s"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table and a JSON line, write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--n", type=int, default=4096, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: eglib.config.default_device()")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, *SHAPE), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, CLASSES, (args.n,), generator=generator)
    on_cuda = device.type == "cuda"
    variants = {  # augmentation on (the default) in both
        "fp32": TrainSettings(epochs=1, batch_size=args.batch_size, hflip=True),
        "bf16_channels_last" if on_cuda else "channels_last": TrainSettings(
            epochs=1, batch_size=args.batch_size, hflip=True, amp=on_cuda, channels_last=True
        ),
    }
    results = {
        k: measure(args.model, images, labels, s, device, args.repeats) for k, s in variants.items()
    }

    print(f"{'variant':<20} {'loop img/s':>11} {'bare img/s':>11} {'ratio':>6} {'img/CPU-s':>17}")
    for key, r in results.items():
        per_cpu = f"{r['loop_img_per_cpu_s']:.0f} / {r['bare_img_per_cpu_s']:.0f}"
        print(
            f"{key:<20} {r['loop_img_s']:>11.0f} {r['bare_img_s']:>11.0f} {r['ratio']:>6.3f} "
            f"{per_cpu:>17}"
        )
    env = environment_info(device)
    record: dict[str, Any] = {
        **results["fp32"],
        "device": str(device),
        "device_name": env["device_name"],
        "torch": env["torch"],
        "model": args.model,
        "batch_size": args.batch_size,
        "n": args.n,
        "input": list(SHAPE),
        "repeats": args.repeats,
        "torch_threads": env["torch_threads"],
        "cpu_count": env["cpu_count"],
        "load_avg_1m": os.getloadavg()[0],
    }
    record.update({k: v for k, v in results.items() if k != "fp32"})
    write_json_atomic(args.out, record)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
