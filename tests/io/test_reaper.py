"""The heartbeat of a live job's run, and the reaper that ends the runs whose heartbeat stopped.

Real SQLite stores under tmp_path, real child processes killed with SIGKILL, the real command.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from regression_model_template.io import reaper
from regression_model_template.io.services import MlflowService
from tests.conftest import child_job, eventually, wait_until, whole_lines

RunConfig = MlflowService.RunConfig
HOUR = 3600.0


def _service(store: str, heartbeat: float) -> MlflowService:
    return MlflowService(
        tracking_uri=store,
        experiment_name="reaper",
        autolog_disable=True,
        flush_interval=0.05,
        heartbeat_interval=heartbeat,
    )


def _heartbeat(client: MlflowClient, run_id: str) -> int:
    return int(client.get_run(run_id).data.tags[reaper.HEARTBEAT])


def _silent_run(client: MlflowClient, experiment_id: str, heard: float) -> str:
    """A RUNNING run whose job was last heard at ``heard`` (epoch seconds), as a dead job leaves."""
    started = int(heard * 1000) - 60_000
    tags = {reaper.HEARTBEAT: str(int(heard * 1000))}
    return str(client.create_run(experiment_id, start_time=started, tags=tags).info.run_id)


def test_a_live_jobs_heartbeat_moves_while_its_run_is_open_and_stops_at_its_end(
    mlflow_store: str,
) -> None:
    # given a job whose service beats every 0.2 s
    service = _service(mlflow_store, heartbeat=0.2)
    with service:
        client = service.client()
        with service.run_context(RunConfig(name="live", log_system_metrics=False)) as run:
            run_id = run.info.run_id
            first = _heartbeat(client, run_id)  # set with the run's start
            # when the run stays open, then its heartbeat moves on, more than once
            eventually(lambda: _heartbeat(client, run_id) > first, "a heartbeat after the start")
            second = _heartbeat(client, run_id)
            eventually(lambda: _heartbeat(client, run_id) > second, "another heartbeat")
        last = _heartbeat(client, run_id)
        time.sleep(1.0)  # five heartbeats' worth, with the service still started
        # then once the run has ended, its heartbeat stays where it was
        assert _heartbeat(client, run_id) == last
        assert client.get_run(run_id).info.status == "FINISHED"


def test_reap_ends_a_silent_run_killed_at_its_last_heartbeat_and_says_why(
    mlflow_store: str,
) -> None:
    # given a run whose job was last heard ten minutes ago
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("silent")
    heard = time.time() - 600
    run_id = _silent_run(client, experiment, heard)

    # when runs silent for five minutes are reaped
    reaped = reaper.reap(client, stale_after=300)

    # then it is ended KILLED, at the time it was last heard, with a tag saying why
    assert [(r.run_id, r.experiment) for r in reaped] == [(run_id, "silent")]
    run = client.get_run(run_id)
    assert (run.info.status, run.info.end_time) == ("KILLED", int(heard * 1000))
    why = run.data.tags[reaper.REAPED]
    assert why.startswith("ended KILLED by the reaper because its heartbeat stopped")
    assert f"last heard {reaper.stamp(heard)}" in why
    assert reaped[0].last_heard.timestamp() == pytest.approx(heard, abs=0.001)


def test_plain_mlflow_runs_and_fresh_heartbeats_are_never_touched(mlflow_store: str) -> None:
    # given a plain MLflow run RUNNING for five hours, and a run heard a second ago
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("untouched")
    plain = client.create_run(experiment, start_time=int((time.time() - 5 * HOUR) * 1000))
    fresh = _silent_run(client, experiment, time.time() - 1)

    # when runs silent for a minute are reaped
    reaped = reaper.reap(client, stale_after=60)

    # then neither is ended, nor tagged
    assert reaped == []
    for run_id in (plain.info.run_id, fresh):
        run = client.get_run(run_id)
        assert (run.info.status, run.info.end_time) == ("RUNNING", None)
        assert reaper.REAPED not in run.data.tags


def test_a_heartbeat_that_is_not_a_number_is_left_alone(mlflow_store: str) -> None:
    client = MlflowClient(mlflow_store)
    tags = {reaper.HEARTBEAT: "yesterday"}
    run_id = client.create_run("0", start_time=0, tags=tags).info.run_id

    assert reaper.reap(client, stale_after=60) == []
    assert client.get_run(run_id).info.status == "RUNNING"


def test_reap_refuses_a_stale_after_that_is_not_positive(mlflow_store: str) -> None:
    with pytest.raises(ValueError, match="stale_after must be more than 0 seconds"):
        reaper.reap(MlflowClient(mlflow_store), stale_after=0)


def test_two_reapers_at_once_end_each_silent_run_once_and_the_same_way(
    mlflow_store: str,
) -> None:
    # given 30 silent runs in two experiments, and one live run
    client = MlflowClient(mlflow_store)
    experiments = [client.create_experiment(name) for name in ("a", "b")]
    silent = [_silent_run(client, experiments[i % 2], time.time() - 600 - i) for i in range(30)]
    heard = {run_id: _heartbeat(client, run_id) for run_id in silent}
    live = _silent_run(client, experiments[0], time.time())

    # when two reapers (two machines' cron jobs) reap the store at the same moment
    start = threading.Barrier(2)
    results: list[list[reaper.Reaped]] = [[], []]
    errors: list[BaseException] = []

    def reap(index: int) -> None:
        try:
            own = MlflowClient(mlflow_store)
            start.wait()
            results[index] = reaper.reap(own, stale_after=300)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reap, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then every silent run is ended KILLED at its own last heartbeat, with one reason;
    # the live run is left; together they reported each silent run, and nothing else
    assert errors == []
    assert {r.run_id for result in results for r in result} == set(heard)
    for run_id, last in heard.items():
        run = client.get_run(run_id)
        assert (run.info.status, run.info.end_time) == ("KILLED", last)
        assert run.data.tags[reaper.REAPED].startswith("ended KILLED by the reaper")
    assert client.get_run(live).info.status == "RUNNING"
    # and a reaper after them finds nothing left
    assert reaper.reap(client, stale_after=300) == []


def test_a_reaped_run_whose_job_comes_back_keeps_its_values_and_ends_with_the_jobs_status(
    mlflow_store: str,
) -> None:
    # given a live job's run, reaped as if its job had been silent for an hour (a frozen VM)
    service = _service(mlflow_store, heartbeat=HOUR)
    with service:
        client = service.client()
        with service.run_context(RunConfig(name="frozen", log_system_metrics=False)) as run:
            service.log_metrics({"loss": 1.0}, step=0)
            reaped = reaper.reap(client, stale_after=60, now=time.time() + HOUR)
            assert [r.run_id for r in reaped] == [run.info.run_id]
            assert client.get_run(run.info.run_id).info.status == "KILLED"
            # when the job comes back: it logs on and its block ends normally
            service.log_metrics({"loss": 0.5}, step=1)
            service.log_params({"depth": 3})

    # then the values logged after the reap landed, and the job's own status won
    stored = client.get_run(run.info.run_id)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]
    assert stored.data.params == {"depth": "3"}
    assert stored.info.status == "FINISHED"
    assert stored.info.end_time > reaped[0].last_heard.timestamp() * 1000
    # and its tags say both what the reaper did and that the job came back
    assert stored.data.tags[reaper.REAPED].startswith("ended KILLED by the reaper")
    returned = stored.data.tags[reaper.RETURNED]
    assert returned.startswith("its job came back after the reaper ended it, and ended it FINISHED")


def test_a_run_that_was_never_reaped_gets_no_return_tag(mlflow_store: str) -> None:
    service = _service(mlflow_store, heartbeat=HOUR)
    with service, service.run_context(RunConfig(name="plain", log_system_metrics=False)) as run:
        pass

    tags = service.client().get_run(run.info.run_id).data.tags
    assert reaper.RETURNED not in tags and reaper.REAPED not in tags


# %% a job killed with SIGKILL, reaped by the command


def reap_command(cwd: Path, store: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``regression-model-template reap ARGS`` as a user runs it, configured by the environment."""
    from regression_model_template.testing import clean_environ

    return subprocess.run(
        [sys.executable, "-m", "regression_model_template", "reap", *args],
        cwd=cwd,
        env=clean_environ(MLFLOW_TRACKING_URI=store),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120.0,  # measured: 3-5 s
        check=False,
    )


