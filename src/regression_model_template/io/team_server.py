"""The team's tracking stack: a PostgreSQL cluster and an ``mlflow server`` on 127.0.0.1.

``make server`` (``regression-model-template server``) runs :func:`team_server` in the
foreground; the test suite starts the same stack with the same functions, so there is one way
to do it. Each part stops with its context manager (SIGTERM to the server's process group, a fast
PostgreSQL shutdown): nothing is left running.

- :func:`postgres_cluster`: Debian's PostgreSQL (installed with ``apt-get`` when missing and
  running as root), a cluster in a folder (created on first use, kept between runs), one
  ``mlflow`` database; yields its ``postgresql://`` URI.
- :func:`cluster_folder`: where the stack of a folder keeps that cluster: in the folder, or,
  when the ``postgres`` user cannot reach it (run as root under a closed home), under
  PostgreSQL's own data root.
- :func:`mlflow_server`: ``mlflow server`` with proxied artifacts; yields its URL once it answers
  ``/health``.

Written by hand: PostgreSQL's own tools (``initdb``, ``pg_ctl``) do the work; what they lack is
the root case (``initdb`` refuses root: the cluster belongs to the ``postgres`` user) and a
bounded, tidy stop when the caller's block ends.

Example (not run here: it starts servers)::

    with team_server(Path(".server"), port=5000) as stack:
        print(f"MLFLOW_TRACKING_URI={stack.url}")
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as T
import urllib.request
from pathlib import Path

__all__ = [
    "GUNICORN",
    "PostgresUnavailable",
    "TeamServer",
    "cluster_folder",
    "cluster_name",
    "create_database",
    "free_port",
    "mlflow_server",
    "postgres_bin",
    "postgres_cluster",
    "running",
    "team_server",
]

DATABASE = "mlflow"
SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's programs are not installed and cannot be installed here."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on (right now).

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# %% PostgreSQL


def postgres_bin(install: bool = True) -> Path:
    """The folder of PostgreSQL's server programs (``initdb``, ``pg_ctl``), the newest first.

    ``install``: when they are missing and this process runs as root on Debian, install
    Debian's ``postgresql`` package (seconds; its service is not started).

    Raises:
        PostgresUnavailable: not installed, and not installable here (the message says why).
    """
    found = _installed_bin()
    if found is not None:
        return found
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin or on "
            "PATH); install it with `apt-get install postgresql` (as root)"
        )
    done = _apt("install", "-y", "--no-upgrade", "--no-install-recommends", "postgresql")
    if done.returncode != 0:  # a fresh machine has no package lists yet
        _apt("update")
        done = _apt("install", "-y", "--no-upgrade", "--no-install-recommends", "postgresql")
    found = _installed_bin()
    if found is None:
        raise PostgresUnavailable(
            "`apt-get install postgresql` did not install PostgreSQL:\n"
            + (done.stdout + done.stderr)[-3000:]
        )
    return found


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=environ)


def _installed_bin() -> Path | None:
    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=version, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path is not None and shutil.which("initdb") is not None:
        candidates.append(on_path)
    return Path(candidates[0]).parent if candidates else None


@contextlib.contextmanager
def postgres_cluster(folder: Path, port: int | None = None) -> T.Iterator[str]:
    """Run a PostgreSQL cluster kept in ``folder`` for the block; yield its ``mlflow`` database URI.

    The cluster is created on first use (``folder/data``, its log in ``folder/postgres.log``),
    listens on 127.0.0.1 only, trusts local connections (user ``postgres``, no password: a
    stack for one machine) and is stopped when the block ends, also when the start is
    interrupted. A cluster left running by a killed process is stopped first; one that a live
    process runs is left alone (an error). Run as root, the cluster belongs to the
    ``postgres`` user, which must be able to reach ``folder`` (:func:`cluster_folder` finds one).

    Raises:
        PostgresUnavailable: PostgreSQL cannot be had here.
        RuntimeError: the cluster cannot be created or started (the message ends with its
            log), or another live process runs it.
    """
    bin_dir = postgres_bin()
    folder = Path(folder).absolute()
    data, log = folder / "data", folder / "postgres.log"
    port = port or free_port()
    as_owner = _as_postgres_user(folder)
    if not (data / "PG_VERSION").exists():
        # -A trust: local connections only (127.0.0.1 and the socket in the data folder)
        _pg(as_owner, bin_dir / "initdb", "-D", data, "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
            "--no-instructions")  # fmt: skip
    owner = folder / "owner.pid"  # the process that started the cluster running now
    if _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "status", check=False) == 0:
        other = _owner(owner)
        if other is not None and other != os.getpid() and _alive(other):
            raise RuntimeError(f"process {other} runs the PostgreSQL cluster in {folder}")
        _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    started = False
    try:
        owner.write_text(str(os.getpid()))
        _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60",
            "start", log=log)  # fmt: skip
        started = True
        yield create_database(f"postgresql://{SUPERUSER}@127.0.0.1:{port}", DATABASE)
    finally:
        # An interrupted start may leave a postmaster that is still writing its pid file.
        _stop_cluster(as_owner, bin_dir, data, patience=0.0 if started else 5.0)
        owner.unlink(missing_ok=True)


def _stop_cluster(as_owner: list[str], bin_dir: Path, data: Path, patience: float) -> None:
    """Stop the cluster when it runs, watching for it for ``patience`` seconds first."""
    deadline = time.monotonic() + patience
    while _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "status", check=False) != 0:
        if time.monotonic() >= deadline:
            return
        time.sleep(0.2)
    _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop", check=False)


def _owner(file: Path) -> int | None:
    try:
        return int(file.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _as_postgres_user(folder: Path) -> list[str]:
    """The prefix that runs PostgreSQL's programs: ``runuser -u postgres --`` for root."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return []
    shutil.chown(folder, SUPERUSER, SUPERUSER)  # initdb refuses to run as root
    if not _postgres_can("-w", folder):
        raise RuntimeError(
            f"the `postgres` user cannot write {folder} (a parent folder is closed to other "
            "users): choose a folder it can reach, or open its parents with `chmod o+x`"
        )
    return list(_RUNUSER)


