"""Tests for eglib.io: atomic writes, weights-only loads, config hashes."""

from __future__ import annotations

import pickle
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from eglib import io


class _Unserialisable:
    """A value JSON cannot encode (stands for any object the caller forgot to convert)."""


def test_json_roundtrip_and_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "record.json"
    obj = {"acc": 0.9, "history": [{"epoch": 1, "loss": 1.5}], "name": "x", "path": Path("a/b")}
    io.write_json_atomic(target, obj)
    assert io.read_json(target) == {**obj, "path": "a/b"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_text_roundtrip(tmp_path: Path) -> None:
    target = tmp_path / "table.csv"
    io.write_text_atomic(target, "a,b\n1,é\n")
    io.write_text_atomic(target, "a,b\n2,ü\n")
    assert target.read_text(encoding="utf-8") == "a,b\n2,ü\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_json_write_failing_midway_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    io.write_json_atomic(target, {"old": True})
    # a long list whose last element cannot be encoded: json.dump has already streamed the
    # first part into the temp file when it fails
    bad = {"values": list(range(10_000)) + [_Unserialisable()]}
    with pytest.raises(TypeError, match="_Unserialisable"):
        io.write_json_atomic(target, bad)
    assert io.read_json(target) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_state_write_failing_midway_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.pt"
    io.save_state_atomic(target, {"w": torch.ones(3)})

    def broken_save(obj: object, f: IO[bytes]) -> None:
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_state_atomic(target, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(io.load_state(target)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_state_roundtrip_plain_data(tmp_path: Path) -> None:
    state: dict[str, Any] = {
        "model": {"w": torch.randn(2, 3), "n": torch.tensor(7)},
        "epoch": 3,
        "history": '[{"epoch": 1}]',
        "rng": torch.Generator().manual_seed(1).get_state(),
        "lrs": [0.1, 0.05],
    }
    io.save_state_atomic(tmp_path / "s.pt", state)
    loaded = io.load_state(tmp_path / "s.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["epoch"] == 3 and loaded["history"] == state["history"]
    assert torch.equal(loaded["rng"], state["rng"]) and loaded["lrs"] == [0.1, 0.05]
    with pytest.raises(ValueError, match="must be a dict"):
        io.save_state_atomic(tmp_path / "t.pt", [torch.ones(1)])  # type: ignore[arg-type]


@dataclass
class _Payload:
    """Anything with a custom class: unpickling it would run arbitrary code paths."""

    x: int = 1


def test_load_state_refuses_arbitrary_pickle(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": _Payload()}, path)  # a plain (unsafe) pickle of a custom object
    with pytest.raises(pickle.UnpicklingError):
        io.load_state(path)


@dataclass(frozen=True)
class _Inner:
    a: int
    b: tuple[int, ...]


@dataclass(frozen=True)
class _Config:
    name: str
    inner: _Inner
    rate: float


def test_config_hash_stable_and_order_independent() -> None:
    h = io.config_hash({"a": 1, "b": [1, 2], "c": {"x": 0.5, "y": None}})
    assert h == io.config_hash({"c": {"y": None, "x": 0.5}, "b": [1, 2], "a": 1})
    assert len(h) == 16 and int(h, 16) >= 0
    # a pinned value: the hash must not drift between runs or versions of the code
    assert io.config_hash({"a": 1}) == "015abd7f5cc57a2d"
    assert h != io.config_hash({"a": 1, "b": [2, 1], "c": {"x": 0.5, "y": None}})
    cfg = _Config("badnets", _Inner(3, (1, 2)), 0.1)
    assert io.config_hash(cfg) == io.config_hash(
        {"rate": 0.1, "name": "badnets", "inner": {"b": [1, 2], "a": 3}}
    )
    assert io.config_hash(cfg) != io.config_hash(_Config("badnets", _Inner(3, (1, 2)), 0.2))
    with pytest.raises(TypeError, match="_Unserialisable"):
        io.config_hash({"x": _Unserialisable()})


def test_environment_info_plain_json(tmp_path: Path) -> None:
    info = io.environment_info("cpu")
    assert info["torch"] == torch.__version__ and info["device"] == "cpu"
    assert {"device_name", "python", "platform", "cpu_count"} <= info.keys()
    # the CPU and its SIMD level change float sums: a record must say which it ran on
    assert info["device_name"] == info["cpu_model"] == io.cpu_model()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    io.write_json_atomic(tmp_path / "env.json", info)
    assert io.read_json(tmp_path / "env.json") == info


def test_cpu_model_reads_cpuinfo_and_falls_back(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n")
    assert io.cpu_model(cpuinfo) == "AMD EPYC 9R14"
    cpuinfo.write_text("processor\t: 0\n")  # no model name (some ARM kernels)
    assert io.cpu_model(cpuinfo) == (platform.processor() or platform.machine() or "cpu")
    assert io.cpu_model(tmp_path / "missing") == io.cpu_model(cpuinfo)
