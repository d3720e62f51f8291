"""The stack's PostgreSQL asks every connection for a password, kept 0600 and never shown.

Each test makes its own throwaway cluster in a folder the ``postgres`` user can reach.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from regression_model_template.io.services import MlflowService, ServiceError
from regression_model_template.server.postgres import PASSWORD_FILE, postgres_bin, postgres_cluster
from regression_model_template.testing import free_port
from tests.conftest import LogCapture
from tests.integration.conftest import (
    lines_until,
    postgres_folder,
    require_postgres,
    server_command,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

AS_POSTGRES = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture
def folder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A new folder for a cluster; libpq finds no password of this user's own."""
    require_postgres()
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    top = postgres_folder("rmt-pg-auth-")
    yield top / "postgres"
    shutil.rmtree(top, ignore_errors=True)


def password_of(uri: str) -> str:
    password = urllib.parse.urlsplit(uri).password
    assert password, f"no password in the cluster's URI {uri}"
    return password


def refusal(**connection: str | int) -> str:
    """Why PostgreSQL refused the connection (fails the test when it accepted it)."""
    try:
        with psycopg.connect(connect_timeout=10, **connection):  # type: ignore[arg-type]
            pass
    except psycopg.OperationalError as error:
        return str(error)
    pytest.fail(f"PostgreSQL accepted {connection}")


def check_refusals(uri: str, data: Path) -> None:
    """No password (TCP and the socket) and a wrong one are refused; the right one works."""
    parts = urllib.parse.urlsplit(uri)
    assert parts.port is not None
    tcp: dict[str, str | int] = {"host": "127.0.0.1", "port": parts.port}
    tcp.update(user="postgres", dbname="mlflow")
    assert "no password supplied" in refusal(**tcp)
    assert "no password supplied" in refusal(**{**tcp, "host": str(data)})  # the socket, for root
    wrong = refusal(**{**tcp, "password": "not-" + password_of(uri)})
    assert 'password authentication failed for user "postgres"' in wrong
    with psycopg.connect(uri, connect_timeout=10) as db:
        assert db.execute("SELECT current_database()").fetchone() == ("mlflow",)


def test_a_new_cluster_asks_every_connection_for_the_password_kept_0600(folder: Path) -> None:
    with postgres_cluster(folder) as uri:
        # then the URI carries a password, which every connection needs
        assert uri.startswith("postgresql://postgres:") and uri.endswith("/mlflow")
        assert urllib.parse.urlsplit(uri).hostname == "127.0.0.1"
        check_refusals(uri, folder / "data")
        # and the password is kept for this user alone, in the cluster's folder only
        kept = folder / PASSWORD_FILE
        assert (kept.stat().st_mode & 0o777, kept.stat().st_uid) == (0o600, os.geteuid())
        assert kept.read_text().strip() == password_of(uri)
        assert holding(folder, password_of(uri)) == [kept]
    hba = (folder / "data" / "pg_hba.conf").read_text()
    assert active_methods(hba) == ["scram-sha-256"] * 6


def active_methods(hba: str) -> list[str]:
    """The authentication method of each line of ``pg_hba.conf`` that is not a comment."""
    lines = [line.split("#")[0].split() for line in hba.splitlines()]
    return [fields[-1] for fields in lines if fields]


def holding(folder: Path, secret: str) -> list[Path]:
    """The files under ``folder`` holding ``secret`` (a running cluster's files too)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and secret.encode() in path.read_bytes():
            found.append(path)
    return found


def test_a_cluster_made_trusting_by_the_old_code_gets_the_password_and_keeps_its_data(
    folder: Path,
) -> None:
    # given a cluster made as the old code made it (`initdb -A trust`), holding a row
    data, port = folder / "data", free_port()
    folder.mkdir()
    if AS_POSTGRES:
        shutil.chown(folder, "postgres", "postgres")
    pg_ctl = [*AS_POSTGRES, str(postgres_bin() / "pg_ctl"), "-D", str(data)]
    subprocess.run([*AS_POSTGRES, str(postgres_bin() / "initdb"), "-D", str(data), "-A", "trust",
                    "-U", "postgres", "-E", "UTF8", "--no-instructions"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    subprocess.run([*pg_ctl, "-l", str(folder / "postgres.log"), "-o", options, "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        trusted = f"postgresql://postgres@127.0.0.1:{port}"
        with psycopg.connect(f"{trusted}/postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE mlflow")
        with psycopg.connect(f"{trusted}/mlflow") as db:
            db.execute("CREATE TABLE kept (note text)")
            db.execute("INSERT INTO kept VALUES ('made before the password')")
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)

    # when the stack starts it, twice (the second start finds it moved already)
    for _ in range(2):
        with postgres_cluster(folder, port) as uri:
            # then the row is there, and every connection needs the password
            with psycopg.connect(uri, connect_timeout=10) as db:
                rows = db.execute("SELECT note FROM kept").fetchall()
            assert rows == [("made before the password",)]
            check_refusals(uri, data)

    assert active_methods((data / "pg_hba.conf").read_text()) == ["scram-sha-256"] * 6
    assert (folder / PASSWORD_FILE).stat().st_mode & 0o777 == 0o600
    assert password_of(uri) not in (folder / "postgres.log").read_text()


def test_mlflow_service_on_the_cluster_masks_the_password(
    folder: Path, tmp_path: Path, captured_logs: LogCapture
) -> None:
    spool = tmp_path / "spool"
    with postgres_cluster(folder) as uri:
        password = password_of(uri)
        service = MlflowService(tracking_uri=uri, spool_dir=str(spool), autolog_disable=True)
        config = MlflowService.RunConfig(name="masked", log_system_metrics=False)
        with service, service.run_context(config) as run:
            service.log_metrics({"loss": 0.5})
            spooled = holding(spool, password)  # the spool names its store
        stored = service.client().get_run(run.info.run_id)
        missing = MlflowService(tracking_uri=uri.replace("/mlflow", "/no_such_database"))
        with pytest.raises(ServiceError) as raised:
            missing.start()

    assert stored.info.status == "FINISHED"
    assert "postgresql://postgres:***@127.0.0.1" in repr(service)
    assert "postgresql://postgres:***@127.0.0.1" in str(raised.value)
    said = [repr(service), str(raised.value), *(message for _, message in captured_logs.records)]
    assert not [line for line in said if password in line]
    assert spooled == []


def test_the_server_command_shows_the_password_to_no_one(tmp_path: Path) -> None:
    require_postgres()
    top = postgres_folder("rmt-pg-hidden-")
    command = server_command(top)
    try:
        ready = lines_until(command, "tracking server ready")
        assert ready[-1].startswith("tracking server ready"), ready
        password = (top / "postgres" / PASSWORD_FILE).read_text().strip()
        # the command line of every process (`ps` shows them to every user)
        shown = command_lines()
    finally:
        command.send_signal(signal.SIGINT)
        rest, errors = command.communicate(timeout=120)
    try:
        assert "(database postgresql://postgres:***@127.0.0.1:" in ready[-1]
        assert "stopped: mlflow server and PostgreSQL" in rest, rest + errors
        assert [line for line in shown if "mlflow server" in line or "postgres -D" in line]
        assert not [line for line in shown if password in line]
        assert password not in "".join(ready) + rest + errors
        assert holding(top, password) == [top / "postgres" / PASSWORD_FILE]  # logs, leftovers
    finally:
        shutil.rmtree(top)


def command_lines() -> list[str]:
    """Every process's command line, as ``ps`` shows them."""
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, UnicodeDecodeError):
            continue  # not a process, or it ended
    return lines
