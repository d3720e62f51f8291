"""The reaper against real servers: a job killed with SIGKILL, its run ended by `reap`, and by
the team stack's own reaper.

The session's ``mlflow server`` serves the first test; the second starts its own team stack
(PostgreSQL and ``mlflow server``, as ``make server`` runs it) with a reaper that ends runs
silent for 2 s, the stack's defaults scaled down (300 s, a reap every 60 s).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from regression_model_template.io import reaper
from regression_model_template.server.stack import team_server
from regression_model_template.testing import free_port
from tests.conftest import eventually
from tests.integration.conftest import postgres_folder, require_postgres
from tests.io.test_reaper import kill_a_job_mid_run, reap_command

pytestmark = [pytest.mark.server, pytest.mark.slow]

STALE_AFTER = 2.0  # seconds; the stack's default is 300


def test_reap_command_ends_a_killed_jobs_run_on_a_tracking_server(
    tmp_path: Path, mlflow_server: str
) -> None:
    # given a job killed with SIGKILL mid-run, its run RUNNING on the server, and a plain run
    run_id, heard = kill_a_job_mid_run(tmp_path, mlflow_server)
    client = MlflowClient(mlflow_server)
    plain = client.create_run("0", start_time=0).info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    eventually(
        lambda: time.time() * 1000 - heard > STALE_AFTER * 1000, "a stale heartbeat", seconds=120.0
    )

    # when `reap` runs against the server
    result = reap_command(tmp_path, mlflow_server, "--stale-after", f"{STALE_AFTER:g}")

    # then the killed job's run is ended KILLED at its last heartbeat, said in one line
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if run_id in line]
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith(f"reaped run {run_id} (experiment children): KILLED, last heard ")
    run = client.get_run(run_id)
    assert (run.info.status, run.info.end_time) == ("KILLED", heard)
    assert run.data.tags[reaper.REAPED].startswith("ended KILLED by the reaper")
    assert client.get_run(plain).info.status == "RUNNING"


def test_the_team_stack_reaps_a_killed_jobs_run_on_its_own(tmp_path: Path) -> None:
    require_postgres()
    folder = postgres_folder("rmt-team-reaper-")
    said: list[str] = []
    try:
        # given the team stack with a reaper ending runs silent for 2 s
        with team_server(
            folder, port=free_port(), workers=1, reap_after=STALE_AFTER, report=said.append
        ) as stack:
            client = MlflowClient(stack.url)
            # when a job on it is killed with SIGKILL mid-run
            run_id, heard = kill_a_job_mid_run(tmp_path, stack.url)
            killed = time.time()
            # then, with nobody running `reap`, its run ends KILLED at its last heartbeat
            eventually(
                lambda: client.get_run(run_id).info.status == "KILLED", "the reap", seconds=120.0
            )
            running_for, after_kill = time.time() - heard / 1000, time.time() - killed
            run = client.get_run(run_id)
            assert run.info.end_time == heard
            assert run.data.tags[reaper.REAPED].startswith("ended KILLED by the reaper")
            # and the stack said so in its output, once
            eventually(
                lambda: any(run_id in line for line in said), "the stack's line", seconds=120.0
            )
            lines = [line for line in said if run_id in line]
            assert len(lines) == 1, said
            last_heard = reaper.stamp(heard / 1000)
            assert lines[0].startswith(
                f"reaped run {run_id} (experiment children): KILLED, last heard {last_heard}"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # (not asserted: this machine is noisy) the bound is STALE_AFTER + reaper.period(...)
    sys.stderr.write(
        f"\nteam stack reaper: run RUNNING {running_for:.2f} s after its last heartbeat, "
        f"{after_kill:.2f} s after the kill (bound from the last heartbeat: "
        f"{STALE_AFTER + reaper.period(STALE_AFTER):g} s + one reap)\n"
    )
