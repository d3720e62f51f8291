"""The team's stack with replicas behind haproxy: jobs keep logging while a replica dies or
all are restarted in turn.

Each test runs 4 jobs logging a value every few milliseconds (:data:`LOGGING_JOB`) through
``team_server(replicas=2)``, then checks the store itself: every step stored, every run
FINISHED, and that the jobs never waited for the store (their spool never saw it down).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing as T
from collections.abc import Iterator
from pathlib import Path

import pytest

from regression_model_template.io.stores import environ_restored
from regression_model_template.other_hosts import OtherHostUnavailable, other_host
from regression_model_template.server.stack import TeamServer, team_server
from regression_model_template.testing import clean_environ, free_port
from tests.integration.conftest import (
    LOGGING_JOB,
    ctrl_c_enabled,
    lines_until,
    postgres_folder,
    require_balancer,
    require_postgres,
)
from tests.integration.test_server import RUN_LINE, explain
from tests.s3_server import MotoS3, served_artifact

JOBS = 4
JOB_TIMEOUT = 300.0  # seconds for a job to end once told to (measured: a few)
BACK_WITHIN = 60.0  # seconds for a killed replica to be back in rotation (the bound)
# seconds: the goal is 50 ms (measured: printed here, figures in the README); this bound
# only separates a loop that never waited from one that waited for the failover (seconds),
# as tests/integration/test_outage.py does: the machine is noisy, 2 cores
LONGEST_CALL = 0.5

pytestmark = [pytest.mark.slow, pytest.mark.server]


@pytest.fixture(scope="module")
def stack() -> Iterator[TeamServer]:
    """The team's stack with 2 replicas of 1 worker each, and what it reported."""
    require_postgres()
    require_balancer()
    folder = postgres_folder("rmt-replicas-")
    try:
        with team_server(folder, port=free_port(), workers=1, replicas=2, reap_after=0) as found:
            sys.stderr.write(f"\nteam server with 2 replicas at {found.url}\n")
            yield found
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Jobs:
    """``count`` logging jobs against ``url``, each in its own process, until :meth:`finish`."""

    def __init__(self, url: str, folder: Path, count: int = JOBS) -> None:
        self.stop = folder / "stop"
        self.reports = [folder / f"report-{i}.json" for i in range(count)]
        self.processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    LOGGING_JOB,
                    url,
                    str(folder / f"spool-{i}"),
                    str(self.stop),
                    str(report),
                    "replicas",
                ],
                env=clean_environ(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, report in enumerate(self.reports)
        ]
        self.run_ids = [self._started(job) for job in self.processes]

    @staticmethod
    def _started(job: subprocess.Popen[str]) -> str:
        assert job.stdout is not None
        run_id = job.stdout.readline().strip()
        assert run_id, job.communicate(timeout=JOB_TIMEOUT)[1][-3000:]
        return run_id

    def finish(self) -> list[tuple[dict[str, T.Any], str]]:
        """Tell the jobs to end; each one's report and its error output."""
        self.stop.touch()
        ended = []
        for job, report in zip(self.processes, self.reports, strict=True):
            _, errors = job.communicate(timeout=JOB_TIMEOUT)
            assert job.returncode == 0, errors[-3000:]
            ended.append((json.loads(report.read_text()), errors))
        return ended

    def kill(self) -> None:
        for job in self.processes:
            if job.poll() is None:
                job.kill()
                job.wait()


def stored_status(stack: TeamServer, run_id: str) -> str:
    """The run's status in the store."""
    return stored(stack, run_id)[1]


def stored(stack: TeamServer, run_id: str) -> tuple[int, str]:
    """The distinct steps of ``loss`` the store holds for the run, and the run's status."""
    import psycopg

    with psycopg.connect(stack.database, connect_timeout=10) as db:
        steps = db.execute(
            "SELECT count(DISTINCT step) FROM metrics WHERE run_uuid = %s AND key = 'loss'",
            (run_id,),
        ).fetchone()
        status = db.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
    assert steps is not None and status is not None
    return int(steps[0]), str(status[0])


def check_nothing_lost(stack: TeamServer, ended: list[tuple[dict[str, T.Any], str]]) -> float:
    """Every step of every job is stored and every run FINISHED; return the worst call (s)."""
    worst = 0.0
    for report, errors in ended:
        assert stored(stack, str(report["run_id"])) == (report["steps"], "FINISHED")
        # the jobs never found the store down: their spool never had to wait for it
        assert "reachable again" not in errors, errors[-3000:]
        worst = max(worst, float(report["worst"]))
    return worst


