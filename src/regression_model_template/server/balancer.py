"""haproxy in front of the team server's replicas: one address, any number of mlflow servers.

- :func:`balancer`: Debian's haproxy (installed with ``apt-get`` on first use, as root) for the
  block, on HOST:PORT (HTTPS when given a TLS pair: haproxy ends TLS), spreading the requests
  over backends on 127.0.0.1 ports (named r1..rN); yields a :class:`Balancer`.
- :class:`Balancer`: its URL; a backend taken out of rotation and back (rolling restarts), its
  requests in flight, whether haproxy has it UP.

Why haproxy: health checks, a dead backend out at its first refused connection, retries on
another backend, TLS and draining are its daily work; the stack only writes its configuration
and supervises its process. Why its runtime API by hand: a command line in, an answer out, on a
unix socket; no Python client for it is maintained, and the three commands used here fit in a
dozen lines.

Example:
    >>> Balancer("http://127.0.0.1:5000", Path("haproxy.sock"), 2).drain(2)
    Traceback (most recent call last):
    ...
    IndexError: backend 2 does not exist: the balancer has 2 (0 to 1)
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from regression_model_template.server.processes import (
    check_free,
    debian_program,
    die_with_parent,
    main_thread_on_linux,
    stop_group,
    tail,
    write_private,
)
from regression_model_template.server.tls import TlsPair
from regression_model_template.server.tracking_server import server_url

__all__ = ["Balancer", "BalancerUnavailable", "balancer", "haproxy_program"]

#: The haproxy backend holding the replicas (its servers are r1..rN).
BACKEND = "replicas"
#: Seconds haproxy has to listen and answer on its runtime socket.
STARTUP_TIMEOUT = 30.0


class BalancerUnavailable(RuntimeError):
    """haproxy is not installed and cannot be installed here."""


def haproxy_program(install: bool = True) -> Path:
    """The ``haproxy`` program; with ``install``, Debian's package is installed when missing.

    Installing needs root and ``apt-get`` (seconds; the package's service is not started).

    Raises:
        BalancerUnavailable: not installed, and not installable here (the message says why).
    """
    return debian_program(
        "haproxy", _installed, BalancerUnavailable,
        "haproxy is not installed (not in /usr/sbin nor on PATH)", install,
    )  # fmt: skip


def _installed() -> Path | None:
    on_path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    return Path(on_path) if on_path else None


class Balancer:
    """A running haproxy: its ``url``, and its backends by 0-based index (r1 is 0)."""

    def __init__(self, url: str, runtime: Path, count: int) -> None:
        self.url = url
        self._runtime = runtime
        self._count = count

    def drain(self, index: int) -> None:
        """Send no new request to the backend; those in flight finish (see :meth:`active`).

        haproxy's ``drain`` state, not ``maint``: both stop new requests, even those coming on a
        client's kept-alive connection, but only ``drain`` keeps checking the backend's health,
        so that after a restart haproxy knows whether it answers before :meth:`ready`.
        """
        self._set(index, "drain")

    def ready(self, index: int) -> None:
        """Put the backend back in rotation (from the moment its health check passes)."""
        self._set(index, "ready")

    def active(self, index: int) -> int:
        """The requests the backend is answering now (haproxy's current sessions on it)."""
        return int(self._stat(index)["scur"] or 0)

    def is_up(self, index: int) -> bool:
        """Whether haproxy sends it requests: its check passes and it is not drained."""
        # "UP", or "UP 1/2" (one check failed, not enough to take it out); not DOWN/DRAIN/MAINT
        return self._stat(index)["status"].split(" ")[0] == "UP"

    def alive(self) -> bool:
        """Whether haproxy runs (answers on its runtime socket), whatever its backends do."""
        try:
            _ask(self._runtime, "show info", timeout=2)
        except OSError:
            return False
        return True

    def _name(self, index: int) -> str:
        if not 0 <= index < self._count:
            raise IndexError(
                f"backend {index} does not exist: the balancer has {self._count} "
                f"(0 to {self._count - 1})"
            )
        return f"r{index + 1}"

    def _set(self, index: int, state: str) -> None:
        name = self._name(index)
        answer = _ask(self._runtime, f"set server {BACKEND}/{name} state {state}").strip()
        if answer:
            raise RuntimeError(f"haproxy refused to set {name} {state}: {answer}")

    def _stat(self, index: int) -> dict[str, str]:
        name = self._name(index)
        lines = _ask(self._runtime, "show stat").removeprefix("# ").splitlines()
        for row in csv.DictReader(line for line in lines if line):
            if row["pxname"] == BACKEND and row["svname"] == name:
                return row
        raise RuntimeError(f"haproxy's statistics have no {BACKEND}/{name}")


def _ask(runtime: Path, command: str, timeout: float = 10.0) -> str:
    """One command to haproxy's runtime API: it answers, then closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(runtime))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


@contextlib.contextmanager
def balancer(
    folder: Path, host: str, port: int, backends: Sequence[int], *, tls: TlsPair | None = None
) -> Iterator[Balancer]:
    """Run haproxy on ``host``:``port`` for the block, in front of ``backends`` on 127.0.0.1.

    Its configuration, log (``haproxy.log``: its messages, server state changes, and only the
    requests that failed or were retried) and runtime socket (0600) are in ``folder`` (0700),
    and, with ``tls``, the certificate and key in one PEM file (0600) for haproxy to serve
    HTTPS. Backends are checked with ``GET /health`` every second; one refusing a connection
    is out at once and the request goes to another. Requests and answers may take 600 s (a
    10-minute model upload). haproxy runs in its own process group, stopped when the block
    ends; on Linux, started from the main thread, it also dies with this process.

    Raises:
        ValueError: no backend, or a port out of range.
        BalancerUnavailable: haproxy cannot be had here.
        RuntimeError: the port is taken, or haproxy refused its configuration, exited or did
            not listen within ``STARTUP_TIMEOUT`` (30) seconds (the message ends with its output).
    """
    ports = list(backends)
    if not ports:
        raise ValueError("balancer: no backend given (the ports of the replicas)")
    for value in (port, *ports):
        if not 0 < value < 65536:
            raise ValueError(f"balancer: port {value} is out of range (1 to 65535)")
    program = haproxy_program()
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    check_free(port, host)
    pem = None
    if tls is not None:
        pem = folder / "server.pem"
        certificate = tls.certificate.read_bytes().rstrip(b"\n") + b"\n"
        write_private(pem, certificate + tls.key.read_bytes())
    with _socket_place(folder) as runtime:
        config = folder / "haproxy.cfg"
        config.write_text(_config(host, port, ports, runtime, pem), encoding="utf-8")
        checked = subprocess.run([program, "-c", "-f", config], capture_output=True, text=True)
        if checked.returncode != 0:  # its own words, more helpful than a start that fails
            raise RuntimeError(f"haproxy refused {config}:\n{checked.stdout}{checked.stderr}")
        log = folder / "haproxy.log"
        with log.open("ab") as sink:
            process = subprocess.Popen(
                [program, "-db", "-f", config],  # -db: in the foreground, this child
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
                preexec_fn=die_with_parent if main_thread_on_linux() else None,
            )
        try:
            _wait_listening(process, host, port, runtime, log)
            yield Balancer(server_url(host, port, tls is not None), runtime, len(ports))
        finally:
            stop_group(process)
            runtime.unlink(missing_ok=True)  # haproxy leaves it on SIGTERM


@contextlib.contextmanager
def _socket_place(folder: Path) -> Iterator[Path]:
    """``folder/haproxy.sock``, or one in a private temporary folder when that path is too long.

    A unix socket's path holds at most 107 bytes: a deep folder cannot hold it.
    """
    runtime = folder / "haproxy.sock"
    if len(os.fsencode(runtime)) <= 100:
        yield runtime
        return
    with tempfile.TemporaryDirectory(prefix="rmt-haproxy-") as short:  # 0700
        yield Path(short) / "haproxy.sock"


def _config(host: str, port: int, backends: list[int], runtime: Path, pem: Path | None) -> str:
    """The configuration given to haproxy; every choice is explained next to it."""
    address = f"[{host}]" if ":" in host else host
    servers = "".join(f"    server r{i} 127.0.0.1:{p}\n" for i, p in enumerate(backends, 1))
    return f"""\
global
    stats socket {runtime} mode 600 level admin
    log stdout format raw local0
defaults
    mode http
    log global
    # one line per request that failed, was retried or timed out; none for the others
    option httplog
    option dontlog-normal
    option dontlognull
    timeout connect 3s
    # a 10-minute model upload (gunicorn's own timeout is 600 s)
    timeout client 600s
    timeout server 600s
    timeout http-request 60s
    timeout http-keep-alive 30s
    timeout check 3s
    # a refused connection is tried again, each time on another backend
    retries 3
    option redispatch 1
frontend web
    bind {address}:{port}{f" ssl crt {pem} alpn http/1.1" if pem else ""}
    # the Host header goes through unchanged (MLflow checks it)
    option forwardfor
    http-request set-header X-Forwarded-Proto {"https" if pem else "http"}
    default_backend {BACKEND}
backend {BACKEND}
    # the backend with the fewest requests in flight: not one busy with a long upload
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    # a request that got no answer is replayed elsewhere only when it is a GET (or HEAD):
    # a POST may have been done (a metric logged twice); a refused connection is always retried
    retry-on conn-failure empty-response 502 503
    http-request disable-l7-retry if !METH_GET
    # a backend refusing a connection is out at once; back at its first passing check
    default-server check inter 1s fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down
{servers}"""


def _wait_listening(
    process: subprocess.Popen[bytes], host: str, port: int, runtime: Path, log: Path
) -> None:
    """Return once haproxy accepts connections on the port and answers on its runtime socket."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        code = process.poll()
        if code is not None:
            raise RuntimeError(
                f"haproxy exited ({code}) before listening on port {port}; " + tail(log)
            )
        try:
            with socket.create_connection((target, port), timeout=2):
                pass
            _ask(runtime, "show info", timeout=2)
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"haproxy did not listen on {host} port {port} within {STARTUP_TIMEOUT:g} s; "
                + tail(log)
            )
        time.sleep(0.05)
