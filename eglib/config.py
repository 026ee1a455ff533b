"""Run settings read in one place: the profile (EGLIB_PROFILE), the device, the cache folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's parser reads PROFILES
    import torch

PROFILE_ENV = "EGLIB_PROFILE"
DEVICE_ENV = "EGLIB_DEVICE"
CACHE_ENV = "EGLIB_CACHE"


@dataclass(frozen=True)
class Profile:
    """How much work a run does: data subset sizes, epochs, seeds, batch size."""

    name: str
    train_size: int | None  # training images used (None: the whole split)
    test_size: int | None  # test images used (None: the whole split)
    epochs: int
    batch_size: int
    seeds: tuple[int, ...]


PROFILES: dict[str, Profile] = {
    # seconds to minutes on 2 CPU cores: notebooks under nbmake, CI
    "ci": Profile("ci", train_size=4000, test_size=1000, epochs=4, batch_size=64, seeds=(0,)),
    # the `make demo` run: a few minutes on 2 CPU cores
    "demo": Profile("demo", train_size=20000, test_size=5000, epochs=4, batch_size=128, seeds=(0,)),
    # the committed figures and tables under figures/: what 2 CPU cores afford in about an hour
    "lite": Profile(
        "lite", train_size=8000, test_size=5000, epochs=4, batch_size=64, seeds=(0, 1, 2)
    ),
    # the research scale (whole data set, 3 seeds): hours on a CPU, minutes on a GPU
    "full": Profile(
        "full", train_size=None, test_size=None, epochs=15, batch_size=128, seeds=(0, 1, 2)
    ),
}


def get_profile(name: str | None = None) -> Profile:
    """Return the named profile, or the one EGLIB_PROFILE names (default `full`)."""
    chosen = name if name is not None else os.environ.get(PROFILE_ENV, "full")
    if chosen not in PROFILES:
        origin = f" (from {PROFILE_ENV})" if name is None else ""
        raise ValueError(f"unknown profile {chosen!r}{origin}; allowed: {sorted(PROFILES)}")
    return PROFILES[chosen]


def default_device() -> torch.device:
    """The device runs use: EGLIB_DEVICE if set (checked), else cuda when available, else cpu."""
    import torch

    wanted = os.environ.get(DEVICE_ENV)
    if wanted:
        return _checked_device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _checked_device(wanted: str) -> torch.device:
    """The device EGLIB_DEVICE names; ValueError naming it and the devices this torch has."""
    import torch

    mps = torch.backends.mps.is_available()
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    allowed = ", ".join(
        ["cpu", *(["cuda", f"cuda:N (N < {cuda})"] if cuda else []), *(["mps"] if mps else [])]
    )
    where = f"{DEVICE_ENV}={wanted!r}"
    try:
        device = torch.device(wanted)
    except RuntimeError:
        raise ValueError(f"{where} is not a device; allowed: {allowed}") from None
    if device.type == "cuda" and not cuda:
        why = "no GPU is visible" if torch.version.cuda else "this torch is built without CUDA"
        raise ValueError(f"{where}: CUDA is not available ({why}); allowed: {allowed}")
    if device.type == "cuda" and device.index is not None and device.index >= cuda:
        raise ValueError(f"{where}: there are {cuda} CUDA device(s); allowed: {allowed}")
    if device.type == "mps" and not mps:
        raise ValueError(f"{where}: MPS is not available in this torch; allowed: {allowed}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{where}: runs do not support {device.type!r}; allowed: {allowed}")
    return device


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def cache_dir() -> Path:
    """Folder for cached models, data and results: EGLIB_CACHE, else ~/.cache/eglib."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root) if root else Path.home() / ".cache" / "eglib"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Within the block torch uses at most `n` intra-op CPU threads; the count is restored after.

    For latency-bound work (tiny batches, thousands of small ops): waking a thread pool costs
    more than it gains, and on a shared CPU a descheduled thread stalls every op.
    """
    import torch

    with exact_torch_threads(min(n, torch.get_num_threads())):
        yield


@contextmanager
def exact_torch_threads(n: int) -> Iterator[None]:
    """Within the block torch uses exactly `n` intra-op CPU threads; the count is restored after.

    The thread count changes the order of floating-point sums, so a run is bit-identical to
    another only at the same count (`eglib.train` resumes a checkpoint at its count).
    """
    import torch

    if n < 1:
        raise ValueError(f"n={n}; must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
