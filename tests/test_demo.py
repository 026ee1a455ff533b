"""`make demo` end to end on a tiny profile: both runs train, the table shows the three
protocols side by side, and the records and curves are written."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest

from eglib import config
from eglib.demo import COLUMNS, DEMO_RUNS, run_demo

TINY = config.Profile("tiny", train_size=100, test_size=50, epochs=1, batch_size=20, seeds=(0,))


def test_run_demo_tiny(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(config.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(config.PROFILES, "tiny", TINY)
    out = tmp_path / "demo"
    rows = run_demo("tiny", out_dir=out, progress=False)
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("run"))
    for protocol in ("per_sample", "mixed", "pure"):
        assert f"acc_{protocol}" in header and f"asr_{protocol}" in header
    assert [r["run"] for r in rows] == list(DEMO_RUNS)
    for label in DEMO_RUNS:
        line = next(line for line in printed.splitlines() if line.startswith(label))
        assert len(line[12:].split()) == len(COLUMNS)  # one number per protocol column
    for row in rows:
        assert all(0.0 <= row[c] <= 1.0 for c in COLUMNS)
        assert row["train_size"] == 100 and row["epochs"] == 1
    assert (out / "training_curves.png").stat().st_size > 0
    for defense in DEMO_RUNS.values():
        record = json.loads((out / f"{defense}.json").read_text())
        assert record["config"]["defense"] == defense
        assert set(record["metrics"]["protocols"]) == {"per_sample", "mixed", "pure"}
    # a second call loads both runs from the cache (same configs -> no retraining)
    cached = run_demo("tiny", out_dir=out, progress=False)
    assert [r["key"] for r in cached] == [r["key"] for r in rows]
    assert [r["acc_pure"] for r in cached] == [r["acc_pure"] for r in rows]
