"""Name -> entry registries (models, attacks, defences) share these operations."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
_KEYWORDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


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


def check_keywords(
    builder: Callable[..., Any],
    kind: str,
    name: str,
    params: dict[str, Any],
    also: Sequence[str] = (),
) -> None:
    """ValueError naming a keyword `builder` does not take, with the ones it does (and `also`,
    those a wrapper takes itself). A class's keywords are those of its `__init__` and, while
    that passes **kwargs on, its bases'; a builder whose **kwargs go elsewhere is not checked."""
    names = keyword_names(builder)
    allowed = None if names is None else [*also, *names]
    unknown = [key for key in params if allowed is not None and key not in allowed]
    if unknown:
        raise ValueError(f"{kind} {name!r} has no parameter {unknown[0]!r}; allowed: {allowed}")
    first = inspect.signature(builder).parameters.values()  # its own required keywords
    missing = [p.name for p in first if p.default is p.empty and p.kind in _KEYWORDS]
    missing = [key for key in missing if key not in params]
    if missing:
        raise ValueError(f"{kind} {name!r} needs the parameter {missing[0]!r}")


def keyword_names(builder: Callable[..., Any]) -> list[str] | None:
    """The keywords `builder` accepts, or None when **kwargs leave them open."""
    chain = (
        [c.__dict__["__init__"] for c in builder.__mro__ if "__init__" in c.__dict__]
        if inspect.isclass(builder)
        else [builder]
    )
    names: list[str] = []
    for function in chain:
        takes = inspect.signature(function).parameters.values()
        names += [p.name for p in takes if p.kind in _KEYWORDS and p.name not in ("self", *names)]
        if not any(p.kind is p.VAR_KEYWORD for p in takes):
            return names
    return None
