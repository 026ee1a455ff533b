"""`python -m eglib`: bad input ends with one line and exit status 2, before anything trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from eglib import experiments, sweep
from eglib.__main__ import _parse_params, build_parser, main
from eglib.config import PROFILES

GRID = "profile: ci\nbase: {attack: badnets}\ngrid: {seed: [0]}\n"


@pytest.fixture
def no_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache, and a test failure if a command reads data or starts a run."""
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(experiments, "prepare_data", lambda cfg: pytest.fail("data read"))
    monkeypatch.setattr(sweep, "_run_one", lambda *a: pytest.fail("a run started"))
    (tmp_path / "grid.yaml").write_text(GRID)
    return tmp_path


def _error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line `main(argv)` prints before exiting with status 2."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, (argv, err)
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # was SystemExit with status 1
        (["train", "--defense-param", "k8"], "--defense-param 'k8': expected KEY=VALUE"),
        (["train", "--attack-param", "=4"], "--attack-param '=4': expected KEY=VALUE"),
        # the last one was kept silently
        (
            [
                "train",
                "--defense",
                "eigenguard",
                "--defense-param",
                "k=4",
                "--defense-param",
                "k=8",
            ],
            "--defense-param: parameter 'k' given twice",
        ),
        (
            ["train", "--attack-param", "size=4", "--attack-param", "size=5"],
            "--attack-param: parameter 'size' given twice",
        ),
        # were KeyError tracebacks
        (["figures", "--only", "nope"], "unknown study 'nope'; allowed: ["),
        (
            ["figures", "--only", "ablations", "--ablations", "nope"],
            "unknown ablation 'nope'; allowed: [",
        ),
        # said "'defence_table' takes []", though it takes --seeds
        (
            ["figures", "--only", "defence_table", "--only", "ablations", "--seeds", "0"],
            "need exactly one study that takes them; got 2 studies: defence_table, ablations",
        ),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    argv: list[str], message: str, no_training: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error_line([*argv, "--profile", "ci"], capsys)
    assert message in line, line


def test_missing_grid_file_is_one_line_naming_it(
    no_training: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Was a FileNotFoundError traceback."""
    missing = no_training / "absent.yaml"
    line = _error_line(["sweep", str(missing)], capsys)
    assert f"grid file {missing} does not exist" in line, line
    line = _error_line(["sweep", str(no_training)], capsys)
    assert f"grid file {no_training} is a folder" in line, line


def test_bad_eglib_device_is_one_line_and_status_2(
    no_training: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """EGLIB_DEVICE=gpu was a RuntimeError traceback (in every worker of a sweep)."""
    monkeypatch.setenv("EGLIB_DEVICE", "gpu")
    for argv in (["train", "--profile", "ci"], ["sweep", str(no_training / "grid.yaml")]):
        line = _error_line(argv, capsys)
        assert "EGLIB_DEVICE='gpu' is not a device; allowed: cpu" in line, line


def test_parameters_given_twice_are_refused() -> None:
    with pytest.raises(ValueError, match=r"parameter 'k' given twice"):
        _parse_params(["k=4", "tail=0.5", "k=8"])
    assert _parse_params(["k=4", "tail=0.5"]) == {"k": 4, "tail": 0.5}


def test_profile_help_names_every_profile() -> None:
    """`train --profile` listed ci, demo and full, not lite."""
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for command in ("train", "figures"):
        (profile,) = [a for a in subcommands[command]._actions if a.dest == "profile"]
        assert all(name in (profile.help or "") for name in PROFILES), (command, profile.help)
