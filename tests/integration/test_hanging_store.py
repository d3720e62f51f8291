"""A tracking store that hangs: connections accepted, never answered (partition, wedged server).

The session's ``mlflow server`` sits behind the recording proxy, which the tests make hang
(:meth:`RecordingProxy.hang`) and release. The jobs are child processes: what a user would see is
how long the process takes to exit, its exit code and its message, and what the store holds.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import child_job, recover_command, run_log, wait_until, whole_lines
from tests.integration.recording_proxy import RecordingProxy
from tests.integration.test_server import client_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

HANG = 5.0  # seconds the store hangs mid-run
END_TIMEOUT = 3.0
# The user's MLflow HTTP settings: 10 minutes per request, 10 retries (MLflow refuses more).
PATIENT_HTTP = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "600", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10"}
# The end of a run must not wait on those: end_timeout and a few seconds, far below 600 s.
EXIT_WITHIN = 30.0

_LOGS_UNTIL_TOLD = """
import os, time
with service, service.run_context(RunConfig(name="hang-mid-run", log_system_metrics=False)) as run:
    with open(progress, "w") as out:
        out.write(run.info.run_id + "\\n")
    worst, step = 0.0, 0
    while not os.path.exists(progress + ".stop"):
        started = time.perf_counter()
        service.log_metrics({"loss": step / 7}, step=step)
        worst = max(worst, time.perf_counter() - started)
        step += 1
        if step % 50 == 0:  # a training step between two bursts of values
            with open(progress, "a") as out:
                out.write(f"{step}\\n")
            time.sleep(0.01)
with open(progress, "a") as out:
    out.write(f"done {step} {worst}\\n")
"""


def test_a_hang_mid_run_stalls_no_call_and_loses_nothing(
    recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    # given a job logging steps at full speed through a store that answers
    spool_dir = tmp_path / "spool"
    with child_job(tmp_path, "mid-run", _LOGS_UNTIL_TOLD, recording_proxy.url, spool_dir) as (
        job,
        progress,
    ):
        log = tmp_path / "mid-run.log"
        wait_until(lambda: len(whole_lines(progress)) >= 2, job, "logging", log)
        run_id = whole_lines(progress)[0]
        recording_proxy.wait_until(lambda proxy: len(proxy.metrics(run_id)) > 0, 60.0)

        # when the store hangs for a while (the writer's calls are held), then answers again
        recording_proxy.hang()
        recording_proxy.wait_until(lambda proxy: proxy.hung > 0, 60.0)
        logged_at_hang = len(whole_lines(progress))
        time.sleep(HANG)
        logged_during_hang = len(whole_lines(progress)) - logged_at_hang
        recording_proxy.release()
        Path(f"{progress}.stop").touch()
        assert job.wait(120.0) == 0, log.read_text()

    # then the loop went on during the hang, no call waited for the store, nothing was lost
    *_, done = whole_lines(progress)
    _, steps, worst = done.split()
    assert logged_during_hang > 0
    assert float(worst) < HANG / 10, f"worst log_metrics call {float(worst):.3f} s"
    client = client_for(recording_proxy.url)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert Counter(history) == Counter((s, s / 7) for s in range(int(steps)))
    assert client.get_run(run_id).info.status == "FINISHED"


_ENDS_IN_A_HANG = """
import os, sys
os.environ.update({patient})
service = MlflowService(
    tracking_uri=store, spool_dir=spool_dir, experiment_name="children", autolog_disable=True,
    flush_interval=0.05, end_timeout={end_timeout},
)
with service, service.run_context(RunConfig(name="hang-at-end", log_system_metrics=False)) as run:
    with open(progress, "w") as out:
        out.write(run.info.run_id + "\\n")
    service.log_params({{"alpha": 0.5}})
    for step in range(500):
        service.log_metrics({{"loss": step / 7}}, step=step)
    print("the last epoch of the job")
    with open(progress, "a") as out:
        out.write("logged\\n")
    sys.stdin.readline()  # the test makes the store hang
    for step in range(500, {steps}):
        service.log_metrics({{"loss": step / 7}}, step=step)
"""


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(1000, id="values-waiting"),  # the hang catches values on their way
        pytest.param(500, id="values-written"),  # the hang comes after the last values landed
    ],
)
def test_a_run_ending_while_the_store_hangs_exits_soon_and_recover_sends_it(
    recording_proxy: RecordingProxy, tmp_path: Path, steps: int
) -> None:
    # given a job with patient MLflow HTTP settings and end_timeout 3 s, logging to a store
    spool_dir = tmp_path / "spool"
    body = _ENDS_IN_A_HANG.format(patient=PATIENT_HTTP, end_timeout=END_TIMEOUT, steps=steps)
    log = tmp_path / "at-end.log"
    with child_job(tmp_path, "at-end", body, recording_proxy.url, spool_dir) as (job, progress):
        wait_until(lambda: "logged" in whole_lines(progress), job, "its values", log)
        run_id = whole_lines(progress)[0]
        if steps == 500:
            recording_proxy.wait_until(lambda proxy: len(proxy.metrics(run_id)) == 500, 60.0)

        # when the store hangs and the job's run ends
        recording_proxy.hang()
        hung_at = time.monotonic()
        assert job.stdin is not None
        job.stdin.write(b"go\n")
        job.stdin.flush()
        try:
            code = job.wait(EXIT_WITHIN * 2)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {EXIT_WITHIN * 2:g} s after the store hung")
        exited_after = time.monotonic() - hung_at

    # then it exits within end_timeout and a few seconds, saying why and what to run
    output = log.read_text()
    assert exited_after < EXIT_WITHIN, f"exited {exited_after:.1f} s after the hang"
    assert code != 0, output
    message = next(line for line in output.splitlines() if "ServiceError: " in line)
    assert "MlflowService.end_timeout" in message
    assert f"within {END_TIMEOUT:g} s" in message
    assert "regression-model-template recover" in message
    assert (spool_dir / run_id).is_dir()

    # and when the store answers again (the held requests never reached it), `recover` sends it
    recording_proxy.release(drop=True)
    result = recover_command(tmp_path, recording_proxy.url, spool_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    client = client_for(recording_proxy.url)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert Counter(history) == Counter((s, s / 7) for s in range(steps))
    assert recording_proxy.duplicates(run_id) == {}
    stored = client.get_run(run_id)
    assert stored.data.params == {"alpha": "0.5"}
    assert stored.info.status == "FINISHED"
    text = run_log(client, run_id, tmp_path)
    assert text is not None and "the last epoch of the job" in text
    assert not (spool_dir / run_id).exists()
