"""The team's tracking server: PostgreSQL-backed MLflow, many jobs at once, ``make server``.

One stack serves the module (the session fixture ``team_stack``: a throwaway PostgreSQL cluster
and an ``mlflow server`` with two workers and proxied artifacts on it, started by the code
``make server`` runs). Every test writes to its own experiment or its own database.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import typing as T
import urllib.parse
from pathlib import Path

import psycopg
import pytest

from regression_model_template.io.services import MlflowService, ServiceError
from regression_model_template.server.postgres import create_database, postgres_cluster
from regression_model_template.server.stack import TeamServer
from regression_model_template.testing import clean_environ, free_port
from tests.integration.conftest import (
    ctrl_c_enabled,
    lines_until,
    postgres_folder,
    require_postgres,
    server_command,
)
from tests.integration.test_server import (
    MODEL_LINE,
    RUN_LINE,
    SECRET,
    check_training_run,
    client_for,
    explain,
    printed_metrics,
    run_cli,
    secret_forms,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
JOBS = 8
VALUES = 20_000


def server_uri(stack: TeamServer) -> str:
    """``postgresql://postgres:PASSWORD@127.0.0.1:PORT``: the cluster, without a database."""
    return stack.database.rsplit("/", 1)[0]


def with_scheme(uri: str, scheme: str) -> str:
    """The URI with another scheme (``postgresql+psycopg2``: another driver)."""
    return uri.replace("postgresql://", f"{scheme}://", 1)


def assert_no_secret(*texts: str, secret: str = SECRET) -> None:
    for text in texts:
        for form in secret_forms(secret, user="postgres"):
            assert form not in text


def children(
    code: str,
    *argv_per_child: list[str],
    started: T.Callable[[list[subprocess.Popen[str]]], None] = lambda processes: None,
) -> list[subprocess.CompletedProcess[str]]:
    """Run one ``python -c code`` per argument list, all at once; wait for all.

    ``started`` gets the children once all are launched, before this waits for them.
    """
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *argv],
            env=clean_environ(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argv_per_child
    ]
    try:
        started(processes)
    except BaseException:
        for process in processes:
            process.kill()
            process.communicate()
        raise
    results = []
    for process, argv in zip(processes, argv_per_child, strict=True):
        stdout, stderr = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr))
    return results


# %% the jobs, through a server on PostgreSQL and directly on PostgreSQL


def test_jobs_from_the_command_line_against_the_postgres_backed_server(
    team_stack: TeamServer, tmp_path: Path
) -> None:
    experiment = "pg-server-jobs"
    client = client_for(team_stack.url)
    choose = ("--set", f"mlflow.experiment_name={experiment}")

    training = run_cli("run", "training", "--profile", "server", *choose,
                       tracking_uri=team_stack.url, cwd=tmp_path)  # fmt: skip
    evaluation = run_cli("run", "evaluation", "--profile", "server", *choose,
                         tracking_uri=team_stack.url, cwd=tmp_path)  # fmt: skip

    assert training.returncode == 0, explain(training)
    run_line, model_line = RUN_LINE.search(training.stdout), MODEL_LINE.search(training.stdout)
    assert run_line and model_line, explain(training)
    check_training_run(
        client,
        run_line["run_id"],
        model_line["version"],
        experiment,
        printed_metrics(run_line["metrics"]),
    )
    plot = client.download_artifacts(run_line["run_id"], "predicted_vs_actual.png", str(tmp_path))
    assert Path(plot).read_bytes().startswith(PNG)
    assert not (tmp_path / "mlruns").exists()  # artifacts went through the server
    assert evaluation.returncode == 0, explain(evaluation)
    eval_line = RUN_LINE.search(evaluation.stdout)
    assert eval_line, explain(evaluation)
    assert client.get_run(eval_line["run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+psycopg2"])
