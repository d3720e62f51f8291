"""Every logged value reaches the tracking server exactly once; uploads really run in parallel.

MLflow's SQL stores ignore an exact duplicate in ``log_batch``: reading a run's history back
cannot show a value sent twice. These tests count what the server *receives*, with a recording
proxy in front of the session's ``mlflow server`` (:mod:`tests.integration.recording_proxy`).

Each scenario is built so that no acknowledgement is ever lost: the job is killed while its
next call is held at the proxy (the server never gets it), and a stopped server is resumed long
before any client timeout. A value received twice is then a bug of ours: a spool whose ``sent``
mark fell behind, or a batch sent again.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import typing as T
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from regression_model_template.io.services import MlflowService
from regression_model_template.testing import clean_environ, mlflow_globals_restored
from tests.conftest import recover_command
from tests.integration.recording_proxy import RecordingProxy
from tests.integration.test_server import client_for, explain

pytestmark = [pytest.mark.server, pytest.mark.slow]

WAIT = 120.0  # seconds any one step may take before the test fails (measured: 1-5 s)
OVERLAP_WAIT = 30.0  # seconds a call waits for company (measured: they come within ~10 ms)
STOPPED = 3.0  # seconds the server stays stopped: far below MLflow's 120 s request timeout

# A job as a user writes it: params, then two metrics per step, through the proxy. With
# `pause_at`, it stops after that many steps until the test creates the file `go`.
_JOB = """
import sys, time
from pathlib import Path
from regression_model_template.io.services import MlflowService
uri, spool_dir, folder, steps, pause_at = sys.argv[1:6]
folder, steps, pause_at = Path(folder), int(steps), int(pause_at)
service = MlflowService(
    tracking_uri=uri, experiment_name="exactly-once", spool_dir=spool_dir,
    autolog_disable=True, flush_interval=0.05, parallel_uploads=1,
)
with service, service.run_context(
    MlflowService.RunConfig(name="exactly-once", log_system_metrics=False)
) as run:
    (folder / "run_id").write_text(run.info.run_id)
    service.log_params({"alpha": 0.5})
    for step in range(steps):
        service.log_metrics({"loss": step / 7, "acc": step / (step + 1)}, step=step)
        if step + 1 == pause_at:
            (folder / "paused").touch()
            while not (folder / "go").exists():
                time.sleep(0.01)
"""


def _expected(steps: int) -> set[tuple[str, float, int]]:
    """(key, value, step) of every metric value the job logs in ``steps`` steps."""
    return {("loss", s / 7, s) for s in range(steps)} | {
        ("acc", s / (s + 1), s) for s in range(steps)
    }


def _received(proxy: RecordingProxy, run_id: str) -> list[tuple[str, float, int]]:
    return [(key, value, step) for _, key, value, _, step in proxy.metrics(run_id)]


def _assert_exactly_once(proxy: RecordingProxy, run_id: str, steps: int) -> None:
    """The server received each value of the job's ``steps`` steps once, and nothing else."""
    assert proxy.duplicates(run_id) == {}
    received = _received(proxy, run_id)
    assert len(received) == 2 * steps
    assert set(received) == _expected(steps)
    assert proxy.params(run_id) == [(run_id, "alpha", "0.5")]


