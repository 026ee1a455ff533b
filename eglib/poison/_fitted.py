"""Learned attacks: fit once on (clean) training data, cache the fitted tensors on disk, then apply.

A `FittedAttack` subclass says which of its parameters shape the fitted state
(`fit_param_names`) and implements `_train` (learn from data -> dict of tensors) and `_load`
(rebuild its networks from such a dict). `fit` draws one seed from the caller's generator,
keys a cache file on (cache tag, state version, fit parameters, data fingerprint, seed) and
trains only on a miss, so a second `fit` on the same data with the same generator state
loads from disk:
    cache_dir()/attacks/<cache_tag>-<config_hash>.pt   (written atomically, loaded weights-only)
A file lock next to it (`.pt.lock`) makes processes that need the same fit at once (two
workers of a sweep) wait for one of them to train it instead of each training it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from filelock import FileLock
from torch import nn

from eglib.config import cache_dir
from eglib.data import take_subset
from eglib.io import config_hash, data_fingerprint, load_state, save_state_atomic
from eglib.params import check_bool
from eglib.poison.base import Attack
from eglib.poison.ops import check_images

State = dict[str, torch.Tensor]
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU RNG seeded by `seed`, restoring the caller's after.

    For code that draws from the global RNG internally (nn.Module initialisation).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_labelled(images: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ValueError unless `images` are uint8 (N, C, H, W) and `labels` int64 (N,)."""
    check_images(images)
    if labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(
            f"labels.shape={tuple(labels.shape)}; allowed: ({len(images)},) to match the images"
        )
    if labels.dtype != torch.int64:
        raise ValueError(f"labels.dtype={labels.dtype}; allowed: torch.int64")


def module_state(prefix: str, module: nn.Module) -> State:
    """A module's state dict (parameters and buffers) on the CPU, keys prefixed `prefix.`."""
    return {f"{prefix}.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_module_state(prefix: str, module: ModuleT, state: State) -> ModuleT:
    """Load the `prefix.` entries of `state` into `module` (strict), put it in eval mode."""
    own = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    module.load_state_dict(own)
    return module.eval().requires_grad_(False)


class FittedAttack(Attack):
    """An attack that learns its trigger (or a helper network) from training data in `fit`.

    Subclasses set `fit_param_names` (the attribute names that change what `fit` learns;
    `target` etc. only if they matter) and `cache_tag` (file-name prefix, default: `name`;
    attacks that fit the same thing may share one), implement `_train` and `_load`, and call
    `self._require_fit(images)` at the top of `apply`. `fit_size` (None: every image given to `fit`)
    fits on a seeded, class-stratified subset; `progress` shows tqdm bars while training.
    """

    needs_fit: ClassVar[bool] = True
    fit_param_names: ClassVar[tuple[str, ...]] = ()
    cache_tag: ClassVar[str | None] = None
    quick_params: ClassVar[dict[str, Any]] = {}  # fit sizes that train in seconds (CI, tests)
    state_version: ClassVar[int] = 1  # bump when the saved state's layout changes (new cache key)

    def __init__(self, *, fit_size: int | None = None, progress: bool = False, **base: Any) -> None:
        super().__init__(**base)
        if fit_size is not None:
            if isinstance(fit_size, bool) or not isinstance(fit_size, int) or fit_size < 1:
                raise ValueError(
                    f"fit_size={fit_size!r}; allowed: None (all images) or an int >= 1"
                )
        self.fit_size = fit_size
        self._progress = check_bool("progress", progress)
        self._shape: tuple[int, int, int] | None = None  # (C, H, W) of the fitted images
        self._from_cache: bool | None = None

    @property
    def fit_from_cache(self) -> bool | None:
        """Whether the last `fit` loaded its state from disk (None: not fitted yet)."""
        return self._from_cache

    def cache_path(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> Path:
        """Where the state fitted on these images and labels with this seed is cached."""
        key = config_hash(
            {
                "attack": self.cache_tag or self.name,
                "version": self.state_version,
                "fit_params": {k: getattr(self, k) for k in ("fit_size", *self.fit_param_names)},
                "data": data_fingerprint(images, labels),
                "seed": seed,
            }
        )
        return cache_dir() / "attacks" / f"{self.cache_tag or self.name}-{key}.pt"

    def fit(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> None:
        """Learn from uint8 `images` (N, C, H, W) and `labels` (N,), or load the cached result.

        Draws exactly one number from `generator` (the training seed), cached or not, so what
        the caller draws next does not depend on the cache.
        """
        check_labelled(images, labels)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        path = self.cache_path(images, labels, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(path.name + ".lock")):
            if path.exists():
                state = load_state(path)
                self._from_cache = True
            else:
                size = (
                    self.fit_size
                    if self.fit_size is not None and self.fit_size < len(labels)
                    else None
                )
                subset, sublabels = take_subset(images.cpu(), labels.cpu(), size, seed)
                state = self._train(subset, sublabels, seed)
                state["meta.shape"] = torch.tensor(images.shape[1:])
                save_state_atomic(path, state)
                self._from_cache = False
        shape = tuple(int(v) for v in state["meta.shape"])
        self._shape = (shape[0], shape[1], shape[2])
        self._load(state)
        self._fitted = True

    def _require_fit(self, images: torch.Tensor) -> None:
        """Raise unless `fit` ran (RuntimeError) and `images` match its shape (ValueError)."""
        if not self._fitted or self._shape is None:
            raise RuntimeError(
                f"attack {self.name!r} is not fitted: call fit(train_images, train_labels, "
                "generator) before apply"
            )
        check_images(images)
        if tuple(images.shape[1:]) != self._shape:
            raise ValueError(
                f"images of shape (C, H, W)={tuple(images.shape[1:])}; this {self.name!r} "
                f"attack was fitted on {self._shape}"
            )

    @abstractmethod
    def _train(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> State:
        """Learn from CPU uint8 images and labels with randomness from `seed` only."""

    @abstractmethod
    def _load(self, state: State) -> None:
        """Rebuild the fitted networks / tensors from a state made by `_train`."""
