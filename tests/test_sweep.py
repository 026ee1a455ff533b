"""Tests for eglib.sweep: grid expansion (dotted keys, profiles), grid files and their errors,
atomic CSV writing, and run_grid in 2 processes with a cheap stand-in for training."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures.process import _ExecutorManagerThread
from pathlib import Path
from typing import Any

import pytest

from eglib import sweep
from eglib.config import PROFILES
from eglib.experiments import ExperimentConfig, run_dir


def _fake_run_one(cfg: ExperimentConfig, threads: int) -> dict[str, Any]:
    """Stand-in for `sweep._run_one` (module level, so spawned workers can unpickle it):
    early configs finish last, so completion order differs from config order."""
    time.sleep(0.3 if cfg.seed < 2 else 0.0)
    return {"seed": cfg.seed, "defense": cfg.defense, "threads": threads, "pid": os.getpid()}


def _undefended_first_run_one(cfg: ExperimentConfig, threads: int) -> dict[str, Any]:
    """Stand-in for `sweep._run_one`: 'none' takes 0.5 s and caches its record; any other
    run reports whether the cache held its undefended run when it started."""
    if cfg.defense == "none":
        time.sleep(0.5)
        run_dir(cfg).mkdir(parents=True)
        (run_dir(cfg) / "record.json").write_text("{}")
        return {"defense": "none"}
    base = cfg.replace(defense="none", defense_params={})
    return {"defense": cfg.defense, "found": (run_dir(base) / "record.json").exists()}


def _failing_run_one(cfg: ExperimentConfig, threads: int) -> dict[str, Any]:
    """Stand-in for `sweep._run_one`: seed 0 fails at once, every other run takes 30 s."""
    if cfg.seed == 0:
        raise ValueError("boom")
    time.sleep(30)
    return {"seed": cfg.seed}


# ----------------------------------------------------------------------------------------------
# expand_grid / load_grid
# ----------------------------------------------------------------------------------------------


def test_expand_grid_product_order_profile_and_dotted_keys() -> None:
    base = {"attack": "badnets", "defense": "eigenguard", "defense_params": {"rule": "kth"}}
    grid: dict[str, Sequence[Any]] = {"defense_params.k": [1, 4], "seed": [0, 1, 2]}
    configs = sweep.expand_grid(base, grid, "ci")
    assert len(configs) == 6
    assert [(dict(c.defense_params)["k"], c.seed) for c in configs] == [
        (1, 0),
        (1, 1),
        (1, 2),
        (4, 0),
        (4, 1),
        (4, 2),
    ]  # the first grid key varies slowest
    assert all(dict(c.defense_params)["rule"] == "kth" for c in configs)  # merged with base
    assert base == {"attack": "badnets", "defense": "eigenguard", "defense_params": {"rule": "kth"}}
    first = configs[0]
    ci = PROFILES["ci"]
    assert (first.epochs, first.train_size, first.batch_size) == (
        ci.epochs,
        ci.train_size,
        ci.batch_size,
    )
    assert sweep.expand_grid({}, {"epochs": [7]}, "ci")[0].epochs == 7  # grid beats profile
    assert sweep.expand_grid({"attack": "blend"}, {}, "ci") == [
        ExperimentConfig.from_profile("ci", attack="blend")
    ]
    dotted = sweep.expand_grid({}, {"attack_params.size": [5]}, "ci")[0]
    assert dict(dotted.attack_params) == {"size": 5}


@pytest.mark.parametrize("values", [[], (1, 2), 3, "abc", None])
def test_expand_grid_rejects_non_lists(values: Any) -> None:
    with pytest.raises(ValueError, match=r"grid entry 'seed' must be a non-empty list"):
        sweep.expand_grid({}, {"seed": values}, "ci")


def test_expand_grid_unknown_field_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"atack.*allowed"):
        sweep.expand_grid({}, {"atack": ["badnets"]}, "ci")
    with pytest.raises(ValueError, match="'seed' is not a dict"):
        sweep.expand_grid({"seed": 0}, {"seed.x": [1]}, "ci")
    with pytest.raises(ValueError, match="'attack' is not a dict"):  # made {'x': 1} before
        sweep.expand_grid({}, {"attack.x": [1]}, "ci")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seed": "0"}, "seed='0'; must be an int >= 0"),  # another cache key than seed 0
        ({"seed": True}, "seed=True; must be an int"),
        ({"epochs": 2.5}, "epochs=2.5; must be an int >= 1"),
        ({"epochs": "5"}, "epochs='5'; must be an int"),
        ({"train_size": -5}, "train_size=-5; must be an int >= 1"),
        ({"target": "1"}, "target='1'; must be an int"),
        ({"attack": 5}, "attack=5; must be a name"),
        ({"poison_rate": "abc"}, "poison_rate='abc'; must be a finite number in \\(0.0, 1.0\\]"),
        ({"augment": 1}, "augment=1; must be True or False"),
        ({"track_stages": "conv1"}, "track_stages='conv1'; must be a list of stage names"),
        ({"attack": None, "attack_params": {"size": 3}}, "with attack=None: no attack takes"),
    ],
)
def test_config_fields_of_the_wrong_type_are_named(fields: dict[str, Any], message: str) -> None:
    """A grid file's `seed: "0"` or `epochs: 2.5` was taken silently (or crashed in training)."""
    with pytest.raises(ValueError, match=message):
        sweep.expand_grid({}, {name: [value] for name, value in fields.items()}, "ci")


