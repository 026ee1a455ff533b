"""The run cache's inventory (`eglib.inventory`, `python -m eglib runs`): finished runs with
their metrics, interrupted ones with their config and epoch, broken files named."""

from __future__ import annotations

import csv
from typing import Any

import pytest

import eglib.experiments as experiments
from eglib.__main__ import _print_rows, main
from eglib.experiments import (
    CONFIG_FILE,
    MODEL_FILE,
    RECORD_FILE,
    ExperimentConfig,
    run_dir,
    run_experiment,
)
from eglib.inventory import cached_runs, count_states, run_row
from eglib.io import read_json, write_json_atomic

TINY: dict[str, Any] = dict(epochs=3, batch_size=32, train_size=None, test_size=None, lr=0.05)


class _StopAfterEpoch:
    """A training callback that interrupts the run once `epoch` epochs are checkpointed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, model, epoch, row) -> None:
        if epoch == self.epoch + 1:
            raise KeyboardInterrupt


def _interrupted_run(cfg: ExperimentConfig, epochs_done: int, monkeypatch) -> None:
    """Train `cfg` until `epochs_done` epochs are checkpointed, then interrupt it."""
    real = experiments.train_model

    def stopping(*args, callbacks=(), **kwargs):
        return real(*args, callbacks=[*callbacks, _StopAfterEpoch(epochs_done)], **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(experiments, "train_model", stopping)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, progress=False)


def test_finished_and_interrupted_runs_are_listed_with_their_state(
    tiny_fashion, tmp_cache, monkeypatch
) -> None:
    done = ExperimentConfig(**TINY)
    record = run_experiment(done, progress=False).record
    unfinished = done.replace(defense="eigenguard", defense_params={"k": 2}, seed=1)
    _interrupted_run(unfinished, 2, monkeypatch)
    started = run_dir(done.replace(seed=5))
    started.mkdir()  # a run whose folder exists but whose training has not begun

    rows = {row["key"]: row for row in cached_runs(tmp_cache)}
    assert set(rows) == {done.key(), unfinished.key(), started.name}
    finished = rows[done.key()]
    assert finished["state"] == "done" and finished["epochs"] == 3
    assert finished["epochs_done"] is None
    assert (finished["acc"], finished["asr"]) == (
        record["metrics"]["acc"],
        record["metrics"]["asr"],
    )
    training = rows[unfinished.key()]
    assert training["state"] == "training" and training["epochs_done"] == 2
    assert (training["defense"], training["seed"], training["epochs"]) == ("eigenguard", 1, 3)
    assert training["acc"] is None
    assert rows[started.name]["state"] == "started" and rows[started.name]["attack"] is None
    assert count_states(list(rows.values())) == {"done": 1, "training": 1, "started": 1}


def test_a_run_writes_its_config_before_it_trains(tiny_fashion, tmp_cache, monkeypatch) -> None:
    cfg = ExperimentConfig(**TINY)
    _interrupted_run(cfg, 0, monkeypatch)
    assert ExperimentConfig.from_dict(read_json(run_dir(cfg) / CONFIG_FILE)) == cfg
    assert run_row(run_dir(cfg))["state"] == "started"  # no epoch checkpointed yet


def test_a_record_the_cache_would_not_serve_is_stale_and_says_why(
    tiny_fashion, tmp_cache, capsys
) -> None:
    guarded = ExperimentConfig(**TINY, defense="eigenguard", defense_params={"k": 2})
    record = run_experiment(guarded, progress=False).record
    record["defense"]["params"]["tail_scale"] = 0.5  # trained under another default
    write_json_atomic(run_dir(guarded) / RECORD_FILE, record)
    plain = ExperimentConfig(**TINY)
    run_experiment(plain, progress=False)
    (run_dir(plain) / MODEL_FILE).unlink()  # a record whose weights were lost

    stale = run_row(run_dir(guarded))
    assert stale["state"] == "stale" and "tail_scale" in stale["note"]
    assert stale["acc"] == record["metrics"]["acc"]  # still shown, flagged
    lost = run_row(run_dir(plain))
    assert lost["state"] == "stale" and MODEL_FILE in lost["note"]
    main(["runs", "--unfinished"])  # stale runs are finished trainings, not unfinished ones
    assert capsys.readouterr().out.strip() == f"0 runs in {tmp_cache / 'runs'}"


@pytest.mark.parametrize("broken", ["record.json", "config.json", "checkpoint.pt"])
def test_a_file_that_fails_to_load_marks_the_run_unreadable(tmp_cache, broken: str) -> None:
    folder = tmp_cache / "runs" / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / broken).write_bytes(b"{not json, not a checkpoint")
    row = run_row(folder)
    assert row["state"] == "unreadable" and row["key"] == folder.name
    assert row["note"]


def test_an_empty_or_missing_cache_lists_no_runs(tmp_cache, capsys) -> None:
    assert cached_runs(tmp_cache) == []
    main(["runs"])
    assert capsys.readouterr().out.strip() == f"0 runs in {tmp_cache / 'runs'}"


def test_cli_runs_prints_the_table_and_writes_every_column(
    tiny_fashion, tmp_cache, capsys, monkeypatch, tmp_path
) -> None:
    done = ExperimentConfig(**TINY, attack="blend", poison_rate=0.05)
    run_experiment(done, progress=False)
    unfinished = done.replace(seed=1)
    _interrupted_run(unfinished, 1, monkeypatch)

    out = tmp_path / "runs.csv"
    main(["runs", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"2 runs in {tmp_cache / 'runs'}: 1 done, 1 training"
    assert lines[0].split()[:4] == ["key", "state", "epochs_done", "epochs"]
    assert any(done.key() in line and "5 %" in line and "blend" in line for line in lines)
    with out.open() as file:
        written = {row["key"]: row for row in csv.DictReader(file)}
    assert written[done.key()]["poison_rate"] == "0.05"
    assert written[unfinished.key()]["epochs_done"] == "1"

    main(["runs", "--unfinished"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"1 run in {tmp_cache / 'runs'}: 1 training"
    assert not any(done.key() in line for line in lines)


def test_printed_tables_show_only_acc_and_asr_as_percentages(capsys) -> None:
    _print_rows(
        [{"acc": 0.5, "asr_pure": 0.25, "train_s": 0.5, "seed": None}],
        ["acc", "asr_pure", "train_s", "seed"],
    )
    header, row = capsys.readouterr().out.splitlines()
    assert row.split() == ["50.00", "25.00", "0.5"]  # a 0.5 s training is not "50.00"
