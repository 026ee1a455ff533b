"""Time of each poison detector's scoring (`detect`) at the full profile's size.

Synthetic features shaped as a full-profile run's (Fashion-MNIST, cnn-small): --n samples
(57000: the poisoned training set) over 10 labels, pooled last-stage features (n, 64) for
SS, SPECTRE and AC, flattened layer1 features (n, 16*28*28 = 12544) for the EigenGuard
score; 10 % of the samples, all relabelled to label 0, carry a planted direction. Each
detector (default parameters) scores them once, after feature-sized input is in memory;
the table gives wall and process CPU seconds (on shared cores the CPU seconds show the
work done) and the AUROC, as a check that the scores still find the planted poison. Then
ONE line of JSON {detector: wall seconds}, also written to
figures/bench/detection_scoring.json (full size only, not with --n).

    .venv/bin/python bench/detection_scoring.py [--n 57000] [--detectors ss spectre]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eglib.defenses.detection import detection_report, detector_names, make_detector
from eglib.io import write_json_atomic

OUT = Path(__file__).resolve().parents[1] / "figures" / "bench" / "detection_scoring.json"
FULL_N = 57000
POOLED_DIM = 64  # cnn-small's last stage, globally pooled
FLAT_DIM = 16 * 28 * 28  # cnn-small's layer1 (the default guard stage), flattened
LABELS = 10
POISON_RATE = 0.1


def synthetic_features(
    n: int, dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (n, dim) float32, labels (n,), poison indices): Gaussian rows, label i
    shifted along its own direction, the poisoned 10 % relabelled 0 and shifted along one
    more direction."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % LABELS
    features = torch.randn(n, dim, generator=generator)
    directions = torch.randn(LABELS + 1, dim, generator=generator)
    features += 3.0 * directions[labels]
    poison_idx = torch.randperm(n, generator=generator)[: int(POISON_RATE * n)]
    labels[poison_idx] = 0
    features[poison_idx] += 2.0 * directions[LABELS]
    return features, labels, poison_idx


def main() -> None:
    """Parse the options, time each detector, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=FULL_N, help="samples (default: full size)")
    names = detector_names()
    parser.add_argument("--detectors", nargs="+", default=names, choices=names)
    args = parser.parse_args()
    if args.n < 10 * LABELS:
        parser.error(f"--n={args.n}; must be >= {10 * LABELS}")

    print(f"{args.n} samples, {torch.get_num_threads()} threads")
    print(f"{'detector':<18}{'features':>14}{'seconds':>9}{'cpu s':>8}{'AUROC':>7}")
    seconds: dict[str, float] = {}
    for name in args.detectors:
        detector = make_detector(name)
        dim = FLAT_DIM if name == "eigenguard-score" else POOLED_DIM
        features, labels, poison_idx = synthetic_features(args.n, dim)
        wall, cpu = time.perf_counter(), time.process_time()
        found = detector.detect(features, labels)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        auroc = detection_report(found.scores, poison_idx, found.removed)["auroc"]
        seconds[name] = round(wall, 2)
        shape = f"({args.n}, {dim})"
        print(f"{name:<18}{shape:>14}{wall:>9.1f}{cpu:>8.1f}{auroc:>7.2f}", flush=True)
        del features
    if args.n == FULL_N:
        write_json_atomic(OUT, seconds)
    print(json.dumps(seconds))


if __name__ == "__main__":
    main()
