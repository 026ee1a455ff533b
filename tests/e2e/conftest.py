"""Fixtures of the browser tests: a private JupyterLab server and a headless Debian Chromium.

The server runs from this repository's virtualenv on a free loopback port with a random
token, its own temporary Jupyter config / data / runtime folders (so nothing of the user's
Jupyter set-up leaks in) and a kernelspec `python3` pointing at the virtualenv's Python. It
gets EGLIB_PROFILE=ci and the eglib cache of the test run, so the notebook loads the models
the test trained (or found) beforehand. Server, kernels and browser are shut down in every
case. No Chromium at /usr/bin/chromium (or on PATH), or no playwright: the tests are skipped.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
ARTIFACTS = REPO / "test-artifacts" / "e2e"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 120


@dataclass(frozen=True)
class LabServer:
    """A running JupyterLab: its base URL, token, process and log file."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path

    def lab_url(self, path: str) -> str:
        """The URL that opens `path` (relative to the repository) in JupyterLab, logged in."""
        return f"{self.url}/lab/tree/{path}?token={self.token}"

    def api(self, path: str) -> Any:
        """GET a server REST endpoint (e.g. 'kernelspecs'), parsed JSON."""
        request = urllib.request.Request(
            f"{self.url}/api/{path}", headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def chromium_path() -> str | None:
    """Debian's Chromium: /usr/bin/chromium, else `chromium` on PATH; None when absent."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(url: str, token: str, method: str = "GET") -> int:
    """HTTP status of a token-authenticated request (0 when the server does not answer)."""
    request = urllib.request.Request(
        url, method=method, headers={"Authorization": f"token {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def _jupyter_env(root: Path, cache: str) -> dict[str, str]:
    """Environment of the server: private Jupyter folders, kernelspec, eglib settings."""
    folders = {
        "JUPYTER_CONFIG_DIR": root / "config",
        "JUPYTER_DATA_DIR": root / "data",
        "JUPYTER_RUNTIME_DIR": root / "runtime",
        "JUPYTERLAB_SETTINGS_DIR": root / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": root / "lab-workspaces",
        "IPYTHONDIR": root / "ipython",
    }
    for folder in folders.values():
        folder.mkdir(parents=True)
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    kernel_dir = folders["JUPYTER_DATA_DIR"] / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    kernel = {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (eglib .venv)",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(kernel))
    # no "receive Jupyter news?" toast over the page
    labconfig = folders["JUPYTER_CONFIG_DIR"] / "labconfig"
    labconfig.mkdir()
    disabled = {"@jupyterlab/apputils-extension:announcements": True}
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": disabled}))
    # never save the notebook: it is the repository's file, kept without outputs
    docmanager = folders["JUPYTERLAB_SETTINGS_DIR"] / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's default
    env.update({name: str(path) for name, path in folders.items()})
    env["JUPYTER_PREFER_ENV_PATH"] = "0"  # our data folder's kernelspec before the venv's
    env.update({"EGLIB_PROFILE": "ci", "EGLIB_CACHE": cache, "PYTHONUNBUFFERED": "1"})
    return env


def _kill_kernels(runtime_dir: Path) -> None:
    """SIGKILL what is left of the kernels our server started (their connection files live
    in our private runtime folder, which names them)."""
    marker = str(runtime_dir).encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and b"ipykernel" in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stop(server: LabServer, runtime_dir: Path) -> None:
    """Shut the server down politely, then its process group by force, then stray kernels."""
    if server.process.poll() is None:
        _request(f"{server.url}/api/shutdown", server.token, method="POST")
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(server.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    server.process.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
    _kill_kernels(runtime_dir)


@pytest.fixture
def lab_server(tmp_path: Path, eglib_cache: str) -> Iterator[LabServer]:
    """JupyterLab on notebooks of this repository, for the duration of one test."""
    env = _jupyter_env(tmp_path / "jupyter", eglib_cache)
    port, token = _free_port(), secrets.token_hex(24)
    args = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={REPO}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if os.geteuid() == 0:
        args.append("--allow-root")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / "jupyterlab.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as one
        )
    server = LabServer(f"http://127.0.0.1:{port}", token, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _request(f"{server.url}/api/status", token) != 200:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with {process.returncode}; see {log}")
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within {START_TIMEOUT_S} s; see {log}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(server, Path(env["JUPYTER_RUNTIME_DIR"]))


@pytest.fixture
def artifacts() -> Path:
    """test-artifacts/e2e/ of the repository (screenshots, the server's log)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def eglib_cache() -> str:
    """The eglib cache folder of this test run (EGLIB_CACHE, else the default), shared with
    the notebook runs so a model is trained once."""
    from eglib.config import cache_dir

    return str(cache_dir())


@pytest.fixture
def page() -> Iterator[Any]:
    """A page of headless Debian Chromium driven by playwright (1500 x 1000 viewport)."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium at /usr/bin/chromium or on PATH (install it: make browser)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package does not import"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1000})
            yield context.new_page()
        finally:
            browser.close()
