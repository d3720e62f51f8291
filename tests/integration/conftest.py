"""Fixtures of the integration suite: one real ``mlflow server`` per session, on 127.0.0.1.

The server keeps its SQLite store and its artifacts under a temporary directory, answers on a
free port of the loopback interface only, and is always stopped at the end of the session
(SIGTERM to its process group, then SIGKILL), whether the tests passed or not. On Linux it also
receives SIGTERM if the pytest process itself dies without tearing down.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import typing as T
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# These machines have no internet: keep MLflow's telemetry quiet in the test process too.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0  # seconds for /health to answer (measured: ~10 s with one worker)
STOP_TIMEOUT = 10.0  # seconds for a graceful stop before SIGKILL
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

# prctl(2): ask the kernel to signal the child when its parent (pytest) dies.
_PR_SET_PDEATHSIG = 1


def clean_environ(**extra: str) -> dict[str, str]:
    """Return this process's environment without MLflow's or this package's settings, plus extra.

    Subprocesses get only the settings a test gives them (MLflow writes ``MLFLOW_TRACKING_URI``
    and ``MLFLOW_EXPERIMENT_ID`` into ``os.environ`` when used in-process), and never telemetry.
    """
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MLFLOW_", "RMT_"))
    }
    environ.update(QUIET)
    environ.update(extra)
    return environ


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent (pytest) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _output(log: Path, limit: int = 6000) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return text[-limit:] if len(text) > limit else text


def _wait_for_health(process: subprocess.Popen[bytes], url: str, log: Path) -> float:
    """Poll ``GET /health`` until it answers 200; return the seconds it took.

    Fails the session's server tests, with the server's output, when the server exits or does
    not answer within ``STARTUP_TIMEOUT``.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    started = time.monotonic()
    while True:
        code = process.poll()
        if code is not None:
            pytest.fail(
                f"mlflow server exited with code {code} before answering {url}/health; "
                f"its output:\n{_output(log)}",
                pytrace=False,
            )
        # URLError, refused or reset connections: not up yet.
        with contextlib.suppress(OSError), opener.open(f"{url}/health", timeout=2) as response:
            if response.status == 200:
                return time.monotonic() - started
        if time.monotonic() - started > STARTUP_TIMEOUT:
            pytest.fail(
                f"mlflow server did not answer {url}/health within {STARTUP_TIMEOUT:g} s; "
                f"its output:\n{_output(log)}",
                pytrace=False,
            )
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we cannot signal still exists
        return True
    return True


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process it started (its process group): TERM, wait, KILL."""
    pgid = process.pid  # the server leads its own process group (start_new_session)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
    # Workers may outlive the leader for a moment: give them the same grace, then kill them.
    deadline = time.monotonic() + STOP_TIMEOUT
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1, shared by the session; yields its URL.

    SQLite backend store and proxied artifacts (``--serve-artifacts``, the default) under a
    temporary directory; one worker and no background job runner, which starts in about 10 s
    instead of 20-26 s and stays quiet (see FIELD-NOTES.md).
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://{HOST}:{port}"
    log = root / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    environ = clean_environ(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    preexec: T.Callable[[], None] | None = _die_with_parent if sys.platform == "linux" else None
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=root,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        try:
            seconds = _wait_for_health(process, url, log)
            sys.stderr.write(f"\nmlflow server ready at {url} after {seconds:.1f} s\n")
            yield url
        finally:
            _stop(process)
