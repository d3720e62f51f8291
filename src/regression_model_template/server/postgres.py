"""The stack's PostgreSQL: Debian's programs, a cluster kept in a folder, the ``mlflow`` database.

- :func:`postgres_cluster`: Debian's PostgreSQL (installed with ``apt-get`` when missing and
  running as root), a cluster in a folder (created on first use, kept between runs), one
  ``mlflow`` database; yields its ``postgresql://`` URI.
- :func:`cluster_folder`: where the stack of a folder keeps that cluster: in the folder, or,
  when the ``postgres`` user cannot reach it (run as root under a closed home), under
  PostgreSQL's own data root.

Written by hand: PostgreSQL's own tools (``initdb``, ``pg_ctl``) do the work; what they lack is
the root case (``initdb`` refuses root: the cluster belongs to the ``postgres`` user) and a
bounded, tidy stop when the caller's block ends.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pwd
import re
import shutil
import subprocess
import time
import typing as T
from pathlib import Path

from regression_model_template.server.processes import free_port, tail

__all__ = [
    "DATABASE",
    "SUPERUSER",
    "PostgresUnavailable",
    "cluster_folder",
    "cluster_name",
    "create_database",
    "postgres_bin",
    "postgres_cluster",
]

DATABASE = "mlflow"
SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's programs are not installed and cannot be installed here."""


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
            output += "\n" + tail(log, 3000)
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
