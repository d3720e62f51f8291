"""Fixtures shared by the test folders."""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import typing as T
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import loguru
import pytest
from loguru import logger

from tests.s3_server import MotoS3, moto_server


@pytest.fixture(autouse=True)
def _private_spool(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test's services spool into a folder of their own, never the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def moto_s3(tmp_path: Path) -> Iterator[MotoS3]:
    """An S3-compatible server (moto) on 127.0.0.1 with an empty bucket, for the test only.

    Yields ``(endpoint_url, bucket, environ)``: ``environ`` holds ``MLFLOW_S3_ENDPOINT_URL``
    and the ``AWS_*`` credentials and region a server needs to store artifacts there (see
    tests/s3_server.py). Stopped when the test ends, even when it fails.
    """
    with moto_server(tmp_path) as s3:
        yield s3


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, T.Any]:
        return T.cast(dict[str, T.Any], json.loads(self.body))

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode()))


@dataclass
class Receiver:
    """A webhook receiver: records each POST; answers ``status`` after ``delay`` seconds."""

    port: int
    requests: list[Request] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0
    answered: threading.Event = field(default_factory=threading.Event)

    def url(self, scheme: str = "json", path: str = "/hook") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(port=0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append(Request(self.path, dict(self.headers), body))
            time.sleep(state.delay)
            self.send_response(state.status)
            self.end_headers()
            self.wfile.write(b"{}")
            state.answered.set()

        def log_message(self, *args: T.Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@dataclass
class LogCapture:
    """Records (level, message) of everything loguru logs while the fixture is active."""

    records: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, level: str) -> list[str]:
        return [message for name, message in self.records if name == level]


@pytest.fixture
def captured_logs() -> Iterator[LogCapture]:
    """A loguru sink added by the test; only its own id is removed afterwards."""
    capture = LogCapture()

    def sink(message: loguru.Message) -> None:
        capture.records.append((message.record["level"].name, message.record["message"]))

    handler_id = logger.add(sink, level="DEBUG", format="{message}")
    yield capture
    logger.remove(handler_id)


def notify_timed(alerts: T.Any, titles: T.Sequence[str], message: str) -> list[float]:
    """Send one alert per title; return how long each ``notify`` call took, in seconds."""
    durations = []
    for title in titles:
        started = time.monotonic()
        alerts.notify(title, message)
        durations.append(time.monotonic() - started)
    return durations


def recover_command(
    cwd: Path, store: str, spool_dir: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """``regression-model-template recover`` as a user runs it, configured by the environment."""
    from regression_model_template.testing import clean_environ

    return subprocess.run(
        [sys.executable, "-m", "regression_model_template", "recover", *args],
        cwd=cwd,
        env=clean_environ(MLFLOW_TRACKING_URI=store, RMT_MLFLOW__SPOOL_DIR=str(spool_dir)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120.0,  # measured: 3-5 s
        check=False,
    )


def run_log(client: T.Any, run_id: str, folder: Path) -> str | None:
    """The run's ``run.log`` artifact, downloaded from the store (None: the run has none)."""
    if "run.log" not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return None
    target = folder / f"download-{run_id}"
    target.mkdir(exist_ok=True)
    return Path(client.download_artifacts(run_id, "run.log", str(target))).read_text()


# %% a job in a child process, logging into an MlflowService

CHILD_TIMEOUT = 120.0  # seconds a child process may take (measured: 3-5 s to start)

_CHILD_JOB = """
import os, sys, time
from regression_model_template.io.services import MlflowService
store, spool_dir, progress = sys.argv[1:4]
RunConfig = MlflowService.RunConfig
service = MlflowService(
    tracking_uri=store, spool_dir=spool_dir, experiment_name="children", autolog_disable=True,
    flush_interval=0.05,
)
{body}
"""


@contextlib.contextmanager
def child_job(
    tmp_path: Path, name: str, body: str, store: str, spool_dir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A child Python process running ``body``; yields it and its progress file; always ended.

    ``body`` finds ``service`` (an MlflowService on ``store``, not started), ``RunConfig`` and
    ``progress`` (the progress file's path). It writes its run ID as the first line of the
    progress file, then what it reports. Its stdout and stderr go to ``tmp_path/<name>.log``.
    """
    script = tmp_path / f"{name}.py"
    script.write_text(_CHILD_JOB.format(body=textwrap.dedent(body)))
    progress = tmp_path / f"{name}.progress"
    output = tmp_path / f"{name}.log"
    from regression_model_template.testing import clean_environ

    with output.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(script), store, str(spool_dir), str(progress)],
            cwd=tmp_path,
            env=clean_environ(),
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, progress
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(CHILD_TIMEOUT)
        if process.stdin is not None:
            process.stdin.close()


def wait_until(
    condition: Callable[[], bool], process: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    """Wait for ``condition``; fail the test, with the child's output, if the child exits first."""
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not condition():
        if process.poll() is not None:
            output = log.read_text(errors="replace") if log.exists() else ""
            pytest.fail(f"the child exited ({process.returncode}) before {what}:\n{output}")
        if time.monotonic() > deadline:
            pytest.fail(f"the child did not reach {what} within {CHILD_TIMEOUT:g} s")
        time.sleep(0.01)


def eventually(condition: Callable[[], bool], what: str, seconds: float = 60.0) -> None:
    """Wait for ``condition`` (no child process to watch); fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds:g} s: {what}")
        time.sleep(0.05)


def whole_lines(path: Path) -> list[str]:
    """The whole lines of ``path`` (a line still being written is left out)."""
    if not path.exists():
        return []
    text = path.read_bytes().decode()
    return text.split("\n")[:-1]


# %% a small disk that fills up


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a tmpfs of a given size (``small_tmpfs("2m")``) under ``tmp_path``: a real disk.

    Needs root: skipped with the reason where it cannot be mounted, failed instead under
    ``CI=true``. Unmounted when the test ends, even when it fails (lazily if still busy).
    """
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs-{len(mounts)}"
        folder.mkdir()
        try:
            result = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                capture_output=True,
                text=True,
                check=False,
            )
            problem = result.stderr.strip() if result.returncode else None
        except FileNotFoundError as error:
            problem = str(error)
        if problem is not None:
            reason = f"cannot mount a {size} tmpfs (a real full disk; needs root): {problem}"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
        mounts.append(folder)
        return folder

    try:
        yield mount
    finally:
        for folder in reversed(mounts):
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(folder)], check=True)


def fill_disk(folder: Path) -> Path:
    """Write a file in ``folder`` until its disk is full; return it (delete it to free the disk)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (65536, 4096, 1):
            while True:
                try:
                    if os.write(fd, b"x" * chunk) < chunk:
                        break
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port of 127.0.0.1 that something else listens on (an `mlflow ui` on 5000, say)."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])
