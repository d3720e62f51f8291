"""The team's server as another machine sees it: a network namespace on a private link.

The other host is a network namespace joined to this one by a veth pair (addresses from
198.18.0.0/15 only, :func:`regression_model_template.other_hosts.other_host`); the team's stack
listens on this host's end of the link, with credentials and TLS, as for a team on a network.
Commands on the other host are this machine's programs run through ``ip netns exec``: same
files, same Python, another network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from regression_model_template.io.stores import environ_restored
from regression_model_template.other_hosts import (
    TEST_NETWORK,
    OtherHost,
    OtherHostUnavailable,
    other_host,
)
from regression_model_template.server.stack import TeamServer, team_server
from regression_model_template.testing import clean_environ, free_port
from tests.integration.conftest import LOGGING_JOB, postgres_folder, require_postgres
from tests.integration.test_server import MODEL_LINE, REGISTRY_NAME, RUN_LINE, explain

ADMIN, PASSWORD = "admin", "other-host-Pa55"  # the stack's admin (its environment at start)
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
JOB_TIMEOUT = 300.0  # seconds for one job from the other host (measured: 10-40 s)
CUT = 20.0  # seconds the link is down during the partition test

# Run on the other host: one HTTP(S) request, or one TCP connection; prints what came back.
PROBE = """
import errno, socket, sys, requests
kind, target, user, password, certificate = (sys.argv[1:] + [""] * 5)[:5]
if kind == "tcp":
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
        print("connected")
    except OSError as error:  # ECONNREFUSED, ENETUNREACH, ... or TimeoutError
        print(errno.errorcode.get(error.errno or 0, type(error).__name__))
    sys.exit()
try:
    answer = requests.get(target, auth=(user, password) if user else None,
                          verify=certificate or True, timeout=10)
    print(answer.status_code)
except requests.RequestException as error:
    print(type(error).__name__)
"""


@pytest.fixture(scope="module")
def host() -> Iterator[OtherHost]:
    """Another host for the module; skips where namespaces cannot be made (fails on CI)."""
    made = False
    try:
        with other_host() as found:
            made = True
            yield found
    except OtherHostUnavailable as error:
        if made:
            raise
        if os.environ.get("CI"):
            pytest.fail(f"network namespaces are required on CI: {error}")
        pytest.skip(f"no other host: {error}")


@pytest.fixture(scope="module")
def stack(host: OtherHost) -> Iterator[TeamServer]:
    """The team's stack on this host's end of the link: credentials and TLS are on."""
    require_postgres()
    folder = postgres_folder("rmt-other-host-")
    try:
        with contextlib.ExitStack() as running:
            # the admin comes from the server's environment at start; the tests' stays clean
            with environ_restored(CREDENTIALS):
                os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=PASSWORD)
                started = running.enter_context(
                    team_server(
                        folder, port=free_port(host.gateway), workers=2, reap_after=0,
                        host=host.gateway,
                    )
                )  # fmt: skip
            sys.stderr.write(f"\nteam server for another host at {started.url}\n")
            yield started
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def job_environ(stack: TeamServer, password: str = PASSWORD) -> dict[str, str]:
    """The environment of a job on the other host: the server, the credentials, the certificate."""
    assert stack.certificate is not None
    return clean_environ(
        MLFLOW_TRACKING_URI=stack.url,
        MLFLOW_TRACKING_USERNAME=ADMIN,
        MLFLOW_TRACKING_PASSWORD=password,
        MLFLOW_TRACKING_SERVER_CERT_PATH=str(stack.certificate),
    )


def probe(host: OtherHost, *args: str) -> str:
    """What one request (or TCP connection) from the other host got back."""
    done = subprocess.run(
        host.command([sys.executable, "-c", PROBE, *args]),
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, explain(done)
    return done.stdout.strip()


def database_rows(stack: TeamServer, query: str, *params: str) -> list[tuple[object, ...]]:
    """Rows of the stack's PostgreSQL database: what the server stored, read directly."""
    import psycopg

    with psycopg.connect(stack.database, connect_timeout=10) as db:
        return list(db.execute(query, params).fetchall())


# %% the helper itself


@pytest.mark.slow
def test_another_host_reaches_this_host_on_its_link_only_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    # given two other hosts, and a listener on the first one's end of the link
    import socket

    names: list[str] = []
    with pytest.raises(KeyError), other_host() as first, other_host() as second:
        names += [first.name, second.name, first.device, second.device]
        listener = socket.create_server((first.gateway, 0))
        port = listener.getsockname()[1]
        target = f"{first.gateway}:{port}"
        leftover = subprocess.Popen(first.command(["sleep", "600"]))

        # when each host connects to it, the first one also during a cut of its link
        reached = probe(first, "tcp", target)
        with first.cut():
            during_cut = probe(first, "tcp", target)
        after_cut = probe(first, "tcp", target)
        from_second = probe(second, "tcp", target)
        listener.close()
        raise KeyError("the block fails")

    # then only the first host reaches it, not during the cut, and everything is gone
    assert (reached, after_cut) == ("connected", "connected")
    assert during_cut != "connected"  # unreachable or no answer, as the kernel sees the cut
    assert from_second == "ENETUNREACH"  # its only route is its own link
    for address in (first.address, first.gateway, second.address, second.gateway):
        assert ipaddress.ip_address(address) in TEST_NETWORK
    assert first.gateway.rsplit(".", 1)[0] != second.gateway.rsplit(".", 1)[0]
    assert leftover.wait(10) == -9  # killed with its namespace
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for name in names:
        assert name not in namespaces and f" {name}@" not in links and f" {name}:" not in links