def wait_for(condition: T.Callable[[], bool], seconds: float) -> float:
    """Seconds until ``condition()`` holds; fails past ``seconds``."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < seconds, f"not within {seconds:g} s"
        time.sleep(0.2)
    return time.monotonic() - began


def test_a_replica_killed_mid_run_loses_nothing_and_comes_back(
    stack: TeamServer, tmp_path: Path
) -> None:
    assert stack.replicas is not None
    wait_for(lambda: stack.replicas is not None and stack.replicas.up() == 2, BACK_WITHIN)
    # given 4 jobs logging through the balancer
    jobs = Jobs(stack.url, tmp_path)
    try:
        # when one replica dies at once, its workers with it, a few seconds in
        time.sleep(3)
        victim = stack.replicas.groups()[0]
        os.killpg(victim, signal.SIGKILL)
        # then it is started again, and the balancer has it back within a minute
        back = wait_for(
            lambda: (
                stack.replicas is not None
                and victim not in stack.replicas.groups()
                and stack.replicas.up() == 2
            ),
            BACK_WITHIN,
        )
        time.sleep(3)  # logging goes on through both again
        ended = jobs.finish()
    finally:
        jobs.kill()

    # then every step of every run is stored, FINISHED, and no job felt it
    worst = check_nothing_lost(stack, ended)
    print(f"\nreplica back in rotation {back:.1f} s after SIGKILL; worst log_metrics call "
          f"{worst * 1000:.1f} ms over {JOBS} jobs")  # fmt: skip
    assert worst < LONGEST_CALL


def test_a_rolling_restart_under_load_loses_nothing(stack: TeamServer, tmp_path: Path) -> None:
    assert stack.replicas is not None
    wait_for(lambda: stack.replicas is not None and stack.replicas.up() == 2, BACK_WITHIN)
    before = stack.replicas.groups()
    # given 4 jobs logging through the balancer
    jobs = Jobs(stack.url, tmp_path)
    try:
        # when every replica is restarted, one at a time
        time.sleep(2)
        began = time.monotonic()
        stack.replicas.restart()
        took = time.monotonic() - began
        time.sleep(2)
        ended = jobs.finish()
    finally:
        jobs.kill()

    # then both are new processes, both in rotation, and nothing was lost or felt
    after = stack.replicas.groups()
    assert len(after) == 2 and not set(after) & set(before)
    assert stack.replicas.up() == 2
    worst = check_nothing_lost(stack, ended)
    print(f"\nrolling restart of 2 replicas took {took:.1f} s; worst log_metrics call "
          f"{worst * 1000:.1f} ms over {JOBS} jobs")  # fmt: skip
    assert worst < LONGEST_CALL


def test_the_server_command_restarts_replicas_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    require_postgres()
    require_balancer()
    folder = postgres_folder("rmt-replicas-cli-")
    server = subprocess.Popen(
        [sys.executable, "-m", "regression_model_template", "server", "--folder", str(folder),
         "--port", str(free_port()), "--workers", "1", "--replicas", "2", "--reap-after", "0"],
        env=clean_environ(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=ctrl_c_enabled,
    )  # fmt: skip
    try:
        # given the server command with 2 replicas, ready
        ready = "".join(lines_until(server, "Ctrl-C stops it."))
        assert "2 replicas behind haproxy" in ready, ready
        assert f"kill -HUP {server.pid}" in ready, ready

        # when it gets SIGHUP, then it restarts both, one after the other, and says so
        server.send_signal(signal.SIGHUP)
        said = "".join(lines_until(server, "rolling restart: replica r2 back"))
        assert "rolling restart: replica r1 back" in said, said
        assert "rolling restart: replica r2 back" in said, said

        # when both replicas die at once, then it goes on serving and starts both again
        leaders = subprocess.run(
            ["pgrep", "-f", f"mlflow server .*--artifacts-destination {folder}/artifacts"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
        assert len(leaders) == 2, leaders
        for leader in leaders:
            os.killpg(int(leader), signal.SIGKILL)
        said = "".join(lines_until(server, "replica r", seconds=BACK_WITHIN))
        said += "".join(lines_until(server, "replica r", seconds=BACK_WITHIN))
        assert said.count("exited (-9): restarted in") == 2, said
        assert server.poll() is None

        # when it gets Ctrl-C, then it stops, and no process of the stack is left
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=120)
        assert server.returncode == 0, out
        assert "stopped" in out
        left = subprocess.run(["pgrep", "-af", str(folder)], capture_output=True, text=True)
        assert left.stdout == "", left.stdout
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_training_job_through_replicas_keeps_its_artifacts_in_s3(
    moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_postgres()
    require_balancer()
    # given the stack with 2 replicas and an S3 destination, its credentials its own
    for name, value in moto_s3.environ.items():
        monkeypatch.setenv(name, value)
    folder = postgres_folder("rmt-replicas-s3-")
    destination = f"s3://{moto_s3.bucket}/team"
    try:
        with team_server(folder, port=free_port(), workers=1, replicas=2, reap_after=0,
                         artifacts=destination) as stack:  # fmt: skip
            # when the training job runs through it, without any storage setting
            environ = {
                name: value
                for name, value in clean_environ(MLFLOW_TRACKING_URI=stack.url).items()
                if not name.startswith(("AWS_", "MLFLOW_S3_"))
            }
            training = subprocess.run(
                [sys.executable, "-m", "regression_model_template", "run", "training",
                 "--profile", "server"],
                cwd=folder, env=environ, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=JOB_TIMEOUT, check=False,
            )  # fmt: skip
            assert training.returncode == 0, explain(training)
            found = RUN_LINE.search(training.stdout)
            assert found, explain(training)
            run_id = found["run_id"]
            # then the UI (through the balancer) serves the run's log and plot back
            run_log = served_artifact(stack.url, run_id, "run.log")
            plot = served_artifact(stack.url, run_id, "predicted_vs_actual.png")
        # and the storage's secret is in no output of the stack
        secret = moto_s3.environ["AWS_SECRET_ACCESS_KEY"]
        logs = list(folder.glob("*.log")) + list(folder.glob("balancer/*.log"))
        assert len(logs) >= 2 and not [log for log in logs if secret in log.read_text("latin-1")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    # and the model, the plot and run.log are in the bucket under the prefix, as served
    keys = moto_s3.keys("team/")
    run_folder = next(key for key in keys if f"/{run_id}/artifacts/" in key).split("/artifacts/")[0]
    assert f"{run_folder}/artifacts/run.log" in keys, keys
    assert moto_s3.read(f"{run_folder}/artifacts/run.log") == run_log
    assert b"Logged the plot predicted_vs_actual.png" in run_log
    assert moto_s3.read(f"{run_folder}/artifacts/predicted_vs_actual.png") == plot
    assert plot.startswith(b"\x89PNG")
    assert any(key.startswith("team/") and key.endswith("/MLmodel") for key in keys), keys


# Run on the other host: as the admin, add a user; then, as that user, 20 requests (each on a
# new connection: haproxy spreads them over both replicas) and, as the user, a run logged
# through MlflowService. Prints {"statuses": [...], "run_id": the run's id}.
NETWORK_USER = """
import json, os, sys, requests
from mlflow.server import get_app_client
from regression_model_template.io.services import MlflowService
url, certificate, spool = sys.argv[1:4]
users = get_app_client("basic-auth", tracking_uri=url)
users.create_user(username="bob", password="bob-s3cret-password")
search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
statuses = [requests.get(search, auth=("bob", "bob-s3cret-password"), verify=certificate,
                         timeout=30).status_code for _ in range(20)]
