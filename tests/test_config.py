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
