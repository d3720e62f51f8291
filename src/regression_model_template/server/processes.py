"""Supervising the stack's processes: free ports, process groups, their output.

Written by hand: what ``subprocess`` lacks is a bounded stop of a whole process group
(a server's workers included) and a child that dies with the process that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as T
from pathlib import Path

__all__ = [
    "apt_install",
    "check_free",
    "debian_program",
    "die_with_parent",
    "free_port",
    "main_thread_on_linux",
    "stop_group",
    "tail",
    "write_private",
]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on (right now).

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise ``RuntimeError`` when a server could not listen on ``port`` of ``host``."""
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as the server binds: a port left in TIME_WAIT by an earlier server is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RuntimeError(f"port {port} on {host} is in use: {exc.strerror}") from None
            raise RuntimeError(
                f"cannot listen on {host} port {port}: {exc.strerror or exc} (is {host} an "
                "address of this machine?)"
            ) from None


def main_thread_on_linux() -> bool:
    """Whether a child started here can be tied to this process's life (:func:`die_with_parent`)."""
    return sys.platform == "linux" and threading.current_thread() is threading.main_thread()


def die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent dies (prctl PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def tail(log: Path, limit: int = 6000) -> str:
    """The last ``limit`` characters of a process's output file, to end an error message."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return "its output:\n" + text[-limit:]


def stop_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop the process group led by ``process``: SIGTERM, wait, then SIGKILL what is left."""
    group = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait(grace)
    deadline = time.monotonic() + grace  # workers may outlive the leader for a moment
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def apt_install(package: str) -> str:
    """Install Debian's ``package`` with ``apt-get`` (as root); return its output.

    A fresh machine has no package lists yet: when the first try fails, they are updated and
    the install tried again. What is installed is not upgraded, and services are not started.
    The caller checks that what it needs is now there (the output tells why when it is not).
    """
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=environ)

    install = ("install", "-y", "--no-upgrade", "--no-install-recommends", package)
    done = apt(*install)
    if done.returncode != 0:
        apt("update")
        done = apt(*install)
    return done.stdout + done.stderr


def debian_program(
    package: str,
    find: T.Callable[[], Path | None],
    unavailable: type[Exception],
    missing: str,
    install: bool = True,
) -> Path:
    """What ``find`` finds, after installing Debian's ``package`` when it finds nothing.

    Installing needs root and ``apt-get`` (:func:`apt_install`); elsewhere, and when the
    install did not bring it, ``unavailable`` is raised: ``missing`` (what is not there) and
    how to install it, or ``apt-get``'s own words.

    Example:
        >>> debian_program("coreutils", lambda: Path("/bin/true"), RuntimeError, "no true")
        PosixPath('/bin/true')
    """
    found = find()
    if found is not None:
        return found
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise unavailable(f"{missing}; install it with `apt-get install {package}` (as root)")
    output = apt_install(package)
    found = find()
    if found is None:
        raise unavailable(f"`apt-get install {package}` did not install it:\n{output[-3000:]}")
    return found


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file no one else can read, at no moment (created 0600, then renamed)."""
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)
    descriptor = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as sink:
        sink.write(data)
    os.replace(part, path)