# %% the team's stack from another host


@pytest.mark.slow
@pytest.mark.server
def test_without_credentials_or_with_a_wrong_password_the_server_refuses(
    host: OtherHost, stack: TeamServer
) -> None:
    certificate = str(stack.certificate)
    experiments = f"{stack.url}/api/2.0/mlflow/experiments/search?max_results=1"

    anonymous = probe(host, "http", experiments, "", "", certificate)
    wrong = probe(host, "http", experiments, ADMIN, "not-the-password", certificate)
    right = probe(host, "http", experiments, ADMIN, PASSWORD, certificate)

    assert stack.url.startswith(f"https://{host.gateway}:")
    assert (anonymous, wrong, right) == ("401", "401", "200")


@pytest.mark.slow
@pytest.mark.server
def test_plain_http_and_postgresql_are_not_reachable_from_another_host(
    host: OtherHost, stack: TeamServer
) -> None:
    port = urllib.parse.urlsplit(stack.url).port
    database_port = urllib.parse.urlsplit(stack.database).port

    plain = probe(host, "http", f"http://{host.gateway}:{port}/health")
    secure = probe(host, "http", f"{stack.url}/health", "", "", str(stack.certificate))
    postgres = probe(host, "tcp", f"{host.gateway}:{database_port}")

    assert secure == "200"
    assert plain in ("ConnectionError", "ReadTimeout"), plain  # no HTTP answer at all
    assert postgres == "ECONNREFUSED"
    assert database_rows(stack, "SELECT 1") == [(1,)]  # while it serves this host


@pytest.mark.slow
@pytest.mark.server
def test_training_from_another_host_registers_the_model(
    host: OtherHost, stack: TeamServer, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "regression_model_template", "run", "training"]

    training = subprocess.run(
        host.command([*command, "--profile", "server"]),
        cwd=tmp_path, env=job_environ(stack), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=JOB_TIMEOUT, check=False,
    )  # fmt: skip

    assert training.returncode == 0, explain(training)
    run_line, model_line = RUN_LINE.search(training.stdout), MODEL_LINE.search(training.stdout)
    assert run_line and model_line, explain(training)
    assert PASSWORD not in training.stdout + training.stderr
    run_id, version = run_line["run_id"], model_line["version"]
    assert database_rows(stack, "SELECT status FROM runs WHERE run_uuid = %s", run_id) == [
        ("FINISHED",)
    ]
    assert database_rows(
        stack, "SELECT name, version, status FROM model_versions WHERE run_id = %s", run_id
    ) == [(REGISTRY_NAME, int(version), "READY")]


@pytest.mark.slow
@pytest.mark.server
def test_a_link_cut_while_logging_loses_nothing(
    host: OtherHost, stack: TeamServer, tmp_path: Path
) -> None:
    # given a job on the other host logging a value every few milliseconds
    stop, report = tmp_path / "stop", tmp_path / "report.json"
    argv = [stack.url, str(tmp_path / "spool"), str(stop), str(report), "other-host-partition"]
    job = subprocess.Popen(
        host.command([sys.executable, "-c", LOGGING_JOB, *argv]),
        env=job_environ(stack), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert job.stdout is not None
        run_id = job.stdout.readline().strip()
        assert run_id, job.communicate(timeout=JOB_TIMEOUT)[1][-3000:]

        # when the link is cut for 20 s after a few seconds of logging, then logging goes on
        time.sleep(3)
        with host.cut():
            time.sleep(CUT)
        time.sleep(5)
        stop.touch()
        _, errors = job.communicate(timeout=JOB_TIMEOUT)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

    # then the job ended well, and every step is stored in its FINISHED run
    assert job.returncode == 0, errors[-3000:]
    logged = json.loads(report.read_text())
    print(f"\nworst log_metrics call during a {CUT:g} s link cut: {logged['worst'] * 1000:.1f} ms "
          f"({logged['steps']:,} steps)")  # fmt: skip
    assert logged["run_id"] == run_id
    stored = database_rows(
        stack,
        "SELECT count(DISTINCT step) FROM metrics WHERE run_uuid = %s AND key = 'loss'",
        run_id,
    )
    assert stored == [(logged["steps"],)]
    assert database_rows(stack, "SELECT status FROM runs WHERE run_uuid = %s", run_id) == [
        ("FINISHED",)
    ]
    assert "reachable again" in errors  # the cut was felt: the spool waited for the store


def test_without_root_or_ip_there_is_no_other_host_and_the_error_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with monkeypatch.context() as patched:
        patched.setattr(os, "geteuid", lambda: 1000)
        with pytest.raises(OtherHostUnavailable, match=r"needs root; .* uid 1000"), other_host():
            pass
    with monkeypatch.context() as patched:
        patched.setattr(shutil, "which", lambda name: None)
        with pytest.raises(OtherHostUnavailable, match=r"`ip` program .* iproute2"), other_host():
            pass