def test_jobs_directly_on_postgresql_with_credentials_masked(
    team_stack: TeamServer, tmp_path: Path, scheme: str
) -> None:
    database = create_database(server_uri(team_stack), "direct")
    uri = with_scheme(database, scheme)
    password = urllib.parse.urlsplit(uri).password
    assert password
    experiment = f"pg-direct-{scheme.replace('+', '-')}"
    choose = ("--set", f"mlflow.experiment_name={experiment}")

    show = run_cli("config", "show", "--profile", "server", tracking_uri=uri, cwd=tmp_path)
    training = run_cli("run", "training", "--profile", "server", *choose,
                       tracking_uri=uri, cwd=tmp_path)  # fmt: skip
    evaluation = run_cli("run", "evaluation", "--profile", "server", *choose,
                         tracking_uri=uri, cwd=tmp_path)  # fmt: skip

    assert show.returncode == 0, explain(show)
    assert f"{scheme}://postgres:***@127.0.0.1" in show.stdout, explain(show)
    assert training.returncode == 0, explain(training)
    run_line, model_line = RUN_LINE.search(training.stdout), MODEL_LINE.search(training.stdout)
    assert run_line and model_line, explain(training)
    client = MlflowService(tracking_uri=uri).client()
    run = client.get_run(run_line["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == experiment
    for name, value in printed_metrics(run_line["metrics"]).items():
        assert run.data.metrics[name] == pytest.approx(value, rel=1e-3)
    # no server: the artifacts are files, in ./mlruns of the job's working directory
    assert "predicted_vs_actual.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    champion = client.get_model_version_by_alias("regression_model_template", "champion")
    assert (str(champion.version), champion.run_id) == (model_line["version"], run.info.run_id)
    assert evaluation.returncode == 0, explain(evaluation)
    eval_line = RUN_LINE.search(evaluation.stdout)
    assert eval_line, explain(evaluation)
    assert client.get_run(eval_line["run_id"]).info.status == "FINISHED"
    for result in (show, training, evaluation):
        assert_no_secret(result.stdout, result.stderr, secret=password)


def test_an_unreachable_database_fails_start_with_the_setting_and_no_secret() -> None:
    uri = f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/mlflow"
    service = MlflowService(tracking_uri=uri, connect_timeout=2)

    with pytest.raises(ServiceError) as raised:
        service.start()

    message = str(raised.value)
    assert message.startswith("MlflowService.tracking_uri: cannot connect to the database")
    assert "postgresql://postgres:***@127.0.0.1" in message
    assert "within 2 s (mlflow.connect_timeout)" in message
    assert "Connection refused" in message or "connection failed" in message
    assert_no_secret(message, repr(raised.value.__cause__))
    service.stop()  # nothing half-started: stopping is harmless


def test_a_database_that_does_not_exist_is_named(team_stack: TeamServer) -> None:
    uri = f"{server_uri(team_stack)}/no_such_database"
    password = urllib.parse.urlsplit(uri).password
    assert password

    with pytest.raises(ServiceError, match=r'database "no_such_database" does not exist') as raised:
        MlflowService(tracking_uri=uri).start()

    assert_no_secret(str(raised.value), secret=password)


# %% many jobs at once

LOAD_JOB = """
import sys
from regression_model_template.io.services import MlflowService
service = MlflowService(tracking_uri=sys.argv[1], experiment_name="pg-load",
                        spool_dir=sys.argv[2], autolog_disable=True)
with service, service.run_context(MlflowService.RunConfig(name=sys.argv[3],
                                                          log_system_metrics=False)):
    for step in range(int(sys.argv[4])):
        service.log_metrics({"loss": step / 1000.0}, step=step)
"""


def test_eight_jobs_logging_twenty_thousand_values_each_at_once(
    team_stack: TeamServer, tmp_path: Path
) -> None:
    spools = [tmp_path / f"spool{i}" for i in range(JOBS)]
    results = children(
        LOAD_JOB, *[[team_stack.url, str(s), f"job{i}", str(VALUES)] for i, s in enumerate(spools)]
    )

    for result in results:
        assert result.returncode == 0, explain(result)
        assert not re.search(r"ERROR|CRITICAL|Traceback", result.stderr), explain(result)
    client = client_for(team_stack.url)
    experiment = client.get_experiment_by_name("pg-load")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == [f"job{i}" for i in range(JOBS)]
    assert [run.info.status for run in runs] == ["FINISHED"] * JOBS
    with psycopg.connect(team_stack.database) as database:  # what the server stored
        for run in runs:
            stored = database.execute(
                "SELECT count(*), count(DISTINCT step), min(step), max(step) FROM metrics "
                "WHERE run_uuid = %s AND key = 'loss'",
                (run.info.run_id,),
            ).fetchone()
            assert stored == (VALUES, VALUES, 0, VALUES - 1), run.info.run_name
    assert not any(os.listdir(spool) for spool in spools)  # everything was sent


START_TOGETHER = """
import sys, time
from pathlib import Path
import mlflow  # imported before the start: what races is opening the database, not imports
from regression_model_template.io.services import MlflowService
uri, spool_dir, ready, go = sys.argv[1:5]
Path(ready).touch()
waiting_since = time.monotonic()
while not Path(go).exists():
    if time.monotonic() - waiting_since > 600:
        sys.exit("no start signal within 600 s")
    time.sleep(0.001)
service = MlflowService(tracking_uri=uri, spool_dir=spool_dir, autolog_disable=True)
with service, service.run_context(MlflowService.RunConfig(name="racer", log_system_metrics=False)):
    service.log_metrics({"started": 1.0})
"""


def release_together(
    processes: list[subprocess.Popen[str]], ready: list[Path], go: Path, timeout: float = 240.0
) -> None:
    """Wait until every child has written its ``ready`` file, then start them all (``go``)."""
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in ready):
        if any(process.poll() is not None for process in processes):
            break  # a child died early: its exit code and output tell why
        if time.monotonic() > deadline:
            waiting = [path.name for path in ready if not path.exists()]
            pytest.fail(f"children not ready within {timeout:g} s: {waiting}")
        time.sleep(0.05)
    go.touch()


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
def test_eight_jobs_starting_together_on_an_empty_database_all_succeed(
    request: pytest.FixtureRequest, tmp_path: Path, store: str
) -> None:
    # MLflow creates its tables when it first opens a database: without a lock around it,
    # 7 of 8 such jobs crash (UniqueViolation on PostgreSQL, "table already exists" on SQLite).
    if store == "postgresql":
        require_postgres()
        stack: TeamServer = request.getfixturevalue("team_stack")
        uri = create_database(server_uri(stack), f"empty_{time.time_ns()}")
    else:
        uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    # every child imports first, then all start at one signal
    ready = [tmp_path / f"ready{i}" for i in range(JOBS)]
    go = tmp_path / "go"

    results = children(
        START_TOGETHER,
        *[[uri, str(tmp_path / f"spool{i}"), str(ready[i]), str(go)] for i in range(JOBS)],
        started=lambda processes: release_together(processes, ready, go),
    )

    for result in results:
        assert result.returncode == 0, explain(result)
    client = MlflowService(tracking_uri=uri).client()
    experiment = client.get_experiment_by_name("regression_model_template")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"] * JOBS


# %% make server


def test_make_server_runs_a_job_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    require_postgres()
    folder = postgres_folder("rmt-make-server-")
    port = free_port()
    make = subprocess.Popen(
        ["make", "--no-print-directory", "server", f"PORT={port}", f"SERVER_DIR={folder}",
         "WORKERS=1"],
        cwd=ROOT,
        env=clean_environ(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group, as a terminal's foreground job
        preexec_fn=ctrl_c_enabled,
    )  # fmt: skip
    try:
        lines = lines_until(make, "tracking server ready")
        assert lines[-1].startswith(f"tracking server ready: http://127.0.0.1:{port}"), lines

        training = run_cli(
            "run", "training", "--profile", "server",
            tracking_uri=f"http://127.0.0.1:{port}", cwd=tmp_path,
        )  # fmt: skip
        assert training.returncode == 0, explain(training)
    finally:
        os.killpg(make.pid, signal.SIGINT)  # Ctrl-C at the terminal
        try:
            rest, _ = make.communicate(timeout=120)
        except subprocess.TimeoutExpired as late:
            processes = subprocess.run(["ps", "axf"], capture_output=True, text=True).stdout
            os.killpg(make.pid, signal.SIGKILL)
            server_log = (folder / "server.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"not stopped within 120 s: {late.output!r}\n{processes}\n{server_log}")

    assert "stopped: mlflow server and PostgreSQL" in rest, "".join(lines) + rest
    left = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    assert left.stdout == "", subprocess.run(["ps", "aux"], capture_output=True, text=True).stdout
    assert (folder / "postgres" / "data" / "PG_VERSION").exists()  # kept for the next run
    shutil.rmtree(folder)


def test_a_second_server_on_the_same_folder_leaves_the_running_one_alone(tmp_path: Path) -> None:
    require_postgres()
    folder = postgres_folder("rmt-second-server-")
    try:
        with postgres_cluster(folder / "postgres") as database:
            second = subprocess.run(
                [sys.executable, "-m", "regression_model_template", "server",
                 "--folder", str(folder), "--port", str(free_port())],
                env=clean_environ(), capture_output=True, text=True, timeout=120,
            )  # fmt: skip

            assert second.returncode == 1, explain(second)
            assert f"process {os.getpid()} runs the PostgreSQL cluster" in second.stderr
            with psycopg.connect(database, connect_timeout=5) as still_running:
                assert still_running.execute("SELECT 1").fetchone() == (1,)
    finally:
        shutil.rmtree(folder)


def test_the_server_command_stops_when_its_server_dies(tmp_path: Path) -> None:
    require_postgres()
    folder = postgres_folder("rmt-dying-server-")
    command = server_command(folder)
    try:
        assert command.stdout is not None
        ready = command.stdout.readline() + command.stdout.readline()
        assert "tracking server ready" in ready, ready

        # when the mlflow server dies (OOM killer, say)
        server = subprocess.run(
            ["pgrep", "-f", "--", f"--artifacts-destination {folder}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert server, "no mlflow server process found"
        os.killpg(int(server[0]), signal.SIGKILL)

        # then the command says so and exits 1, stopping PostgreSQL too
        _, stderr = command.communicate(timeout=60)
    finally:
        if command.poll() is None:  # the test failed: stop the stack as Ctrl-C would
            command.send_signal(signal.SIGINT)
            command.wait(120)
    assert command.returncode == 1
    assert "the tracking server stopped answering" in stderr
    left = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True)
    assert left.stdout == ""
    shutil.rmtree(folder)