statuses.append(requests.get(search, verify=certificate, timeout=30).status_code)
os.environ.update(MLFLOW_TRACKING_USERNAME="bob", MLFLOW_TRACKING_PASSWORD="bob-s3cret-password")
service = MlflowService(tracking_uri=url, experiment_name="bob", spool_dir=spool,
                        autolog_disable=True)
config = MlflowService.RunConfig(name="bob", log_system_metrics=False)
with service, service.run_context(config) as run:
    service.log_metrics({"loss": 0.5}, step=0)
print(json.dumps({"statuses": statuses, "run_id": run.info.run_id}))
"""


def test_replicas_serve_another_host_over_tls_with_one_users_database(tmp_path: Path) -> None:
    require_postgres()
    require_balancer()
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "replicas-Pa55word"}
    folder = postgres_folder("rmt-replicas-host-")
    try:
        with other_host() as host, environ_restored(admin):
            # given 2 replicas behind the balancer on this host's end of a link, its admin set
            os.environ.update(admin)
            with team_server(folder, port=free_port(host.gateway), workers=1, replicas=2,
                             reap_after=0, host=host.gateway) as stack:  # fmt: skip
                assert stack.certificate is not None and stack.url.startswith("https://")
                # when the admin adds a user from the other host, and the user works
                job = subprocess.run(
                    host.command([sys.executable, "-c", NETWORK_USER, stack.url,
                                  str(stack.certificate), str(tmp_path / "spool")]),
                    env=clean_environ(**admin,
                                      MLFLOW_TRACKING_SERVER_CERT_PATH=str(stack.certificate)),
                    capture_output=True, text=True,
                    timeout=JOB_TIMEOUT, check=False,
                )  # fmt: skip
                assert job.returncode == 0, job.stderr[-3000:]
                result = json.loads(job.stdout.strip().splitlines()[-1])
                # then every request of the user is let in, whichever replica answered it,
                # and none without credentials; the user's run is stored
                assert result["statuses"] == [200] * 20 + [401]
                assert stored_status(stack, result["run_id"]) == "FINISHED"
    except OtherHostUnavailable as error:
        if os.environ.get("CI"):
            pytest.fail(f"network namespaces are required on CI: {error}")
        pytest.skip(f"no other host: {error}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
