"""Parameter checks the attacks, defences and studies share: each raises ValueError naming the
value and the rule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def check_int(
    name: str, value: object, minimum: int, maximum: int | None = None, *, numpy: bool = False
) -> int:
    """`value` as a Python int in [minimum, maximum] (no upper bound when None); bools are
    refused, NumPy integers accepted only when `numpy`."""
    is_bool = isinstance(value, (bool, np.bool_))
    kinds = (int, np.integer) if numpy else (int,)
    ok = not is_bool and isinstance(value, kinds)
    if not ok or value < minimum or (maximum is not None and value > maximum):  # type: ignore[operator]
        kind = "an int (not a bool)" if is_bool else "an int"
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name}={value!r}; must be {kind} {bounds}")
    return int(value)  # type: ignore[call-overload]


def check_chosen(name: str, values: Sequence[T] | None, default: Sequence[T]) -> tuple[T, ...]:
    """What a study runs over (its attacks, defences, seeds): `default` when None, else
    `values`, at least one and none repeated (a repeated one would count its runs twice in a
    mean and std)."""
    if values is None:
        return tuple(default)
    chosen = tuple(values)
    if not chosen:
        raise ValueError(f"{name}=[]; give at least one")
    repeated = [v for i, v in enumerate(chosen) if v in chosen[:i]]
    if repeated:
        once = list(dict.fromkeys(repeated))
        raise ValueError(f"{name}={list(chosen)} repeat {once}; give each once")
    return chosen


def check_seeds(seeds: Sequence[object] | None, default: Sequence[int]) -> tuple[int, ...]:
    """`check_chosen` for seeds, each an int >= 0."""
    if seeds is None:
        return tuple(default)
    return check_chosen("seeds", [check_int(f"seeds[{i}]", s, 0) for i, s in enumerate(seeds)], ())


def check_float(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a finite float within [low, high] (open ends where asked); bools refused."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low  # type: ignore[operator]
    if ok and high is not None:
        ok = value < high if high_open else value <= high  # type: ignore[operator]
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}={value!r}; must be a finite number in {left}{lo}, {hi}{right}")
    return float(value)  # type: ignore[arg-type]


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """`value` as one of the `allowed` strings."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {list(allowed)}")
    return str(value)


def check_bool(name: str, value: object) -> bool:
    """`value` as a real bool (not 0/1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}; must be True or False")
    return value


def check_layer(name: str, value: object) -> str | None:
    """A stage name or None (whether the stage exists is checked against the model at run time)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{name}={value!r}; must be a stage name (str) or None")
    return value
