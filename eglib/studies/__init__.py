"""The studies: one experiment family of the spec each (a notebook section and a figure).

`STUDIES` maps a name to its module (`run(profile, progress=...) -> StudyResult`,
`figures(result) -> {suffix: Figure}`); `make_figures` runs the chosen studies and writes
`<out>/<name>[_<suffix>].png`, `<out>/<name>.csv` and `<out>/<name>.json` for each.
"""

from __future__ import annotations

import inspect
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from eglib.config import get_profile
from eglib.io import write_json_atomic
from eglib.plots import save_figure
from eglib.studies import (
    ablations,
    adaptive,
    centring,
    defence_table,
    forced_dimension,
    rank_vs_asr,
    spectra,
)
from eglib.studies.base import Study, StudyResult, chosen_studies
from eglib.sweep import write_csv

STUDIES: dict[str, Study] = {
    "rank_vs_asr": rank_vs_asr,  # observation 1: effective rank during training beside ACC / ASR
    "spectra": spectra,  # observation 2: singular spectra, top-k vs tail t-SNE, energy fractions
    "forced_dimension": forced_dimension,  # observation 3: ASR/ACC vs k per rule + the default
    "ablations": ablations,  # layer, k, tail factor, rule, poison rate, eval mode, architecture
    "defence_table": defence_table,  # attacks x defences (ACC/ASR, 3 protocols) + detection
    # observation 1 on the table's trained undefended models, uncentred and centred ranks
    # (after the table, whose sweep trains those runs in parallel)
    "centring": centring,
    "adaptive": adaptive,  # high-rank and adversarial-noise attacks: trigger rank vs ASR/ACC
}

FIGURES_DIR = Path("figures")  # where the committed figures live (the commands' default --out)

__all__ = ["STUDIES", "Study", "StudyResult", "figure_path", "make_figures", "write_study"]


# The options `python -m eglib figures` has flags for: `make_figures` passes only these on, so
# the command it records can regenerate the files.
FIGURES_OPTIONS = frozenset(
    {
        "attacks",
        "defenses",
        "seeds",
        "grid",
        "ablations",
        "detection",
        "cached_only",
        "include_slow",
    }
)


def _run_options(name: str) -> set[str]:
    """The options of `FIGURES_OPTIONS` a study's `run` takes (keyword-only)."""
    params = inspect.signature(STUDIES[name].run).parameters
    return {p for p, v in params.items() if v.kind is v.KEYWORD_ONLY} & FIGURES_OPTIONS


def figure_path(out_dir: str | Path, name: str, suffix: str) -> Path:
    """Where a study's figure goes: `<out>/<name>.png`, or `<out>/<name>_<suffix>.png`."""
    return Path(out_dir) / (f"{name}_{suffix}.png" if suffix else f"{name}.png")


def figures_command(
    profile: str, name: str, out_dir: str | Path, options: Mapping[str, Any] | None = None
) -> str:
    """The `python -m eglib figures` command line that regenerates one study's files (an
    option at its default in the study's `run` is left out: the CLI has no flag for it)."""
    parts = ["python", "-m", "eglib", "figures", "--profile", profile, "--only", name]
    if Path(out_dir) != FIGURES_DIR:
        parts += ["--out", str(out_dir)]
    defaults = inspect.signature(STUDIES[name].run).parameters
    for key, value in (options or {}).items():
        flag = key.replace("_", "-")
        if key in defaults and value is defaults[key].default:
            continue
        if value is False:
            parts.append(f"--no-{flag}")
        elif value is True:
            parts.append(f"--{flag}")
        elif isinstance(value, (str, int)):
            parts += [f"--{flag}", str(value)]
        else:
            parts += [f"--{flag}", ",".join(str(v) for v in value)]
    return shlex.join(parts)


def write_study(
    study: Study, result: StudyResult, out_dir: str | Path, seconds: float, command: str
) -> list[Path]:
    """Save a finished study's figures (PNG), rows (CSV) and provenance (JSON, with `command`,
    the line that regenerates them); return the paths."""
    out = Path(out_dir)
    name = result.name
    written = [
        save_figure(fig, figure_path(out, name, suffix))
        for suffix, fig in study.figures(result).items()
    ]
    csv_path, json_path = out / f"{name}.csv", out / f"{name}.json"
    write_csv(result.rows, csv_path)
    extra_tables = getattr(study, "tables", None)
    tables = []
    for suffix, rows in (extra_tables(result) if extra_tables else {}).items():
        tables.append(out / f"{name}_{suffix}.csv")
        write_csv(rows, tables[-1])
    write_json_atomic(
        json_path,
        {
            "study": name,
            "profile": result.profile,
            "seeds": list(result.seeds),
            "command": command,
            "figures": [p.name for p in written],
            "csv": csv_path.name,
            "tables": [p.name for p in tables],
            "rows": len(result.rows),
            "seconds": round(seconds, 1),
            "notes": result.notes,
        },
    )
    return [*written, csv_path, *tables, json_path]


def make_figures(
    profile: str | None = None,
    out_dir: str | Path = FIGURES_DIR,
    only: Sequence[str] | None = None,
    *,
    progress: bool = True,
    options: Mapping[str, Any] | None = None,
    jobs: int | None = None,
) -> dict[str, list[Path]]:
    """Run each chosen study (all when `only` is None) and write its PNG, CSV and JSON files.

    `options` (e.g. the defence table's `attacks`, `defenses`, `seeds`, `detection`) go to
    the `run` of the one study named in `only`; its JSON records the command with them.
    `jobs`: worker processes for the studies that train several runs (None: `default_jobs`,
    one on a GPU; on one H200, 3 workers sharing it trained full runs in 55-237 s each).
    """
    names = chosen_studies(STUDIES, only)
    options = dict(options or {})
    if options:
        need = f"options {sorted(options)} need exactly one study that takes them"
        if len(names) != 1:
            raise ValueError(f"{need}; got {len(names)} studies: {', '.join(names)}")
        accepted = _run_options(names[0])
        refused = sorted(set(options) - accepted)
        if refused:
            takes = f"it takes {sorted(accepted)}" if accepted else "it takes none"
            raise ValueError(f"{need}; {names[0]!r} does not take {refused} ({takes})")
    prof = get_profile(profile).name
    written: dict[str, list[Path]] = {}
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs={jobs}; must be >= 1")
    for name in names:
        start = time.perf_counter()
        takes_jobs = "jobs" in inspect.signature(STUDIES[name].run).parameters
        workers = {"jobs": jobs} if jobs is not None and takes_jobs else {}
        result = STUDIES[name].run(prof, progress=progress, **options, **workers)
        command = figures_command(prof, name, out_dir, {**options, **workers})
        seconds = time.perf_counter() - start
        written[name] = write_study(STUDIES[name], result, out_dir, seconds, command)
        if progress:
            print(f"{name}: wrote {', '.join(str(p) for p in written[name])}")
    return written