def test_run_grid_checks_every_config_before_training_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown model or parameter, or a missing one, failed only when its run came up,
    after the runs before it had trained (an unknown parameter as a bare TypeError)."""
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(sweep, "_run_one", lambda *a: pytest.fail("a run started"))
    good = sweep.expand_grid({"attack": "badnets"}, {"seed": [0]}, "ci")[0]
    bad = [
        (good.replace(model="resnet-9"), "unknown model 'resnet-9'; allowed"),
        (good.replace(attack_params={"kk": 3}), "attack 'badnets' has no parameter 'kk'"),
        (good.replace(defense="ft", defense_params={"kk": 3}), "no parameter 'kk'; allowed"),
        (good.replace(defense="eigenguard"), "defence 'eigenguard' needs the parameter 'k'"),
        (
            good.replace(defense="eigenguard", defense_params={"k": "abc"}),
            "k='abc'; must be an int",
        ),
        (good.replace(target=12), "target=12; fashion-mnist has classes 0..9"),
    ]
    for cfg, message in bad:
        with pytest.raises(ValueError, match=f"run 1 of the grid .*{message}"):
            sweep.run_grid([good, cfg], jobs=1, progress=False)


def test_expand_grid_bad_values_name_themselves() -> None:
    with pytest.raises(ValueError, match="poison_rate=1.5"):
        sweep.expand_grid({}, {"poison_rate": [0.1, 1.5]}, "ci")
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        sweep.expand_grid({}, {"seed": [0]}, "huge")


def test_load_grid_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "grid.yaml"
    yaml_file.write_text(
        "profile: ci\nbase: {attack: blend}\ngrid:\n  defense: [none, ss]\n  seed: [0, 1]\n"
    )
    configs = sweep.load_grid(yaml_file)
    epochs = PROFILES["ci"].epochs
    assert [(c.attack, c.defense, c.seed, c.epochs) for c in configs] == [
        ("blend", "none", 0, epochs),
        ("blend", "none", 1, epochs),
        ("blend", "ss", 0, epochs),
        ("blend", "ss", 1, epochs),
    ]
    json_file = tmp_path / "grid.json"
    json_file.write_text(json.dumps({"profile": "ci", "grid": {"defense_params.k": [2]}}))
    assert dict(sweep.load_grid(json_file)[0].defense_params) == {"k": 2}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "profile: ci\ngrids: {seed: [0]}\n",
            r"top-level keys must be among \['base', 'grid', 'profile'\]",
        ),
        ("- seed\n- 0\n", "top-level keys must be among"),
        ("profile: ci\ngrid: {seed: 0}\n", "grid entry 'seed' must be a non-empty list, got 0"),
        ("profile: nope\ngrid: {seed: [0]}\n", "unknown profile 'nope'"),
        (
            "profile: ci\ngrid:\n  seed: [0]\n  seed: [1]\n",
            r"key 'seed' is given twice \(mapping at line 3\)",
        ),
        ("profile: ci\nprofile: full\ngrid: {seed: [0]}\n", "key 'profile' is given twice"),
        (
            "grid: {seed: [0\n",
            r"not valid YAML: expected ',' or '\]', but got '<stream end>' at line 2",
        ),
        ("grid: {seed: [0, 1, 0]}\n", r"grid runs 0 and 2 are the same experiment \(key "),
    ],
)
def test_bad_grid_files_give_clear_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        sweep.load_grid(path)


def test_json_grid_file_refuses_a_key_given_twice(tmp_path: Path) -> None:
    path = tmp_path / "grid.json"
    path.write_text('{"profile": "ci", "grid": {"seed": [0], "seed": [1]}}')
    with pytest.raises(ValueError, match=r"grid file .*grid.json: key 'seed' is given twice"):
        sweep.load_grid(path)


def test_missing_grid_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sweep.load_grid(tmp_path / "absent.yaml")


# ----------------------------------------------------------------------------------------------
# write_csv
# ----------------------------------------------------------------------------------------------


def test_write_csv_columns_in_first_seen_order(tmp_path: Path) -> None:
    path = tmp_path / "out" / "table.csv"
    rows = [{"attack": "badnets", "acc": 0.9}, {"attack": "blend", "asr": 0.5, "acc": 0.8}]
    sweep.write_csv(rows, path)
    with path.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["attack", "acc", "asr"]
        got = list(reader)
    assert got == [
        {"attack": "badnets", "acc": "0.9", "asr": ""},
        {"attack": "blend", "acc": "0.8", "asr": "0.5"},
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]  # no temp files left


def test_write_csv_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "table.csv"
    sweep.write_csv([{"a": 1}], path)
    before = path.read_text()

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        sweep.write_csv([{"a": 2, "b": 3}], path)
    assert path.read_text() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]  # temp file removed


# ----------------------------------------------------------------------------------------------
# run_grid
# ----------------------------------------------------------------------------------------------


def test_run_grid_two_processes_rows_in_config_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path))  # workers inherit it
    monkeypatch.setattr(sweep, "_run_one", _fake_run_one)
    # threads per worker: the CPUs this process may use (4), not the machine's, over the jobs
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    configs = sweep.expand_grid({"attack": "badnets"}, {"seed": [0, 1, 2, 3, 4, 5]}, "ci")
    for cfg in configs[:2]:  # two runs already in the cache
        run_dir(cfg).mkdir(parents=True)
        (run_dir(cfg) / "record.json").write_text("{}")
    rows = sweep.run_grid(configs, jobs=2, progress=True)
    assert [r["seed"] for r in rows] == [0, 1, 2, 3, 4, 5]  # config order, not finish order
    pids = {r["pid"] for r in rows}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # in worker processes
    assert {r["threads"] for r in rows} == {2}
    assert "2 cached" in capsys.readouterr().err  # the progress bar counts cached runs


def test_runs_that_repair_the_undefended_model_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FT listed first and 2 free workers: it still starts only once the 'none' run of its
    config is cached, so it repairs that model instead of training a copy beside it."""
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(sweep, "_run_one", _undefended_first_run_one)
    configs = sweep.expand_grid(
        {"attack": "badnets"}, {"defense": ["ft", "eigenguard", "none"]}, "ci"
    )
    configs[1] = configs[1].replace(defense_params={"k": 4})
    assert sweep.run_waves(configs) == [[1, 2], [0]]  # EigenGuard trains its own model
    rows = sweep.run_grid(configs, jobs=2, progress=False)
    assert rows == [
        {"defense": "ft", "found": True},
        {"defense": "eigenguard", "found": False},
        {"defense": "none"},
    ]
    assert sweep.run_waves(configs) == [[0, 1, 2]]  # all cached: nothing waits


