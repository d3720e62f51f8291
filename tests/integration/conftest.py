"""Fixtures of the integration suite: real servers on 127.0.0.1, one of each per session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing as T
from collections.abc import Iterator
from pathlib import Path

import pytest

from regression_model_template.io.masking import mask_uri
from regression_model_template.server.balancer import BalancerUnavailable, haproxy_program
from regression_model_template.server.postgres import PostgresUnavailable, postgres_bin
from regression_model_template.server.stack import TeamServer, team_server
from regression_model_template.testing import clean_environ, free_port, local_mlflow_server
from tests.integration.recording_proxy import RecordingProxy

# These machines have no internet: keep MLflow's telemetry quiet in the test process too.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


# A training loop's logging: one value per step through MlflowService.log_metrics until the
# stop file exists, timing each call. Prints the run's id at its start; writes {"run_id",
# "steps", "worst"} to the report at the end. argv: URL, spool, stop file, report, experiment.
LOGGING_JOB = """
import json, sys, time
from pathlib import Path
from regression_model_template.io.services import MlflowService
url, spool, stop, report, experiment = sys.argv[1:6]
service = MlflowService(tracking_uri=url, experiment_name=experiment,
                        spool_dir=spool, autolog_disable=True, end_timeout=300)
config = MlflowService.RunConfig(name="logging", log_system_metrics=False)
worst, steps, stop_file = 0.0, 0, Path(stop)
with service, service.run_context(config) as run:
    print(run.info.run_id, flush=True)
    while not stop_file.exists():
        begin = time.perf_counter()
        service.log_metrics({"loss": steps * 0.5}, step=steps)
        worst = max(worst, time.perf_counter() - begin)
        steps += 1
        time.sleep(0.002)  # a training loop: ~400 steps/s
Path(report).write_text(json.dumps({"run_id": run.info.run_id, "steps": steps, "worst": worst}))
"""


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1, shared by the session; yields its URL."""
    with local_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        sys.stderr.write(f"\nmlflow server ready at {url}\n")
        yield url


@pytest.fixture
def recording_proxy(mlflow_server: str) -> Iterator[RecordingProxy]:
    """A proxy in front of the session's ``mlflow server``, recording the log-batch calls.

    Give its ``url`` to the job as the tracking URI: ``recording_proxy.metrics()`` is then
    every metric value the server received, duplicates included.
    """
    with RecordingProxy(mlflow_server) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def team_stack() -> Iterator[TeamServer]:
    """The team's stack, as ``make server`` runs it: PostgreSQL and an mlflow server on it.

    PostgreSQL is installed first when missing (as root, Debian). Where it cannot be had, the
    tests using this skip with the reason, except on CI (``CI`` set), where they fail.
    """
    require_postgres()
    folder = postgres_folder("rmt-team-server-")
    try:
        with team_server(folder, port=free_port(), workers=2) as stack:
            sys.stderr.write(f"\nteam server ready at {stack.url} on {mask_uri(stack.database)}\n")
            yield stack
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def require(what: str, find: T.Callable[[], object], unavailable: type[Exception]) -> None:
    """Skip the test when ``find`` raises ``unavailable``: ``what`` cannot be had here.

    On CI (``CI`` set) the test fails instead: there every server must be installable.
    """
    try:
        find()
    except unavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required on CI: {error}")
        pytest.skip(f"{what} is not available: {error}")


def require_postgres() -> None:
    """Skip the test when PostgreSQL cannot be had here (fail on CI)."""
    require("PostgreSQL", postgres_bin, PostgresUnavailable)


def require_balancer() -> None:
    """Skip the test when haproxy cannot be had here (fail on CI)."""
    require("haproxy", haproxy_program, BalancerUnavailable)


def postgres_folder(prefix: str) -> Path:
    """A new folder the ``postgres`` user can reach (pytest's are closed to other users)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


def lines_until(process: subprocess.Popen[str], prefix: str, seconds: float = 240) -> list[str]:
    """The process's output lines up to the first one starting with ``prefix`` (or its end)."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if not line or line.startswith(prefix):
            break
    return lines


def ctrl_c_enabled() -> None:
    """In the child: SIGINT does what it does in a terminal's foreground job.

    A test run started in the background of a shell (CI scripts can be) inherits SIGINT
    ignored, and so would the server command, which then could not be stopped by Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def server_command(
    folder: Path | str, port: int | None = None, *, cwd: Path | None = None, merged: bool = False
) -> subprocess.Popen[str]:
    """``regression-model-template server --folder FOLDER`` (1 worker) in a child, as typed at
    a terminal (Ctrl-C stops it); its output piped, stderr into stdout when ``merged``."""
    return subprocess.Popen(
        [sys.executable, "-m", "regression_model_template", "server",
         "--folder", str(folder), "--port", str(port or free_port()), "--workers", "1"],
        cwd=cwd, env=clean_environ(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True,
        preexec_fn=ctrl_c_enabled,
    )  # fmt: skip
