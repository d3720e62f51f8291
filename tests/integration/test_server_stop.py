"""The ``server`` command stops once: Ctrl-C or SIGTERM again while it stops cannot cut that short.

A real stack (PostgreSQL and ``mlflow server``) run by the command, real signals. The stop takes
its time because a client is in the middle of a download: the server's worker finishes the
request it serves before it exits.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (
    lines_until,
    postgres_folder,
    require_postgres,
    server_command,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

STOP_TIMEOUT = 120.0  # seconds the command may take to stop (measured: 1-3 s)


@contextlib.contextmanager
def _download_in_progress(url: str, artifacts: Path) -> Iterator[None]:
    """A client downloading a large artifact, reading nothing after the first byte, until the end.

    The server's worker is busy with it until the client goes away: the server's stop waits.
    """
    large = artifacts / "large.bin"
    with large.open("wb") as file:
        file.truncate(256 * 2**20)  # more than the socket buffers hold; sparse on disk
    port = int(url.rpartition(":")[2])
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=STOP_TIMEOUT)
    try:
        client.request("GET", "/api/2.0/mlflow-artifacts/artifacts/large.bin")
        response = client.getresponse()
        assert response.status == 200, response.read(1000)
        assert response.read(1) == b"\0"  # the worker is serving it
        yield
    finally:
        client.close()


def _wait_for(what: str, path: Path, command: subprocess.Popen[str]) -> None:
    """Wait until ``path`` holds the text ``what``; fail if the command exits first."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while what not in path.read_text(errors="replace"):
        if command.poll() is not None:
            pytest.fail(f"the command exited ({command.returncode}) before {what!r} in {path}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what!r} in {path} within {STOP_TIMEOUT:g} s")
        time.sleep(0.05)


def test_ctrl_c_or_sigterm_again_while_the_server_stops_is_ignored(tmp_path: Path) -> None:
    require_postgres()
    folder = postgres_folder("rmt-server-stop-")
    command = server_command(folder, cwd=tmp_path, merged=True)
    try:
        # given the server command running, and a client downloading from its server
        lines = lines_until(command, "tracking server ready")
        assert lines[-1].startswith("tracking server ready: "), "".join(lines)
        url = lines[-1].split()[3]
        with _download_in_progress(url, folder / "artifacts"):
            # when a supervisor's SIGTERM stops it, and the stop waits for the download
            command.send_signal(signal.SIGTERM)
            _wait_for("Handling signal: term", folder / "server.log", command)
            assert command.poll() is None

            # and Ctrl-C, SIGTERM and a hangup (a closed terminal) come while it stops
            for repeat in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                command.send_signal(repeat)
                time.sleep(1.0)  # time for the repeat to act, were it not ignored

            # then the command still waits for its server, which still serves the download
            assert command.poll() is None
        # (the client goes away: the server's stop can end)
        rest, _ = command.communicate(timeout=STOP_TIMEOUT)
    finally:
        if command.poll() is None:  # the test failed: stop the stack for good
            command.send_signal(signal.SIGINT)
            command.communicate(timeout=STOP_TIMEOUT)

    # and the stop ends as a single stop does: both servers stopped, no process left
    output = "".join(lines) + rest
    assert command.returncode == 0, output
    assert rest.endswith("stopped: mlflow server and PostgreSQL\n"), output
    left = subprocess.run(["pgrep", "-af", str(folder)], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
    assert rest.count("again while stopping: ignored") == 1, output  # said once, not per signal
    assert "SIGHUP ignored" in rest, output  # one server: nothing to restart, nothing ended
    shutil.rmtree(folder)