def test_run_grid_names_an_unknown_defence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path))
    configs = sweep.expand_grid({"attack": "badnets"}, {"defense": ["none", "bogus"]}, "ci")
    with pytest.raises(ValueError, match="unknown defence 'bogus'; allowed: .*'ft'"):
        sweep.run_grid(configs, jobs=1, progress=False)


def test_run_grid_rejects_zero_jobs() -> None:
    with pytest.raises(ValueError, match="jobs=0; must be >= 1"):
        sweep.run_grid([], jobs=0)


def test_run_grid_stops_at_a_failed_run_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing run stops the grid at once: queued runs are cancelled, running ones ended
    (before, the pool's exit waited for every queued run and left nothing to interrupt)."""
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(sweep, "_run_one", _failing_run_one)
    configs = sweep.expand_grid({"attack": "badnets"}, {"seed": [0, 1, 2, 3]}, "ci")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"run 0 of the grid failed \(key .* seed=0\).*boom"):
        sweep.run_grid(configs, jobs=2, progress=False)
    assert time.perf_counter() - start < 20  # not 30 s of the running run, nor 60 of the queue
    # the pool's manager thread is done too: while it lives it reaps the workers concurrently
    # with us, and a worker reaped by one thread can read as alive to the other (CI saw it)
    assert not [t for t in threading.enumerate() if isinstance(t, _ExecutorManagerThread)]
    assert multiprocessing.active_children() == []  # no worker left behind