KILLED_JOB = """
service = MlflowService(
    tracking_uri=store, spool_dir=spool_dir, experiment_name="children", autolog_disable=True,
    flush_interval=0.05, heartbeat_interval=0.1,
)
with service, service.run_context(RunConfig(name="lost", log_system_metrics=False)) as run:
    with open(progress, "w") as out:
        out.write(run.info.run_id + "\\n")
        out.flush()
        step = 0
        while True:
            service.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            step += 1
            time.sleep(0.01)
"""


def kill_a_job_mid_run(tmp_path: Path, store: str) -> tuple[str, int]:
    """Run a job that beats every 0.1 s, kill it with SIGKILL once it has beaten; its run, heard."""
    client = MlflowClient(store)
    with child_job(tmp_path, "lost", KILLED_JOB, store, tmp_path / "spool") as (process, progress):
        log = tmp_path / "lost.log"
        wait_until(lambda: len(whole_lines(progress)) >= 1, process, "its run started", log)
        run_id = whole_lines(progress)[0]
        first = _heartbeat(client, run_id)
        wait_until(lambda: _heartbeat(client, run_id) > first, process, "a heartbeat", log)
        process.kill()  # the machine is gone: nothing of the job runs any more
        process.wait()
    return run_id, _heartbeat(client, run_id)


def test_reap_command_ends_the_run_of_a_job_killed_with_sigkill(
    tmp_path: Path, mlflow_store: str
) -> None:
    # given a job killed mid-run (its run RUNNING), and a plain MLflow run left RUNNING
    run_id, heard = kill_a_job_mid_run(tmp_path, mlflow_store)
    client = MlflowClient(mlflow_store)
    plain = client.create_run("0", start_time=0).info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    eventually(lambda: time.time() * 1000 - heard > 2_000, "its heartbeat older than 2 s")

    # when `reap --stale-after 2` runs
    result = reap_command(tmp_path, mlflow_store, "--stale-after", "2")

    # then the job's run is ended KILLED at its last heartbeat, in one line; exit 0
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith(f"reaped run {run_id} (experiment children): KILLED, last heard ")
    run = client.get_run(run_id)
    assert (run.info.status, run.info.end_time) == ("KILLED", heard)
    assert client.get_run(plain).info.status == "RUNNING"  # no heartbeat: not ours to end

    # and run again, it finds nothing to reap and says so
    again = reap_command(tmp_path, mlflow_store, "--stale-after", "2")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("nothing to reap: every RUNNING run with a heartbeat was heard")