@contextlib.contextmanager
def _job(proxy: RecordingProxy, folder: Path, steps: int, pause_at: int = 0) -> Iterator[Job]:
    """The job as a child process logging through the proxy; killed if still running at the end."""
    script = folder / "job.py"
    script.write_text(_JOB)
    log = folder / "job.log"
    spool_dir = folder / "spool"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                str(script),
                proxy.url,
                *map(str, (spool_dir, folder, steps, pause_at)),
            ],
            cwd=folder,
            env=clean_environ(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Job(process, folder, spool_dir, log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


class Job(T.NamedTuple):
    process: subprocess.Popen[bytes]
    folder: Path
    spool_dir: Path
    log: Path

    def wait_for(self, name: str) -> None:
        """Wait until the job creates the file ``name`` (fail if it exits first)."""
        deadline = time.monotonic() + WAIT
        while not (self.folder / name).exists():
            if self.process.poll() is not None:
                pytest.fail(f"the job exited ({self.process.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the job wrote no {name} within {WAIT:g} s:\n{self.output()}")
            time.sleep(0.02)

    def run_id(self) -> str:
        self.wait_for("run_id")
        return (self.folder / "run_id").read_text()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def test_a_normal_run_sends_each_value_once(
    recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    # given a job logging 2,000 steps of two metrics through the writer
    steps = 2000
    with _job(recording_proxy, tmp_path, steps) as job:
        # when it runs to its end
        assert job.process.wait(WAIT) == 0, job.output()
        run_id = job.run_id()

    # then the server received each value once, in several batches, and the run is FINISHED
    _assert_exactly_once(recording_proxy, run_id, steps)
    assert len(recording_proxy.calls()) >= 5  # at most 1,000 values per call
    client = client_for(recording_proxy.url)
    assert client.get_run(run_id).info.status == "FINISHED"
    stored = {(m.step, m.value) for m in client.get_metric_history(run_id, "loss")}
    assert stored == {(s, s / 7) for s in range(steps)}


def test_a_job_killed_then_recovered_sends_each_value_once(
    recording_proxy: RecordingProxy, tmp_path: Path
) -> None:
    # given a job that logged 2,000 steps; the server took its first calls, and the first call
    # to come once it has 500 values is held at the proxy (no acknowledgement is lost in the
    # kill: with one upload at a time, every earlier call was acknowledged and marked sent)
    steps = 2000
    held = recording_proxy.hold_call(lambda proxy: len(proxy.metrics()) >= 500)
    with _job(recording_proxy, tmp_path, steps, pause_at=steps) as job:
        run_id = job.run_id()
        job.wait_for("paused")
        held.wait(WAIT)
        before = len(recording_proxy.metrics(run_id))
        assert 0 < before < 2 * steps  # some values were sent, most wait in the spool

        # when it is killed with SIGKILL, the held call never reaching the server
        os.kill(job.process.pid, signal.SIGKILL)
        assert job.process.wait(WAIT) == -signal.SIGKILL
        held.drop()

        # and `recover` is run with the same configuration (through the proxy too)
        result = recover_command(tmp_path, recording_proxy.url, job.spool_dir)

    # then the server received each value once over both processes, and the run is KILLED
    assert result.returncode == 0, explain(result)
    _assert_exactly_once(recording_proxy, run_id, steps)
    sent = 2 * steps - before  # the rest of the metrics (the param went in the first call)
    assert re.fullmatch(rf"run {run_id}: {sent} value\(s\) sent, .*ended KILLED\n", result.stdout)
    assert client_for(recording_proxy.url).get_run(run_id).info.status == "KILLED"


def test_a_server_stopped_mid_run_gets_each_value_once(
    recording_proxy: RecordingProxy, mlflow_server: str, tmp_path: Path
) -> None:
    # given a job half-way through 2,000 steps, whose first half the server has taken
    steps = 2000
    with _job(recording_proxy, tmp_path, steps, pause_at=steps // 2) as job:
        run_id = job.run_id()
        job.wait_for("paused")
        recording_proxy.wait_until(
            lambda proxy: len(proxy.metrics(run_id)) >= steps and proxy.in_flight == 0, WAIT
        )

        # when the server stops (SIGSTOP: it takes connections and never answers) while the
        # job logs the second half, and comes back a few seconds later
        calls = len(recording_proxy.calls())
        with _stopped(mlflow_server):
            (tmp_path / "go").touch()
            recording_proxy.wait_until(lambda proxy: len(proxy.calls()) > calls, WAIT)
            waiting = recording_proxy.calls()[calls]
            time.sleep(STOPPED)  # the outage: the call waits at the stopped server
            assert waiting.status is None  # it was still unanswered: the server was stopped
        assert job.process.wait(WAIT) == 0, job.output()

    # then the server received each value once, and the run is FINISHED
    _assert_exactly_once(recording_proxy, run_id, steps)
    assert client_for(recording_proxy.url).get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("uploads", [1, 3])
def test_uploads_overlap_at_the_server_as_many_as_set(
    recording_proxy: RecordingProxy, tmp_path: Path, uploads: int
) -> None:
    # given a job with `parallel_uploads` set, and a proxy holding each log-batch call until
    # `uploads` calls (at least 2) are at the server at once; with 1 upload at a time that
    # never happens, and each call goes on after 1 s: the chance given to an overlap that
    # must not happen. With more, a call that finds no company within OVERLAP_WAIT goes on
    # alone, and the test fails.
    service = MlflowService(
        tracking_uri=recording_proxy.url,
        experiment_name="parallel-uploads",
        spool_dir=str(tmp_path / "spool"),
        autolog_disable=True,
        flush_interval=0.05,
        parallel_uploads=uploads,
    )
    values = 3000  # one record: a batch of three log-batch calls of 1,000
    with (
        mlflow_globals_restored(),
        service,
        service.run_context(
            MlflowService.RunConfig(name="overlap", log_system_metrics=False)
        ) as run,
    ):
        recording_proxy.hold_until_in_flight(max(uploads, 2), OVERLAP_WAIT if uploads > 1 else 1.0)
        recording_proxy.reset_max_in_flight()

        # when it logs 3,000 values at once (per-layer statistics)
        service.log_metrics({f"layer_{i:04d}.grad_norm": i / 7 for i in range(values)}, step=1)
        run_id = run.info.run_id
        recording_proxy.wait_until(lambda proxy: len(proxy.metrics(run_id)) >= values, WAIT)
        recording_proxy.hold_until_in_flight(1, 0.0)

    # then as many calls as set were in flight at the server at once, each value sent once
    calls = [call for call in recording_proxy.calls() if call.run_id == run_id]
    spread = max(call.started for call in calls) - min(call.started for call in calls)
    sys.stderr.write(f"\n{len(calls)} calls came within {spread * 1000:.0f} ms\n")
    assert recording_proxy.max_in_flight == uploads
    assert recording_proxy.duplicates(run_id) == {}
    assert len(recording_proxy.metrics(run_id)) == values


@contextlib.contextmanager
def _stopped(url: str) -> Iterator[None]:
    """The ``mlflow server`` this process started on ``url``'s port, stopped (SIGSTOP) for
    the block, resumed (SIGCONT) after it, whatever happens."""
    group = _server_group(urllib.parse.urlsplit(url).port)
    os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(group, signal.SIGCONT)


def _server_group(port: int | None) -> int:
    """The process group of our child ``python -m mlflow server ... --port PORT``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent != os.getpid() or b"mlflow" not in args or b"--port" not in args:
            continue
        if args[args.index(b"--port") + 1] == str(port).encode():
            return os.getpgid(int(entry.name))
    raise LookupError(f"no mlflow server of this process listens on port {port}")
