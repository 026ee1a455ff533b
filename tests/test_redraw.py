"""Tests for redrawing a study's figures from its saved tables (`eglib.studies.redraw`)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from eglib.__main__ import main
from eglib.io import read_json, write_json_atomic
from eglib.studies import STUDIES, StudyResult, write_study
from eglib.studies.base import NotRedrawable
from eglib.studies.redraw import load_study, read_table, redraw_folder, study_folders
from eglib.sweep import write_csv


def test_read_table_gives_back_the_types_write_csv_wrote(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"attack": "badnets", "seed": 0, "acc": 0.1, "tiny": 1e-05, "huge": 1.5e20, "ok": True},
        {"attack": "sig", "seed": -2, "acc": -2.0, "tiny": math.inf, "huge": None, "ok": False},
        # texts that float() reads but a float's repr never writes stay texts
        {"attack": "1e5", "seed": 3, "acc": math.nan, "tiny": 0.0, "huge": 2, "ok": None},
        {"attack": "8007650e7f12a3b4", "seed": 4, "acc": 1.0, "tiny": 0.5, "huge": 3, "ok": True},
        {"attack": "1_000", "seed": 5, "acc": 1.0, "tiny": 0.5, "huge": 3, "ok": True},
    ]
    write_csv(rows, tmp_path / "t.csv")
    back = read_table(tmp_path / "t.csv")
    assert math.isnan(back[2].pop("acc")) and math.isnan(rows[2].pop("acc"))
    assert back == rows
    assert [type(r["seed"]) for r in back] == [int] * 5
    assert isinstance(back[0]["acc"], float) and isinstance(back[1]["acc"], float)


def _plot_rows(result: StudyResult) -> dict[str, Any]:
    """A figure of the rows, titled by a note, and one of the rebuilt data."""
    fig, ax = plt.subplots()
    ax.plot([r["x"] for r in result.rows], [r["y"] for r in result.rows])
    ax.set_title(result.notes["title"])
    second, ax2 = plt.subplots()
    ax2.bar(range(len(result.data["extra"])), [r["v"] for r in result.data["extra"]])
    return {"": fig, "extra": second}


TOY = SimpleNamespace(
    figures=_plot_rows,
    tables=lambda result: {"extra": result.data["extra"]},
    data_from_tables=lambda tables, command: {"extra": tables["extra"]},
)


def _write_toy(folder: Path) -> list[Path]:
    """The toy study's files, as `make_figures` writes them."""
    result = StudyResult(
        name="toy",
        profile="ci",
        rows=[{"x": 0, "y": 1.5}, {"x": 1, "y": 0.25}],
        seeds=(0, 1),
        data={"extra": [{"v": 3}, {"v": 1}]},
        notes={"title": "a note"},
    )
    return write_study(TOY, result, folder, 1.0, "python -m eglib figures --only toy")


def test_redraw_reproduces_figures_and_json_byte_for_byte(tmp_path: Path) -> None:
    paths = _write_toy(tmp_path)
    before = {p: p.read_bytes() for p in paths}
    pngs = [p for p in paths if p.suffix == ".png"]
    for png in pngs:
        png.unlink()
    written, skipped = redraw_folder(tmp_path, {"toy": TOY})  # type: ignore[dict-item]
    assert written == {"toy": pngs} and skipped == {}
    assert {p: p.read_bytes() for p in paths} == before
    result, meta = load_study(tmp_path, "toy", TOY)  # type: ignore[arg-type]
    assert result.seeds == (0, 1) and result.profile == "ci" and meta["rows"] == 2
    assert result.data == {"extra": [{"v": 3}, {"v": 1}]}


def _write_spectra_json(folder: Path) -> None:
    """A spectra study's JSON and CSV (its figures need features no table holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_csv([{"attack": "badnets", "stage": "stem"}], folder / "spectra.csv")
    meta = {"study": "spectra", "profile": "ci", "seeds": [0], "csv": "spectra.csv"}
    command = "python -m eglib figures --profile ci --only spectra"
    write_json_atomic(folder / "spectra.json", {**meta, "tables": [], "command": command})


def test_a_study_that_needs_its_runs_is_skipped_or_refused(tmp_path: Path) -> None:
    _write_spectra_json(tmp_path)
    _write_toy(tmp_path)
    studies = {**STUDIES, "toy": TOY}
    written, skipped = redraw_folder(tmp_path, studies)  # type: ignore[arg-type]
    assert list(written) == ["toy"]
    assert "rerun `python -m eglib figures --profile ci --only spectra`" in skipped["spectra"]
    with pytest.raises(NotRedrawable, match="singular values and t-SNE"):
        redraw_folder(tmp_path, STUDIES, ["spectra"])


def test_redraw_refuses_bad_folders_and_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a folder of figures"):
        redraw_folder(tmp_path / "missing", STUDIES)
    with pytest.raises(ValueError, match="holds no study JSON .* of: ablations"):
        redraw_folder(tmp_path, STUDIES, ["ablations"])
    with pytest.raises(ValueError, match="unknown study 'nope'; allowed: \\['ablations'"):
        redraw_folder(tmp_path, STUDIES, ["nope"])
    write_json_atomic(tmp_path / "centring.json", {"study": "ablations"})
    with pytest.raises(ValueError, match="centring.json is study 'ablations', not 'centring'"):
        redraw_folder(tmp_path, STUDIES)


def test_study_folders_finds_nested_study_json(tmp_path: Path) -> None:
    _write_spectra_json(tmp_path / "a" / "b")
    _write_toy(tmp_path / "c")
    (tmp_path / "d").mkdir()
    write_json_atomic(tmp_path / "d" / "other.json", {"study": "spectra"})
    studies = {**STUDIES, "toy": TOY}
    assert study_folders(tmp_path, studies) == [tmp_path / "a" / "b", tmp_path / "c"]  # type: ignore[arg-type]
    assert study_folders(tmp_path, studies, ["toy"]) == [tmp_path / "c"]  # type: ignore[arg-type]


def test_cli_redraw_prints_what_it_redrew_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_spectra_json(tmp_path)
    main(["redraw", str(tmp_path)])
    assert "spectra in " in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["redraw", str(tmp_path), "--only", "spectra"])
    assert stop.value.code == 2
    assert "python -m eglib redraw: error: spectra draws" in capsys.readouterr().err
    assert read_json(tmp_path / "spectra.json")["study"] == "spectra"  # left as it was
