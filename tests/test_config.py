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
