"""Shared fixtures: a private cache folder, a tiny synthetic data set for run-level tests, and
a global generator seeded before every test (so no test depends on which ran before it)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_global_generator() -> None:
    """Seed torch's global generator: a test that draws from it (an unseeded model's
    initial weights) sees the same numbers whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Point EGLIB_CACHE at a fresh folder so runs never touch the user's cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EGLIB_CACHE", str(folder))
    return folder


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent blobs on noise: 10 classes, 1x28x28 uint8, learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    rows = (labels * 2 + 4).view(n, 1, 1, 1)
    grid = torch.arange(28).view(1, 1, 28, 1)
    images = torch.where(
        (grid >= rows) & (grid < rows + 3), torch.tensor(200, dtype=torch.uint8), images
    )
    return images, labels.to(torch.int64)


@pytest.fixture
def tiny_fashion(monkeypatch):
    """Replace load_dataset in the experiments layer by a tiny synthetic 28 px set."""
    import eglib.experiments as experiments

    def fake_load(name: str, split: str, root=None):
        return _synthetic(400 if split == "train" else 200, seed=0 if split == "train" else 1)

    monkeypatch.setattr(experiments, "load_dataset", fake_load)
    return fake_load
