"""Grids of experiments from a small YAML/JSON file, run in parallel processes, one CSV out."""

from __future__ import annotations

import csv
import itertools
import json
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from types import FrameType
from typing import Any

import yaml
from tqdm.auto import tqdm

from eglib.config import default_device, usable_cpus
from eglib.experiments import (
    ExperimentConfig,
    check_config,
    is_cached,
    record_row,
    run_experiment,
    undefended_config,
)
from eglib.io import write_text_atomic

PARAM_FIELDS = ("attack_params", "defense_params")  # the config fields a dotted key enters


def load_grid(path: str | Path) -> list[ExperimentConfig]:
    """Configs of a grid file: `profile`, `base` (fixed fields), `grid` (field -> list of values).

    Example (YAML): `{profile: ci, base: {attack: badnets}, grid: {defense: [none, eigenguard],
    seed: [0, 1, 2]}}` gives 6 configs. A grid key may be a dotted name such as
    `defense_params.k` to vary one parameter of a dict field.
    """
    text = Path(path).read_text()
    try:
        if str(path).endswith(".json"):
            spec = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            spec = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as error:
        where = error.problem_mark or error.context_mark
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ValueError(f"grid file {path}: not valid YAML: {error.problem}{at}") from error
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(f"grid file {path}: {error}") from error
    allowed = {"profile", "base", "grid"}
    if not isinstance(spec, dict) or set(spec) - allowed:
        raise ValueError(f"grid file {path}: top-level keys must be among {sorted(allowed)}")
    for part in ("base", "grid"):
        if not isinstance(spec.get(part, {}), dict):
            raise ValueError(
                f"grid file {path}: {part!r} must be a mapping of fields, got {spec[part]!r}"
            )
    return expand_grid(spec.get("base", {}), spec.get("grid", {}), spec.get("profile"))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict, refusing a key given twice (json keeps the last silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} is given twice; give each field once")
        seen[key] = value
    return seen


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing a mapping key given twice (it keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key_node, deep=True) for key_node, _ in node.value]
        for key in keys:
            if keys.count(key) > 1:
                line = node.start_mark.line + 1
                raise ValueError(f"key {key!r} is given twice (mapping at line {line})")
        return super().construct_mapping(node, deep=deep)


def expand_grid(
    base: dict[str, Any], grid: dict[str, Sequence[Any]], profile: str | None = None
) -> list[ExperimentConfig]:
    """The cartesian product of `grid` over `base`, sized by `profile`."""
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid entry {name!r} must be a non-empty list, got {values!r}")
    configs = []
    for combo in itertools.product(*grid.values()):
        fields: dict[str, Any] = json.loads(json.dumps(base))  # deep copy of plain data
        for name, value in zip(grid, combo, strict=True):
            if "." in name:
                outer, inner = name.split(".", 1)
                nested = fields.setdefault(outer, {})
                if outer not in PARAM_FIELDS or not isinstance(nested, dict):
                    raise ValueError(
                        f"grid key {name!r}: {outer!r} is not a dict of parameters; dotted "
                        f"keys vary one entry of {list(PARAM_FIELDS)}"
                    )
                nested[inner] = value
            else:
                fields[name] = value
        configs.append(ExperimentConfig.from_profile(profile, **fields))
    first: dict[str, int] = {}
    for i, cfg in enumerate(configs):  # a repeated value would run once but count twice
        j = first.setdefault(cfg.key(), i)
        if j != i:
            raise ValueError(
                f"grid runs {j} and {i} are the same experiment ({_describe(cfg)}); "
                "give each grid value once"
            )
    return configs


def _run_one(cfg: ExperimentConfig, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    return record_row(run_experiment(cfg, progress=False).record)


def _describe(cfg: ExperimentConfig) -> str:
    """A config in one line: its key and the fields that tell runs of a grid apart."""
    return (
        f"key {cfg.key()}: {cfg.attack} {cfg.poison_rate:g} {cfg.model} "
        f"defense={cfg.defense} seed={cfg.seed!r}"
    )


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued runs and end the running ones (else the pool's exit waits for every
    queued run, and an interrupted notebook leaves workers training in the background)."""
    for worker in list((getattr(pool, "_processes", None) or {}).values()):  # no public accessor
        worker.terminate()
    # the pool's manager thread sees the dead workers, fails the queued runs and reaps the
    # workers; wait for it: a second thread reaping them could read a dead worker as alive
    pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while the block runs (main thread only), so a terminated
    sweep stops its workers as an interrupt does instead of leaving them training."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_waves(configs: Sequence[ExperimentConfig]) -> list[list[int]]:
    """Indices of `configs` in the order a pool may run them: a run whose defence starts from
    the undefended run of the same config (`undefended_config`) waits for it when that run is
    in the grid and not yet cached (else, run beside it, it would train its own copy)."""
    pending = {c for c in configs if not is_cached(c)}
    waits = [undefended_config(c) in pending for c in configs]
    waves = [[i for i, wait in enumerate(waits) if wait is later] for later in (False, True)]
    return [wave for wave in waves if wave]


def run_grid(
    configs: Iterable[ExperimentConfig],
    *,
    jobs: int = 1,
    progress: bool = True,
    label: str | None = None,
) -> list[dict[str, Any]]:
    """Run every config (cached ones are loaded, not rerun) in `jobs` processes, in
    `run_waves` order; rows in config order. `label` names the progress bar (default:
    "sweep (<n> cached)")."""
    configs = list(configs)
    if jobs < 1:
        raise ValueError(f"jobs={jobs}; must be >= 1")
    for i, cfg in enumerate(configs):  # a bad config fails now, not after the others trained
        try:
            check_config(cfg)
        except ValueError as error:
            raise ValueError(f"run {i} of the grid ({_describe(cfg)}): {error}") from error
    default_device()  # a bad EGLIB_DEVICE fails here, not in every worker
    threads = max(1, usable_cpus() // jobs)
    label = label or f"sweep ({sum(map(is_cached, configs))} cached)"
    rows: list[dict[str, Any] | None] = [None] * len(configs)
    bar = tqdm(total=len(configs), desc=label, disable=not progress)
    with (
        _sigterm_as_exit(),
        ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool,
    ):
        try:
            for wave in run_waves(configs):
                futures = {pool.submit(_run_one, configs[i], threads): i for i in wave}
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        rows[i] = future.result()
                    except Exception as error:
                        raise RuntimeError(
                            f"run {i} of the grid failed ({_describe(configs[i])}): {error!r}; "
                            "the runs that finished are cached, the others were stopped"
                        ) from error
                    bar.update()
        except BaseException:  # a failed run or an interrupt: stop, do not drain the queue
            _stop_workers(pool)
            raise
        finally:
            bar.close()
    return [r for r in rows if r is not None]


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write rows (union of their keys as columns, in first-seen order) to a CSV, atomically."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