_RUNUSER = ("runuser", "-u", SUPERUSER, "--")


def _postgres_can(test: str, path: Path) -> bool:
    """Whether the ``postgres`` user passes ``test -w``/``-x`` on ``path`` (run as root)."""
    done = subprocess.run([*_RUNUSER, "test", test, str(path)], check=False)
    return done.returncode == 0


def cluster_folder(folder: Path) -> Path:
    """Where the team stack kept in ``folder`` has its PostgreSQL cluster.

    ``folder/postgres`` when the cluster can live there: always for a user other than root,
    whose cluster runs as that user. Run as root, the cluster belongs to the ``postgres``
    user; when that user cannot reach ``folder`` (a home closed to other users, ``/root``
    in a container), the cluster goes to PostgreSQL's own data root (the ``postgres`` user's
    home, ``/var/lib/postgresql`` on Debian), in a folder named by :func:`cluster_name`. A
    cluster that already exists in either place is used again; nobody's permissions change.
    Installs PostgreSQL first when root needs its user (see :func:`postgres_bin`).

    Example (not run here: as root it may install PostgreSQL)::

        cluster_folder(Path("/root/project/.server"))
        # PosixPath('/var/lib/postgresql/mlflow-project-server-b7fc399b')

    Raises:
        PostgresUnavailable: PostgreSQL cannot be had here.
        RuntimeError: a cluster in ``folder/postgres`` is out of the ``postgres`` user's reach,
            or that user has no data root to hold one.
    """
    folder = Path(folder).absolute()
    inside = folder / "postgres"
    if os.geteuid() != 0:
        return inside
    postgres_bin()  # its package creates the postgres user
    folder.mkdir(parents=True, exist_ok=True)
    reachable = _postgres_can("-x", folder)
    root = Path(pwd.getpwnam(SUPERUSER).pw_dir)
    outside = root / cluster_name(folder)
    if (inside / "data" / "PG_VERSION").exists():
        if not reachable:
            raise RuntimeError(
                f"the `postgres` user cannot reach the PostgreSQL cluster in {inside} (a parent "
                f"folder is closed to other users): move it with `mv {inside} {outside}`, and "
                "start again"
            )
        return inside
    if reachable and not (outside / "data" / "PG_VERSION").exists():
        return inside
    if not (root.is_dir() and _postgres_can("-w", root)):
        raise RuntimeError(
            f"the `postgres` user can reach neither {folder} (a parent folder is closed to "
            f"other users) nor its own data root {root}"
        )
    return outside


def cluster_name(folder: Path) -> str:
    """The name of ``folder``'s cluster under PostgreSQL's data root: readable, one per folder.

    The folder's name and its parent's, then a hash of its full path (symbolic links
    resolved): two folders never share a cluster, and the same folder finds its own again.

    Example:
        >>> name = cluster_name(Path("/root/project/.server"))
        >>> name.startswith("mlflow-project-server-"), len(name)
        (True, 30)
        >>> name == cluster_name(Path("/root/other/.server"))
        False
    """
    path = Path(folder).resolve()
    readable = re.sub(r"[^A-Za-z0-9_]+", "-", f"{path.parent.name}-{path.name}").strip("-")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return f"mlflow-{readable[:40]}-{digest}"


