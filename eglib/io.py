"""Safe files: atomic JSON and tensor-state writes, weights-only loads, config hashes, run info."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from eglib.config import default_device


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Call `write` on a temp file beside `path`, fsync it, then os.replace it onto `path`.

    Readers see the old file or the complete new one, never a partial write; on any error
    the temp file is removed and the old file is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; results are meant to be shared
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically (dataclasses and paths are converted)."""

    def write(f: IO[bytes]) -> None:
        json.dump(obj, codecs.getwriter("utf-8")(f), indent=2, default=_json_default)

    write_atomic(path, write)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (e.g. a CSV or Markdown table)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_state_atomic(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """torch.save a dict of tensors and plain data (numbers, strings, lists, dicts) atomically."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    write_atomic(path, lambda f: torch.save(state, f))


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a `save_state_atomic` file onto the CPU; refuses arbitrary pickled objects."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    return state


def _json_default(obj: Any) -> Any:
    """JSON fallback: dataclass instances as dicts, paths and devices as strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def config_hash(obj: Any) -> str:
    """16 hex chars of the sha256 of `obj` as canonical JSON (sorted keys; dataclasses as dicts)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 (16 hex chars) of the shapes and bytes of uint8 images and int labels."""
    digest = hashlib.sha256()
    for tensor in (images, labels):
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 (16 hex chars) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows of it."""
    try:
        lines = Path(cpuinfo).read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "cpu"


def environment_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Plain data on where a run happens (device default: `default_device()`), versions, CPUs.

    The CPU model and the SIMD level torch's kernels use (`cpu_capability`) are recorded
    because they change the order of float sums: one config, seed and thread count trained
    on two machines can differ in its last digits, and the record then says why."""
    dev = torch.device(device) if device is not None else default_device()
    cpu = cpu_model()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu,
        "cpu_model": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
