"""Running a study's configs through the cache and summarising them over seeds: the shared
runner (`run_records`, parallel `eglib.sweep.run_grid` for what the cache lacks) and mean +-
std tables (`summarise`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from eglib.config import default_device, usable_cpus
from eglib.experiments import RECORD_FILE, ExperimentConfig, is_cached, run_dir
from eglib.io import read_json
from eglib.plots import PROTOCOLS
from eglib.sweep import run_grid

# ACC and ASR under each evaluation protocol: the columns every study averages over seeds
METRIC_COLUMNS: tuple[str, ...] = tuple(f"{m}_{p}" for p in PROTOCOLS for m in ("acc", "asr"))


def default_jobs(n_runs: int) -> int:
    """Worker processes for `n_runs` runs: 1 on a GPU, else one per usable CPU (at most n_runs)."""
    if default_device().type == "cuda":
        return 1
    return max(1, min(n_runs, usable_cpus()))


def run_records(
    configs: Sequence[ExperimentConfig], *, jobs: int | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """The records of `configs`, in order; trains only the runs the cache lacks.

    Missing runs are trained in `jobs` parallel processes (`eglib.sweep.run_grid`; None: see
    `default_jobs`); every record is then read from the cache, so a warm cache costs no
    model or data loading.
    """
    unique = list(dict.fromkeys(configs))
    missing = [c for c in unique if not is_cached(c)]
    if missing:
        label = f"training {len(missing)} runs ({len(unique) - len(missing)} cached)"
        run_grid(missing, jobs=jobs or default_jobs(len(missing)), progress=progress, label=label)
    return [read_json(run_dir(c) / RECORD_FILE) for c in configs]


def summarise(
    rows: Sequence[dict[str, Any]],
    by: Sequence[str],
    metrics: Sequence[str] = METRIC_COLUMNS,
) -> list[dict[str, Any]]:
    """One row per distinct value of the `by` keys (first-seen order): `n` (rows, e.g. seeds),
    the mean of each metric and its sample std as `<metric>_std` (NaN for one row).

    Metrics that are None or NaN in a row are left out of that metric's mean.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(key) for key in by), []).append(row)
    table = []
    for values, members in groups.items():
        entry: dict[str, Any] = dict(zip(by, values, strict=True))
        entry["n"] = len(members)
        for metric in metrics:
            numbers = [float(r[metric]) for r in members if _defined(r.get(metric))]
            entry[metric] = statistics.fmean(numbers) if numbers else math.nan
            entry[f"{metric}_std"] = statistics.stdev(numbers) if len(numbers) > 1 else math.nan
        table.append(entry)
    return table


def _defined(value: Any) -> bool:
    """True for a number that is not NaN."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))