def _pg(
    prefix: list[str], program: Path, *args: str | Path, check: bool = True, log: Path | None = None
) -> int:
    done = subprocess.run(
        [*prefix, str(program), *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and done.returncode != 0:
        output = (done.stdout + done.stderr)[-3000:]
        if log is not None:
            output += "\n" + _tail(log, 3000)
        raise RuntimeError(f"{program.name} {' '.join(map(str, args))} failed: {output}")
    return done.returncode


def create_database(server: str, name: str) -> str:
    """Create database ``name`` (unless it exists) on ``server`` (``postgresql://user@host:port``).

    Returns its URI. ``name`` is a plain identifier (letters, digits, underscores).
    """
    import psycopg
    from psycopg import sql

    with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=10) as db:
        if not db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{server}/{name}"


# %% mlflow server

#: Serve with gunicorn instead of MLflow's default uvicorn: with several uvicorn workers every
#: request on a reused connection waits ~40 ms more (uvicorn issue 3149: TCP_NODELAY is lost);
#: measured here, one ``log_metric`` call with 2 workers: 53 ms (uvicorn), 8.9 ms (gunicorn).
#: gunicorn's default 30 s request timeout would kill the upload of a large model: 10 minutes.
GUNICORN = ("--gunicorn-opts", "--timeout 600")


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts: Path,
    *,
    port: int | None = None,
    workers: int = 1,
    startup_timeout: float = 60.0,
    env: T.Mapping[str, str] | None = None,
    output: Path | None = None,
    options: T.Sequence[str] = (),
) -> T.Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 for the block; yield its URL once it answers.

    Artifacts are proxied (clients upload through the server) into ``artifacts``; the
    background job runner is off (it holds gigabytes and a core for nothing here). The server
    and every process it started are stopped on exit (SIGTERM to its process group, then
    SIGKILL); on Linux, when started from the main thread, it also gets SIGTERM if this
    process dies first.

    Args:
        backend_store_uri: the server's store (``sqlite:///...``, ``postgresql://...``).
        artifacts: where the server keeps artifacts.
        port: the port to listen on (default: a free one).
        workers: server processes; see the README on workers and latency.
        startup_timeout: seconds to wait for ``/health``.
        env: the server's environment (default: this process's, without MLflow's client
            settings).
        output: the file receiving the server's output (default: ``artifacts/../server-*.log``).
        options: more ``mlflow server`` options (e.g. :data:`GUNICORN`).

    Raises:
        RuntimeError: the port is taken, or the server exited or did not answer ``/health``
            within ``startup_timeout`` seconds; the message ends with its output.
    """
    port = port or free_port()
    _check_free(port)  # else another server's /health would answer for ours
    url = f"http://127.0.0.1:{port}"
    artifacts = Path(artifacts).absolute()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = output or artifacts.parent / f"server-{time.time_ns()}.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts),
        "--workers", str(workers),
        *options,
    ]  # fmt: skip
    environ = dict(os.environ if env is None else env)
    if env is None:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
            environ.pop(name, None)
    environ.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command,
            cwd=artifacts.parent,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
            # PR_SET_PDEATHSIG follows the starting *thread*: only the main thread's lives as
            # long as the process (a server started from a helper thread would die with it).
            preexec_fn=_die_with_parent if _main_thread_on_linux() else None,
        )
        try:
            _wait_for_health(process, url, log, startup_timeout)
            yield url
        finally:
            _stop_group(process)


class TeamServer(T.NamedTuple):
    """A running stack: the tracking server's URL, its database's URI, the cluster's folder."""

    url: str
    database: str
    cluster: Path


def _said(line: str) -> None:
    print(line, flush=True)


@contextlib.contextmanager
def team_server(
    folder: Path,
    port: int = 5000,
    workers: int = 2,
    reap_after: float = 300.0,
    report: T.Callable[[str], None] = _said,
) -> T.Iterator[TeamServer]:
    """PostgreSQL and ``mlflow server`` on ``port``, and its reaper, for the block.

    The cluster is in ``folder/postgres``, or where :func:`cluster_folder` puts it when the
    ``postgres`` user cannot reach ``folder``. Artifacts go to ``folder/artifacts``, the
    server's output to ``folder/server.log``. All are kept between runs; both processes stop
    when the block ends. ``workers``: see the README's "A tracking server for the team" (2
    suits a 2-core machine). ``reap_after``: the runs whose heartbeat is older than this many
    seconds are ended KILLED (:func:`.reaper.reaping`; 0: no reaper), each told to ``report``
    in a line (default: printed).
    """
    from regression_model_template.io import reaper

    folder = Path(folder).absolute()
    cluster = cluster_folder(folder)
    with (
        postgres_cluster(cluster) as database,
        mlflow_server(
            database,
            folder / "artifacts",
            port=port,
            workers=workers,
            startup_timeout=120.0,
            output=folder / "server.log",
            options=GUNICORN,
        ) as url,
        reaper.reaping(url, reap_after, report) if reap_after else contextlib.nullcontext(),
    ):
        yield TeamServer(url, database, cluster)


def _check_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as the server binds: a port left in TIME_WAIT by an earlier server is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise RuntimeError(f"port {port} on 127.0.0.1 is in use: {exc.strerror}") from None


def running(url: str, timeout: float = 5.0) -> bool:
    """Whether the server at ``url`` answers ``/health``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(f"{url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _main_thread_on_linux() -> bool:
    return sys.platform == "linux" and threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent dies (prctl PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def _wait_for_health(process: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:  # note: a taken port makes mlflow server exit with code 0
            raise RuntimeError(f"mlflow server exited ({code}) before answering; " + _tail(log))
        if running(url, timeout=2) and process.poll() is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server gave no /health within {timeout:g} s; " + _tail(log))
        time.sleep(0.2)


def _tail(log: Path, limit: int = 6000) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return "its output:\n" + text[-limit:]


def _stop_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
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
