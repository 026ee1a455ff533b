"""The model registry: names -> builder functions, filled by a decorator (like timm's)."""

from __future__ import annotations

from collections.abc import Callable

from eglib.models.base import StagedNet
from eglib.params import check_int
from eglib.registry import add_entry, lookup

ModelBuilder = Callable[[int, int], StagedNet]
"""A builder takes (num_classes, in_channels) and returns a freshly initialised StagedNet."""

MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Function decorator: add a builder to `MODELS` under `name`."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        return add_entry(MODELS, "model", name, builder)

    return decorator


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(MODELS)


def make_model(name: str, num_classes: int, in_channels: int = 3) -> StagedNet:
    """Build the model called `name` for `num_classes` classes and `in_channels`-channel input.

    Input of the model: float (B, in_channels, H, W) in [0, 1], any H, W >= 16; output: logits
    (B, num_classes). Raises ValueError for an unknown name (listing the allowed ones),
    num_classes < 2 or in_channels < 1.
    """
    builder = lookup(MODELS, "model", name)
    check_int("num_classes", num_classes, 2)
    check_int("in_channels", in_channels, 1)
    return builder(num_classes, in_channels)