_SWEEP_SCRIPT = """
import time
from eglib import sweep


def slow_run(cfg, threads):
    time.sleep(120)
    return {"seed": cfg.seed}


if __name__ == "__main__":
    sweep._run_one = slow_run
    sweep.run_grid(sweep.expand_grid({"attack": "badnets"}, {"seed": [0, 1]}, "ci"), jobs=2,
                   progress=False)
"""


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for a reaper does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _python_children(pid: int) -> list[int]:
    """The worker processes of `pid` (its children, without multiprocessing's resource
    tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(c)
        for c in children
        if _alive(int(c)) and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()
    ]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigterm_to_a_sweep_stops_its_workers(tmp_path: Path) -> None:
    """SIGTERM (a batch system's or `kill`'s stop) ends the workers too; before, the sweep died
    at once and left them training (here: sleeping 120 s)."""
    script = tmp_path / "sweep_script.py"
    script.write_text(_SWEEP_SCRIPT)
    env = {**os.environ, "EGLIB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers := _python_children(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "no workers started"
            time.sleep(0.2)
        time.sleep(1.0)  # the workers have picked up their runs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)]
    finally:  # leave nothing behind, whatever failed
        proc.kill()
        for worker in workers:
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)


def test_cli_bad_input_is_one_line_and_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--jobs 0` was a traceback, `train --epochs 0` ran the profile's epochs, and an
    `--out` folder failed only after the whole sweep had trained."""
    from eglib.__main__ import main

    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(sweep, "_run_one", lambda *a: pytest.fail("a run started"))
    grid = tmp_path / "grid.yaml"
    grid.write_text("profile: ci\nbase: {attack: badnets}\ngrid: {seed: [0]}\n")
    cases = [
        (["sweep", str(grid), "--jobs", "0"], "'0' is not an int >= 1"),
        (["sweep", str(grid), "--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
        (["train", "--profile", "ci", "--epochs", "0"], "epochs=0; must be an int >= 1"),
        (["train", "--profile", "ci", "--train-size", "0"], "train_size=0; must be an int"),
        (["train", "--profile", "huge"], "unknown profile 'huge'; allowed"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert "(from EGLIB_PROFILE)" not in err  # the name came from --profile
