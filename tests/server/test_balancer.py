"""haproxy in front of replicas: spread, a dead one out at once, drained and back, TLS, stopped.

The backends are tiny real HTTP servers (echo_backend.py), one process each, on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import typing as T
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from regression_model_template.server.balancer import (
    Balancer,
    balancer,
)
from regression_model_template.server.processes import free_port
from regression_model_template.server.tls import tls_pair
from tests.conftest import eventually
from tests.integration.conftest import require_balancer

pytestmark = pytest.mark.server

BACKEND = Path(__file__).with_name("echo_backend.py")


class Backends:
    """Backend processes r1..rN on free ports of 127.0.0.1, each in its own process group."""

    def __init__(self, count: int) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * count
        for index in range(count):
            self.start(index)

    def start(self, index: int) -> None:
        process = subprocess.Popen(
            [sys.executable, str(BACKEND), str(self.ports[index]), f"r{index + 1}"],
            start_new_session=True,
        )
        self.processes[index] = process

        def listening() -> bool:
            assert process.poll() is None, f"backend r{index + 1} exited"
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.ports[index]), timeout=1),
            ):
                return True
            return False

        eventually(listening, f"backend r{index + 1} listening")

    def kill(self, index: int) -> None:
        process = self.processes[index]
        assert process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for index, process in enumerate(self.processes):
            if process is not None:
                self.kill(index)


@pytest.fixture
def backends() -> Iterator[Backends]:
    running = Backends(3)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def proxy(tmp_path: Path, backends: Backends) -> Iterator[Balancer]:
    require_balancer()
    with balancer(tmp_path / "balancer", "127.0.0.1", free_port(), backends.ports) as running:
        yield running


def connection(url: str, cafile: Path | None = None) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=cafile)
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=30, context=context)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)


def call(
    target: str | http.client.HTTPConnection,
    path: str = "/echo",
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, T.Any]]:
    """One request (on a new connection for a URL, else on the given kept-alive one)."""
    conn = connection(target) if isinstance(target, str) else target
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    if isinstance(target, str):
        conn.close()
    if response.headers.get("Content-Type") != "application/json":
        return response.status, {}
    return response.status, json.loads(data)


def names(proxy: Balancer, count: int, conn: http.client.HTTPConnection | None = None) -> set[str]:
    """Which backends answered ``count`` requests (all must succeed)."""
    answers = [call(conn or proxy.url) for _ in range(count)]
    assert [status for status, _ in answers] == [200] * count
    return {answer["name"] for _, answer in answers}


def test_requests_are_spread_over_the_backends_with_their_host_header_unchanged(
    proxy: Balancer,
) -> None:
    # when requests come one after the other, then every backend answers some
    assert names(proxy, 9) == {"r1", "r2", "r3"}

    # and a backend sees the Host the client asked for (MLflow checks it), and who asked
    _, answer = call(proxy.url, headers={"Host": "mlflow.example.org:5000"})
    assert answer["headers"] == {
        "Host": "mlflow.example.org:5000",
        "X-Forwarded-For": "127.0.0.1",
        "X-Forwarded-Proto": "http",
    }
    assert all(proxy.is_up(index) for index in range(3))


def test_a_killed_backend_is_out_at_once_and_back_when_it_answers_again(
    proxy: Balancer, backends: Backends
) -> None:
    # given clients with kept-alive connections, each already answered
    kept = [connection(proxy.url) for _ in range(3)]
    for conn in kept:
        call(conn)

    # when a backend is killed (SIGKILL: it refuses connections from now on)
    backends.kill(0)

    # then every request right after succeeds, on the other backends: large POSTs (1 MB: more
    # than haproxy buffers), requests on new and on kept connections
    uploads = [call(proxy.url, "/upload", "POST", b"x" * 2**20) for _ in range(3)]
    assert {status for status, _ in uploads} == {200}
    assert {answer["name"] for _, answer in uploads} == {"r2", "r3"}
    assert names(proxy, 9) | set().union(*(names(proxy, 3, conn) for conn in kept)) == {"r2", "r3"}
    # and the first refused connection took it out, without waiting for health checks
    assert not proxy.is_up(0)

    # when it answers again, then it is back in rotation
    backends.start(0)
    eventually(lambda: proxy.is_up(0), "r1 up again")
    assert names(proxy, 6) == {"r1", "r2", "r3"}


def test_a_drained_backend_gets_no_new_request_until_ready(proxy: Balancer) -> None:
    # given a client whose kept-alive connection has reached every backend
    kept = connection(proxy.url)
    assert names(proxy, 6, kept) == {"r1", "r2", "r3"}

    # when a backend is drained
    proxy.drain(0)

    # then it gets no request, not even on that connection, and it does not count as up
    assert names(proxy, 6, kept) | names(proxy, 6) == {"r2", "r3"}
    assert not proxy.is_up(0)

    # when it is made ready, then it is back in rotation
    proxy.ready(0)
    eventually(lambda: proxy.is_up(0), "r1 up again")
    assert names(proxy, 6, kept) == {"r1", "r2", "r3"}


def test_active_counts_the_requests_in_flight(proxy: Balancer, tmp_path: Path) -> None:
    # given only r1 in rotation, and a request it answers only when told
    proxy.drain(1)
    proxy.drain(2)
    release = tmp_path / "release"
    answers: list[tuple[int, dict[str, T.Any]]] = []
    held = threading.Thread(target=lambda: answers.append(call(proxy.url, f"/hold?file={release}")))
    assert proxy.active(0) == 0

    # when the request is in flight, then it counts on r1 only
    held.start()
    try:
        eventually(lambda: proxy.active(0) == 1, "the held request counted on r1")
        assert (proxy.active(1), proxy.active(2)) == (0, 0)
    finally:
        release.touch()
        held.join(30)

    # when it is answered, then nothing is in flight any more
    assert answers[0][0] == 200
    assert proxy.active(0) == 0


def test_a_get_without_answer_is_replayed_elsewhere_a_post_is_not(
    tmp_path: Path, backends: Backends
) -> None:
    require_balancer()
    with balancer(tmp_path, "127.0.0.1", free_port(), backends.ports) as proxy:
        # when r1 dies while answering a GET, then another backend answers it
        assert [call(proxy.url, "/die?name=r1")[0] for _ in range(3)] == [200] * 3
        assert backends.processes[0] is not None and backends.processes[0].poll() == 3
        # when r2 dies while answering a POST (perhaps done: a metric logged), then it is not
        # replayed (logged twice): the client gets 502
        posts = [call(proxy.url, "/die?name=r2", "POST", b"{}")[0] for _ in range(3)]
        assert sorted(posts) == [200, 200, 502]
        assert backends.processes[1] is not None and backends.processes[1].poll() == 3
        # and a large POST (1 MB, more than haproxy buffers) goes through
        assert call(proxy.url, "/upload", "POST", b"x" * 2**20) == (
            200,
            {"name": "r3", "length": 2**20},
        )


def test_with_tls_it_serves_https_only_its_key_and_socket_private(
    tmp_path: Path, backends: Backends
) -> None:
    require_balancer()
    pair = tls_pair(tmp_path, "127.0.0.1")
    port = free_port()
    folder = tmp_path / "balancer"
    with balancer(folder, "127.0.0.1", port, backends.ports, tls=pair) as proxy:
        # then its URL is https, and a client trusting the certificate is answered
        assert proxy.url == f"https://127.0.0.1:{port}"
        status, answer = call(connection(proxy.url, cafile=pair.certificate))
        assert status == 200
        assert answer["headers"]["X-Forwarded-Proto"] == "https"
        # a plain HTTP request gets no answer
        with pytest.raises((OSError, http.client.HTTPException)):
            call(f"http://127.0.0.1:{port}")
        # and only its owner can read the key or command haproxy
        modes = {
            path.name: path.stat().st_mode & 0o777
            for path in (folder, folder / "server.pem", folder / "haproxy.sock")
        }
        assert modes == {"balancer": 0o700, "server.pem": 0o600, "haproxy.sock": 0o600}


def _haproxy_pid(folder: Path) -> int:
    """haproxy's process id, as its runtime API tells it."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(folder / "haproxy.sock"))
        sock.sendall(b"show info\n")
        info = sock.makefile(encoding="utf-8").read()
    return int(next(line for line in info.splitlines() if line.startswith("Pid:")).split()[1])


