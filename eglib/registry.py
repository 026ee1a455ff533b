"""Name -> entry registries (models, attacks, defences) share these two operations."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def add_entry(registry: dict[str, T], kind: str, name: str, entry: T) -> T:
    """Put `entry` under `name` in `registry`; registering a name twice is a ValueError."""
    if name in registry:
        raise ValueError(f"{kind} {name!r} registered twice")
    registry[name] = entry
    return entry


def lookup(registry: dict[str, T], kind: str, name: str) -> T:
    """The entry under `name`; an unknown name is a ValueError listing the allowed ones."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {sorted(registry)}")
    return registry[name]
