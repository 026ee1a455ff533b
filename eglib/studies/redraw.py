"""Redraw a finished study's figures from the files `write_study` left (its JSON, CSV and extra
tables), without its runs: a plotting change reaches committed figures whose runs are not
cached. A study whose figures need more than its tables (spectra: singular values, t-SNE)
says so in `data_from_tables`, which rebuilds the rest of `StudyResult.data` from the tables.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eglib.io import read_json, write_json_atomic
from eglib.plots import save_figure
from eglib.studies.base import NotRedrawable, Study, StudyResult, chosen_studies

__all__ = ["NotRedrawable", "load_study", "read_table", "redraw", "redraw_folder", "study_folders"]

_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?(\d+\.\d*(e[+-]\d+)?|\d+e[+-]\d+|inf|nan)")  # a float's repr


def _value(text: str) -> Any:
    """A CSV cell as `write_csv` wrote it: '' -> None, True/False, int, float (a float's repr
    holds '.', 'e+'/'e-', 'inf' or 'nan'; an int's none of them), else the text."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a CSV written by `eglib.sweep.write_csv`, each cell back to its type."""
    with open(path, newline="") as f:
        return [{k: _value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _suffix(name: str, table: str) -> str:
    """'seeds' from '<name>_seeds.csv'."""
    return Path(table).stem.removeprefix(f"{name}_")


def load_study(folder: str | Path, name: str, study: Study) -> tuple[StudyResult, dict[str, Any]]:
    """The `StudyResult` that `<folder>/<name>.json` and its CSVs describe, and that JSON;
    ValueError when the JSON is another study's, `NotRedrawable` when its figures need more
    than its tables."""
    folder = Path(folder)
    meta = read_json(folder / f"{name}.json")
    if meta.get("study") != name:
        raise ValueError(f"{folder / name}.json is study {meta.get('study')!r}, not {name!r}")
    tables = {_suffix(name, t): read_table(folder / t) for t in meta.get("tables", [])}
    result = StudyResult(
        name=name,
        profile=meta["profile"],
        rows=read_table(folder / meta["csv"]),
        seeds=tuple(meta.get("seeds", ())),
        notes=meta.get("notes", {}),
    )
    rebuild = getattr(study, "data_from_tables", None)
    if rebuild is not None:
        result.data = rebuild(tables, meta["command"])
    return result, meta


def redraw(folder: str | Path, name: str, study: Study) -> list[Path]:
    """Redraw one study's figures in `folder` from its tables and update its JSON's list of
    figures; return the figures' paths."""
    from eglib.studies import figure_path

    result, meta = load_study(folder, name, study)
    written = [
        save_figure(fig, figure_path(folder, name, suffix))
        for suffix, fig in study.figures(result).items()
    ]
    write_json_atomic(Path(folder) / f"{name}.json", {**meta, "figures": [p.name for p in written]})
    return written


def redraw_folder(
    folder: str | Path, studies: dict[str, Study], only: Sequence[str] | None = None
) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Redraw every study of `studies` (those in `only`, when given) that `folder` holds a
    JSON of: (figures written by study, why each study that could not be was skipped).
    ValueError when the folder holds none of them, `only` names an unknown study or names
    one that cannot be redrawn (`NotRedrawable`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of figures")
    chosen = chosen_studies(studies, only)
    names = [n for n in chosen if (folder / f"{n}.json").is_file()]
    if not names:
        raise ValueError(f"{folder} holds no study JSON (<name>.json) of: {', '.join(chosen)}")
    written: dict[str, list[Path]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            written[name] = redraw(folder, name, studies[name])
        except NotRedrawable as why:
            if only:
                raise
            skipped[name] = str(why)
    return written, skipped


def study_folders(
    root: str | Path, studies: dict[str, Study], only: Sequence[str] | None = None
) -> list[Path]:
    """The folders under `root` (itself included), sorted, that hold a JSON (`<name>.json`)
    of a study in `studies` (of those in `only`, when given)."""
    chosen = chosen_studies(studies, only)
    return sorted({p.parent for name in chosen for p in Path(root).rglob(f"{name}.json")})