def _gone(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False


def test_haproxy_is_stopped_when_the_block_ends_also_by_an_error(
    tmp_path: Path, backends: Backends
) -> None:
    require_balancer()
    # when the block ends, then haproxy's process group is gone
    with balancer(tmp_path, "127.0.0.1", free_port(), backends.ports):
        group = _haproxy_pid(tmp_path)
        assert not _gone(group)
    assert _gone(group)

    # when the block raises, then too, and the error is the block's
    with (
        pytest.raises(KeyError, match="in the block"),
        balancer(tmp_path, "127.0.0.1", free_port(), backends.ports),
    ):
        group = _haproxy_pid(tmp_path)
        raise KeyError("in the block")
    assert _gone(group)


def test_a_taken_port_is_refused_naming_it(tmp_path: Path, taken_port: int) -> None:
    require_balancer()
    # given something else listening on the port (taken_port)
    # when a balancer is started on it, then it fails at once, naming the port
    with (
        pytest.raises(RuntimeError, match=rf"port {taken_port} on 127.0.0.1 is in use"),
        balancer(tmp_path, "127.0.0.1", taken_port, [free_port()]),
    ):
        pass  # pragma: no cover -- never reached


def test_bad_arguments_are_refused_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no backend"), balancer(tmp_path, "127.0.0.1", 80, []):
        pass  # pragma: no cover -- never reached
    with (
        pytest.raises(ValueError, match="port 70000 is out of range"),
        balancer(tmp_path, "127.0.0.1", 80, [70000]),
    ):
        pass  # pragma: no cover -- never reached


def test_haproxy_dies_with_the_process_that_started_it(tmp_path: Path, backends: Backends) -> None:
    require_balancer()
    # given a process running a balancer (from its main thread)
    script = (
        "import sys, time; from pathlib import Path\n"
        "from regression_model_template.server.balancer import balancer\n"
        "with balancer(Path(sys.argv[1]), '127.0.0.1', int(sys.argv[2]), [int(sys.argv[3])]):\n"
        "    print('ready', flush=True); time.sleep(600)\n"
    )
    command = [
        sys.executable,
        "-c",
        script,
        str(tmp_path),
        str(free_port()),
        str(backends.ports[0]),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE) as parent:
        try:
            assert parent.stdout is not None and parent.stdout.readline() == b"ready\n"
            group = _haproxy_pid(tmp_path)

            # when that process is killed (SIGKILL: no clean-up of its own)
            parent.kill()
        finally:
            parent.kill()
            parent.wait(30)

    # then haproxy stops too
    eventually(lambda: _gone(group), "haproxy gone with its parent", seconds=30)


def test_a_folder_too_deep_for_a_unix_socket_still_works(
    tmp_path: Path, backends: Backends
) -> None:
    require_balancer()
    # given a folder whose path is longer than a unix socket's may be (107 bytes)
    folder = tmp_path / ("deep" * 30) / "balancer"

    # when a balancer runs there, then its runtime API answers (its socket is elsewhere)
    with balancer(folder, "127.0.0.1", free_port(), backends.ports) as proxy:
        proxy.drain(0)
        assert not proxy.is_up(0)
        assert names(proxy, 4) == {"r2", "r3"}
