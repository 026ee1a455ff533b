"""Training-step overhead of EigenGuard: no guard vs the Gram guard vs a naive full-SVD guard.

One SGD step (forward + backward + update) of make_model('cnn-small', 10, 1) on a batch of
128 random 1x28x28 images, with the guard at the model's default stage (D = 16*28*28 =
12544). The three models are timed round-robin in one run (warm-up, then the median over
--steps; the order rotates each round), so ratios share the machine's load. The table also
shows the minimum and the process CPU time, less sensitive to other processes on shared
cores. Then ONE line of JSON (wall-clock medians), also written to
figures/bench/guard_overhead.json.

    .venv/bin/python bench/guard_overhead.py [--steps 20] [--warmup 3] [--k 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from eglib.config import default_device
from eglib.guard import insert_guard, svd_filter
from eglib.io import write_json_atomic
from eglib.models import StagedNet, make_model

OUT = Path(__file__).resolve().parents[1] / "figures" / "bench" / "guard_overhead.json"


class NaiveSVDGuard(nn.Module):
    """The same filter through torch.linalg.svd of the (B, D) batch, autograd through the SVD."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Filter with the full SVD (slow reference)."""
        return svd_filter(x, self.k)


def _sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(
    models: dict[str, StagedNet], batch: int, steps: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU milliseconds of each timed SGD step, measured round-robin."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    optimisers = {
        n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for n, m in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(warmup + steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate: no order bias
            model = models[name]
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            optimisers[name].zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimisers[name].step()
            _sync(device)
            if i >= warmup:
                times[name].append(1e3 * (time.perf_counter() - start))
                cpu[name].append(1e3 * (time.process_time() - start_cpu))
    return times, cpu


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark; print the table and the JSON line; write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--k", type=int, default=8, help="guard rank k")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default=None, help="default: eglib.config.default_device()")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()

    torch.manual_seed(0)
    plain = make_model("cnn-small", 10, 1)
    gram, naive = copy.deepcopy(plain), copy.deepcopy(plain)
    insert_guard(gram, k=args.k)
    naive.guards[gram.default_guard_stage] = NaiveSVDGuard(args.k)
    models = {"plain": plain, "gram": gram, "svd": naive}
    for model in models.values():
        model.to(device).train()
    times, cpu = _time_steps(models, args.batch, args.steps, args.warmup, device)
    ms = {name: statistics.median(values) for name, values in times.items()}
    cpu_ms = {name: statistics.median(values) for name, values in cpu.items()}

    print(
        f"guard at {gram.default_guard_stage!r}, k={args.k}, batch {args.batch}, 1x28x28, "
        f"{device}, {torch.get_num_threads()} threads, median of {args.steps} steps"
    )
    print(f"{'':<8}{'wall ms (median)':>18}{'wall ms (min)':>18}{'CPU ms (median)':>18}")
    for name, value in ms.items():
        fastest, plain_fastest = min(times[name]), min(times["plain"])
        print(
            f"{name:<8}{value:>10.1f} x{value / ms['plain']:<6.2f}"
            f"{fastest:>10.1f} x{fastest / plain_fastest:<6.2f}"
            f"{cpu_ms[name]:>10.1f} x{cpu_ms[name] / cpu_ms['plain']:<6.2f}"
        )
    result: dict[str, object] = {
        "plain_ms": round(ms["plain"], 2),
        "gram_ms": round(ms["gram"], 2),
        "svd_ms": round(ms["svd"], 2),
        "gram_ratio": round(ms["gram"] / ms["plain"], 3),
        "svd_ratio": round(ms["svd"] / ms["plain"], 3),
        "device": str(device),
        "torch": torch.__version__,
    }
    write_json_atomic(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
