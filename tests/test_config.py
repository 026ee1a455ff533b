"""Run settings: profiles, device, cache folder, thread limits."""

from __future__ import annotations

import pytest
import torch

from eglib.config import (
    cache_dir,
    default_device,
    exact_torch_threads,
    get_profile,
    torch_threads,
    usable_cpus,
)


def test_profile_from_environment_and_unknown_name(monkeypatch) -> None:
    monkeypatch.setenv("EGLIB_PROFILE", "ci")
    assert get_profile().name == "ci"
    with pytest.raises(ValueError, match="unknown profile 'huge'.*allowed"):
        get_profile("huge")


def test_device_and_cache_overrides(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("EGLIB_DEVICE", "cpu")
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path / "c"))
    assert default_device() == torch.device("cpu")
    assert cache_dir() == tmp_path / "c" and cache_dir().is_dir()


def test_a_device_this_torch_lacks_is_a_value_error(monkeypatch) -> None:
    """EGLIB_DEVICE=gpu was a RuntimeError, `cuda` on a CPU-only torch an AssertionError
    deep in the first run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for wanted, message in (
        ("gpu", "EGLIB_DEVICE='gpu' is not a device; allowed: cpu$"),
        ("cuda", r"EGLIB_DEVICE='cuda': CUDA is not available \(.*\); allowed: cpu$"),
        ("cuda:0", r"EGLIB_DEVICE='cuda:0': CUDA is not available"),
        ("mps", "EGLIB_DEVICE='mps': MPS is not available in this torch; allowed: cpu$"),
        ("meta", "EGLIB_DEVICE='meta': runs do not support 'meta'; allowed: cpu$"),
    ):
        monkeypatch.setenv("EGLIB_DEVICE", wanted)
        with pytest.raises(ValueError, match=message):
            default_device()
    monkeypatch.setenv("EGLIB_DEVICE", "cpu:0")
    assert default_device() == torch.device("cpu:0")


def test_cuda_devices_are_checked_against_the_visible_ones(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for wanted in ("cuda", "cuda:1"):
        monkeypatch.setenv("EGLIB_DEVICE", wanted)
        assert default_device() == torch.device(wanted)
    monkeypatch.setenv("EGLIB_DEVICE", "cuda:2")
    with pytest.raises(
        ValueError, match=r"'cuda:2': there are 2 CUDA device\(s\); allowed: cpu, cuda"
    ):
        default_device()


def test_usable_cpus_are_the_affinity_not_the_machine(monkeypatch) -> None:
    """Workers and threads were counted from os.cpu_count(), all the machine's CPUs, though
    a container or `taskset` may give the process fewer."""
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 3}, raising=False)
    assert usable_cpus() == 2
    monkeypatch.delattr("os.sched_getaffinity", raising=False)  # macOS, Windows
    assert usable_cpus() == 64
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert usable_cpus() == 1


def test_torch_threads_limits_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n=0"), torch_threads(0):
        pass
    with torch_threads(before + 3):  # a limit, never more threads than before
        assert torch.get_num_threads() == before


def test_exact_torch_threads_sets_any_count_and_restores() -> None:
    before = torch.get_num_threads()
    with exact_torch_threads(before + 3):
        assert torch.get_num_threads() == before + 3
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="n=0"), exact_torch_threads(0):
        pass
