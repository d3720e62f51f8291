"""The stack's PostgreSQL: Debian's programs, a cluster kept in a folder, the ``mlflow`` database.

- :func:`postgres_cluster`: Debian's PostgreSQL (installed with ``apt-get`` when missing and
  running as root), a cluster in a folder (created on first use, kept between runs), one
  ``mlflow`` database; yields its ``postgresql://`` URI, which holds the superuser's password.
  Every connection needs that password (scram-sha-256), the socket's too: the cluster listens
  on 127.0.0.1, where every user of the machine can reach it.
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
import secrets
import shutil
import subprocess
import time
import typing as T
from pathlib import Path

from regression_model_template.server.processes import (
    debian_program,
    free_port,
    tail,
    write_private,
)

__all__ = [
    "DATABASE",
    "PASSWORD_FILE",
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
#: The superuser's password, in the cluster's folder (0600, this process's user).
PASSWORD_FILE = "password"


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
    return debian_program(
        "postgresql", _installed_bin, PostgresUnavailable,
        "PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin or on PATH)",
        install,
    )  # fmt: skip


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
    listens on 127.0.0.1 only and asks every connection for the ``postgres`` user's password
    (scram-sha-256). The password is generated then, kept in ``folder/password`` (0600) and
    given in the URI (``postgresql://postgres:PASSWORD@127.0.0.1:PORT/mlflow``): mask it
    before printing it. A cluster made by earlier versions, which trusted every local
    connection, gets a password and scram-sha-256 on its next start, its data kept.

    The cluster is stopped when the block ends, also when the start is interrupted. A cluster
    left running by a killed process is stopped first; one that a live process runs is left
    alone (an error). Run as root, the cluster belongs to the ``postgres`` user, which must be
    able to reach ``folder`` (:func:`cluster_folder` finds one).

    Raises:
        PostgresUnavailable: PostgreSQL cannot be had here.
        RuntimeError: the cluster cannot be created or started (the message ends with its
            log), another live process runs it, or its password file is missing or refused.
    """
    bin_dir = postgres_bin()
    folder = Path(folder).absolute()
    data, log = folder / "data", folder / "postgres.log"
    port = port or free_port()
    as_owner = _as_postgres_user(folder)
    new = not (data / "PG_VERSION").exists()
    trusting = not new and _trusting(data)
    password = _password(folder, create=new or trusting)
    if new:
        with _initdb_password(folder, password) as password_file:
            _pg(as_owner, bin_dir / "initdb", "-D", data, "-A", "scram-sha-256", "-U", SUPERUSER,
                "--pwfile", password_file, "-E", "UTF8", "--no-instructions")  # fmt: skip
    owner = folder / "owner.pid"  # the process that started the cluster running now
    if _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "status", check=False) == 0:
        other = _owner(owner)
        if other is not None and other != os.getpid() and _alive(other):
            raise RuntimeError(f"process {other} runs the PostgreSQL cluster in {folder}")
        _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    started = False
    try:
        owner.write_text(str(os.getpid()))
        if trusting:
            _to_scram(as_owner, bin_dir, data, port, password)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
        _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60",
            "start", log=log)  # fmt: skip
        started = True
        server = f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{port}"
        yield _mlflow_database(server, folder)
    finally:
        # An interrupted start may leave a postmaster that is still writing its pid file.
        _stop_cluster(as_owner, bin_dir, data, patience=0.0 if started else 5.0)
        owner.unlink(missing_ok=True)


def _mlflow_database(server: str, folder: Path) -> str:
    """Create the ``mlflow`` database; a refused password is an error naming its file."""
    import psycopg

    try:
        return create_database(server, DATABASE)
    except psycopg.OperationalError as error:
        if "password authentication failed" not in str(error):
            raise
        raise RuntimeError(
            f"the PostgreSQL cluster in {folder} refused the password in "
            f"{folder / PASSWORD_FILE}: {_RESET}"
        ) from None


_RESET = (
    "put back the file it was made with, or set the method of every line of data/pg_hba.conf "
    "to `trust`: the next start then sets a new password"
)


# %% the superuser's password


def _password(folder: Path, create: bool) -> str:
    """The superuser's password, from ``folder/password``; ``create``: generated when missing."""
    file = folder / PASSWORD_FILE
    if not file.exists() and create:  # URL-safe: no quoting in the URI
        write_private(file, (secrets.token_urlsafe(24) + "\n").encode())
    try:
        file.chmod(0o600)  # whoever opened it up: the password unlocks the whole cluster
        password = file.read_text().strip()
    except FileNotFoundError:
        password = ""
    if not password:
        raise RuntimeError(
            f"the password of the PostgreSQL cluster in {folder} is missing ({file}): {_RESET}"
        )
    return password


@contextlib.contextmanager
def _initdb_password(folder: Path, password: str) -> T.Iterator[Path]:
    """The password in a file ``initdb`` can read (it runs as ``postgres`` for root), for the block.

    Never on a command line, where ``ps`` would show it to every user; removed once read.
    """
    file = folder / ".initdb-password"
    try:
        write_private(file, (password + "\n").encode())
        if os.geteuid() == 0:
            shutil.chown(file, SUPERUSER, SUPERUSER)
        yield file
    finally:
        file.unlink(missing_ok=True)


_HBA_METHOD = re.compile(r"^([ \t]*(?:local|host\w*)[ \t].*?[ \t])trust([ \t]*(?:#.*)?)$", re.M)


def _trusting(data: Path) -> bool:
    """Whether a line of the cluster's ``pg_hba.conf`` trusts (``initdb -A trust``, old code)."""
    return bool(_HBA_METHOD.search((data / "pg_hba.conf").read_text()))


def _to_scram(as_owner: list[str], bin_dir: Path, data: Path, port: int, password: str) -> None:
    """Give a trusting cluster's superuser ``password`` and ask it of every connection.

    Done on the socket alone (in the data folder, closed to other users): no one else can
    connect while the cluster still trusts. The server receives the scram verifier, not the
    password. The data stays; ``pg_hba.conf``'s ``trust`` becomes ``scram-sha-256``.
    """
    import psycopg
    from psycopg import sql

    socket_only = f"-c listen_addresses='' -p {port} -k {data}"
    log = data.parent / "postgres.log"
    _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "-l", log, "-o", socket_only, "-w", "-t", "60",
        "start", log=log)  # fmt: skip
    try:
        with psycopg.connect(host=str(data), port=port, user=SUPERUSER, dbname="postgres",
                             autocommit=True, connect_timeout=10) as db:  # fmt: skip
            verifier = db.pgconn.encrypt_password(
                password.encode(), SUPERUSER.encode(), b"scram-sha-256"
            ).decode()
            db.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(verifier)
                )
            )
    finally:
        _pg(as_owner, bin_dir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop", check=False)
    hba = data / "pg_hba.conf"
    draft = data / "pg_hba.conf.scram"
    draft.write_text(_HBA_METHOD.sub(r"\1scram-sha-256\2", hba.read_text()))
    status = hba.stat()
    os.chown(draft, status.st_uid, status.st_gid)  # root's edit stays the postgres user's file
    draft.chmod(status.st_mode & 0o777)
    draft.replace(hba)


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
    """Create database ``name`` (unless it exists) on ``server``.

    ``server``: ``postgresql://user:password@host:port`` (the password may be left out where
    the server trusts). Returns its URI. ``name`` is a plain identifier (letters, digits,
    underscores).
    """
    import psycopg
    from psycopg import sql

    with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=10) as db:
        if not db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{server}/{name}"
