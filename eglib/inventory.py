"""What the run cache holds: finished runs (from their records) and unfinished ones (from the
config a run writes when it starts and the epoch its checkpoint reached), one row each, for
`python -m eglib runs`; reads files only, never takes a run's lock. A run's folder appears
once its data is ready: a learned attack's fit (LC, SSBA, input-aware) comes before it."""

from __future__ import annotations

import pickle
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from eglib.config import cache_dir
from eglib.experiments import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    RECORD_FILE,
    TRAIN_LOCK,
    ExperimentConfig,
    record_row,
    stale_reason,
)
from eglib.io import read_json

STATES = ("done", "stale", "training", "started", "unreadable")  # see `run_row`
UNFINISHED = ("training", "started")  # the states of runs still training or interrupted

# the columns every row has, in this order (a done run's row adds its record_row columns)
COLUMNS = (
    "key",
    "state",
    "epochs_done",
    "epochs",
    "dataset",
    "model",
    "attack",
    "poison_rate",
    "defense",
    "seed",
    "acc",
    "asr",
    "train_s",
    "updated",
    "note",
)


def run_row(folder: Path) -> dict[str, Any]:
    """One run folder as a row. `state`: "done" (its record and model exist), "stale" (a
    record the cache would not serve; `note` says why: its model file is missing, or it was
    trained under other defaults, `eglib.experiments.stale_reason`), "training" (a checkpoint,
    `epochs_done` epochs of its checkpointed training; None for the other states: a done
    filter or ABL run's history holds more than one training), "started" (neither yet: a defence's
    phase before that training, such as scoring or isolation), "unreadable" (a record, config
    or checkpoint that fails to load; `note` says why). `updated`: the newest file's
    modification time, ISO format."""
    files = [p for p in folder.iterdir() if p.is_file() and p.name != TRAIN_LOCK]
    newest = max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime)
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(key=folder.name, updated=datetime.fromtimestamp(newest).isoformat("T", "seconds"))
    try:
        if (folder / RECORD_FILE).exists():
            record = read_json(folder / RECORD_FILE)
            row.update(record_row(record), state="done")
            note = stale_reason(ExperimentConfig.from_dict(record["config"]), record)
            if not (folder / MODEL_FILE).exists():
                note = f"its model file {MODEL_FILE} is missing"
            if note:
                row.update(state="stale", note=note)
            return row
        if (folder / CONFIG_FILE).exists():
            row.update({k: v for k, v in read_json(folder / CONFIG_FILE).items() if k in row})
        row["state"] = "started"
        if (folder / CHECKPOINT_FILE).exists():
            row.update(state="training", epochs_done=checkpoint_epoch(folder / CHECKPOINT_FILE))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        row.update(state="unreadable", note=f"{type(e).__name__}: {e}")
    return row


def checkpoint_epoch(path: Path) -> int:
    """The number of epochs a training checkpoint holds (memory-mapped: its tensors stay on
    disk)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state["epoch"])


def cached_runs(root: Path | None = None) -> list[dict[str, Any]]:
    """A row (`run_row`) for every run folder under `root`/runs (default: the cache folder),
    oldest update first; an empty list when there is none."""
    runs = (root if root is not None else cache_dir()) / "runs"
    if not runs.is_dir():
        return []
    rows = [run_row(folder) for folder in runs.iterdir() if folder.is_dir()]
    return sorted(rows, key=lambda row: (row["updated"], row["key"]))


def count_states(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many rows are in each state, in `STATES` order (states with none left out)."""
    counts = {state: sum(row["state"] == state for row in rows) for state in STATES}
    return {state: n for state, n in counts.items() if n}
