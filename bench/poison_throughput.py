"""Throughput of every fixed-trigger attack on the 60k Fashion-MNIST training images.

Each attack of the registry that needs no fitting triggers the whole training split at once
(one batched `attack.apply`, uint8 (60000, 1, 28, 28), default parameters, CPU unless
EGLIB_DEVICE says otherwise), after a warm-up on 256 images; the time is the best of
--repeats runs (wall seconds; the table also shows this process's CPU seconds, which on a
shared machine show the work done apart from the wait for a core). Target: <= 2 s per
attack on 2 cores. Prints a table, then ONE line of JSON {attack: wall seconds}, also
written atomically to figures/bench/poison_throughput.json (full runs only, not --limit).

    .venv/bin/python bench/poison_throughput.py [--repeats 1] [--limit N] [--attacks a b]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eglib.config import default_device
from eglib.data import load_dataset
from eglib.io import write_json_atomic
from eglib.poison import ATTACKS, make_attack

OUT = Path(__file__).resolve().parents[1] / "figures" / "bench" / "poison_throughput.json"
TARGET_S = 2.0


def _sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_attack(
    name: str, images: torch.Tensor, labels: torch.Tensor, repeats: int
) -> tuple[float, float]:
    """Best-of-`repeats` (wall, CPU) seconds of one batched `apply` of `name` on `images`.

    CPU seconds are this process's, summed over its threads: on a shared machine they show
    the work done, while wall seconds also count the time spent waiting for a core.
    """
    attack = make_attack(name)
    attack.apply(images[:256], labels[:256], torch.Generator().manual_seed(0))  # warm-up
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        generator = torch.Generator().manual_seed(0)
        _sync(images.device)
        wall, cpu = time.perf_counter(), time.process_time()
        attack.apply(images, labels, generator)
        _sync(images.device)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main() -> None:
    """Parse the options, time each attack, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per attack (best is kept)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images")
    fixed = sorted(name for name, cls in ATTACKS.items() if not cls.needs_fit)
    parser.add_argument("--attacks", nargs="+", default=fixed, choices=fixed)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}; must be >= 1")

    device = default_device()
    images, labels = load_dataset("fashion-mnist", "train")
    images, labels = images[: args.limit].to(device), labels[: args.limit].to(device)
    n = images.shape[0]
    print(f"{n} images {tuple(images.shape[1:])} on {device}, {torch.get_num_threads()} threads")
    print(f"{'attack':<14}{'seconds':>9}{'cpu s':>8}{'images/s':>12}  target <= {TARGET_S:.0f} s")
    seconds: dict[str, float] = {}
    for name in args.attacks:
        wall, cpu = time_attack(name, images, labels, args.repeats)
        seconds[name] = round(wall, 3)
        flag = "ok" if wall <= TARGET_S else "SLOW"
        print(f"{name:<14}{wall:>9.3f}{cpu:>8.2f}{n / wall:>12.0f}  {flag}")
    if args.limit is None:
        write_json_atomic(OUT, seconds)
    print(json.dumps(seconds))


if __name__ == "__main__":
    main()
