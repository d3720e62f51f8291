"""A tracking server that goes away: the training loop never waits, and nothing is lost.

One real ``mlflow server`` on 127.0.0.1 serves the module; the tests stop it and start it again
on the same port with the same store, as after an outage. Each test writes to its own
experiment and spools into its own ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
import typing as T
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from regression_model_template.io.masking import mask_uri
from regression_model_template.io.services import MlflowService, ServiceError
from regression_model_template.io.spool import RunSpool
from regression_model_template.testing import (
    clean_environ,
    free_port,
    local_mlflow_server,
    mlflow_globals_restored,
)
from tests.conftest import recover_command
from tests.integration.test_server import explain, secret_forms

if T.TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.server, pytest.mark.slow]

RunConfig = MlflowService.RunConfig
OUTAGE = 20.0  # seconds the server is down (then ~10 s more until it answers again)
LONGEST_CALL = 0.5  # seconds: the benchmark's goal is 50 ms; this machine is noisy, 2 cores
SECRET = "s3cret-Pa55"
COMMAND_TIMEOUT = 120.0


@dataclass
class RestartableServer:
    """A real ``mlflow server`` that can be stopped and started again on the same port."""

    root: Path
    port: int = field(default_factory=free_port)
    _running: contextlib.ExitStack | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self._running is None:
            running = contextlib.ExitStack()
            running.enter_context(local_mlflow_server(self.root, port=self.port))
            self._running = running

    def stop(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            running.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableServer]:
    server = RestartableServer(tmp_path_factory.mktemp("outage-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def up(server: RestartableServer) -> RestartableServer:
    """The module's server, running (a failed test may have left it stopped)."""
    server.start()
    return server


@pytest.fixture(autouse=True)
def _restore_mlflow() -> Iterator[None]:
    with mlflow_globals_restored():
        yield


def _client(url: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def test_an_outage_while_logging_stalls_nothing_and_loses_nothing(
    up: RestartableServer, tmp_path: Path
) -> None:
    # given a job (in a thread of its own) logging in bursts at full speed into a server
    service = MlflowService(
        tracking_uri=up.url,
        experiment_name="outage-while-logging",
        spool_dir=str(tmp_path / "spool"),
        autolog_disable=True,
        flush_interval=0.2,
        end_timeout=180,  # room for MLflow's own HTTP retries to reach the server again
    )
    durations: list[float] = []
    run_ids: list[str] = []
    failures: list[BaseException] = []
    logged = 0
    stop_logging = threading.Event()

    def job() -> None:
        nonlocal logged
        try:
            with (
                service,
                service.run_context(RunConfig(name="outage", log_system_metrics=False)) as run,
            ):
                run_ids.append(run.info.run_id)
                while not stop_logging.is_set():
                    for _ in range(50):
                        started = time.perf_counter()
                        service.log_metrics({"loss": logged / 7}, step=logged)
                        durations.append(time.perf_counter() - started)
                        logged += 1
                    time.sleep(0.1)  # the training step between two bursts of values
        except BaseException as error:  # re-raised in the test's thread
            failures.append(error)

    # (the server is stopped and started from the test's thread: local_mlflow_server's child
    # gets SIGTERM when the thread that started it ends)
    training = threading.Thread(target=job, name="training")
    training.start()
    time.sleep(2)

    # when the server stops for 20 s, then comes back on the same port
    went_away = time.monotonic()
    up.stop()
    time.sleep(OUTAGE)
    up.start()
    back = time.monotonic()
    time.sleep(2)
    stop_logging.set()
    training.join(240)
    ended = time.monotonic()

    # then no log_metrics call waited for the server, every value landed once, run FINISHED
    assert not training.is_alive()
    assert failures == []
    (run_id,) = run_ids
    client = _client(up.url)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert Counter(history) == Counter((s, s / 7) for s in range(logged))
    assert client.get_run(run_id).info.status == "FINISHED"
    slowest = sorted(durations)[-5:]
    assert max(durations) < LONGEST_CALL, f"slowest calls: {slowest} of {len(durations)}"
    sys.stderr.write(
        f"\n{logged} values, slowest calls {[f'{d * 1000:.1f} ms' for d in slowest]}, "
        f"outage {back - went_away:.1f} s, end of run {ended - back - 2:.1f} s\n"
    )


_ENDS_IN_AN_OUTAGE = """
import json, sys, time
from pathlib import Path
from regression_model_template.io.masking import mask_uri
from regression_model_template.io.services import MlflowService, ServiceError
from regression_model_template.io.spool import RunSpool
uri, spool_dir, end_timeout, folder = sys.argv[1:5]
end_timeout, folder = float(end_timeout), Path(folder)
service = MlflowService(
    tracking_uri=uri, experiment_name="outage-at-the-end", spool_dir=spool_dir,
    autolog_disable=True, flush_interval=0.1, end_timeout=end_timeout,
)
report = {}
with service:
    try:
        with service.run_context(
            MlflowService.RunConfig(name="ends-in-outage", log_system_metrics=False)
        ) as run:
            report["run_id"] = run.info.run_id
            service.log_params({"alpha": 0.5})
            for step in range(1000):
                service.log_metrics({"loss": step / 7}, step=step)
            (folder / "logged").write_text(run.info.run_id)
            while not (folder / "server-stopped").exists():  # the test stops the server
                time.sleep(0.02)
            for step in range(1000, 2000):
                service.log_metrics({"loss": step / 7}, step=step)
            returned = time.monotonic()
    except ServiceError as error:
        report.update(waited=time.monotonic() - returned, error=str(error))
(folder / "report.json").write_text(json.dumps(report))
"""


def _wait_for(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + COMMAND_TIMEOUT
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the job exited ({process.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the job wrote no {path.name} within {COMMAND_TIMEOUT:g} s")
        time.sleep(0.05)


def test_a_run_ending_in_an_outage_is_sent_later_by_recover(
    up: RestartableServer, tmp_path: Path
) -> None:
    # given a job (a child process) logging to a server reached with a password (the server
    # accepts and ignores basic auth)
    uri = up.url.replace("http://", f"http://user:{SECRET}@")
    spool_dir = tmp_path / "spool"
    end_timeout = 3.0
    script = tmp_path / "job.py"
    script.write_text(_ENDS_IN_AN_OUTAGE)
    log = tmp_path / "job.log"
    with log.open("wb") as output:
        job = subprocess.Popen(
            [sys.executable, str(script), uri, str(spool_dir), str(end_timeout), str(tmp_path)],
            cwd=tmp_path,
            env=clean_environ(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(tmp_path / "logged", job, log)
        time.sleep(1.0)  # some values reach the server

        # when the server goes away, the job logs more values and its run's block returns
        up.stop()
        (tmp_path / "server-stopped").touch()
        assert job.wait(COMMAND_TIMEOUT) == 0, log.read_text()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    report = json.loads((tmp_path / "report.json").read_text())

    # then run_context raised within end_timeout, naming the spool folder and the command
    run_id = report["run_id"]
    folder = spool_dir / run_id
    message = report.get("error", "no ServiceError")
    assert report.get("waited", 0) < end_timeout + 10, report
    assert message.startswith("MlflowService.end_timeout: "), message
    assert f"run {run_id} ended FINISHED" in message
    assert str(folder) in message
    assert "regression-model-template recover" in message
    assert SECRET not in message
    assert folder.is_dir()
    for path in folder.iterdir():  # the spool names its store without the password
        assert SECRET.encode() not in path.read_bytes(), path

    # and when the server is back, `recover` with the same configuration sends the rest
    up.start()
    result = recover_command(tmp_path, uri, spool_dir)

    # then every value landed once, and the run has the status its block recorded
    assert result.returncode == 0, explain(result)
    runs = [line for line in result.stdout.splitlines() if line.startswith("run ")]
    assert len(runs) == 1, explain(result)
    assert re.fullmatch(rf"run {run_id}: \d+ value\(s\) sent, ended FINISHED", runs[0])
    client = _client(up.url)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert Counter(history) == Counter((s, s / 7) for s in range(2000))
    stored = client.get_run(run_id)
    assert stored.data.params == {"alpha": "0.5"}
    assert stored.info.status == "FINISHED"
    assert not folder.exists()
    again = recover_command(tmp_path, uri, spool_dir)
    assert (again.returncode, again.stdout) == (0, "nothing to recover for this store\n")


# %% found while writing these tests (fixed, but for the known limit marked xfail)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="known limit: a writer thread inside MLflow's own HTTP retries (minutes against a "
    "server that is down) cannot be interrupted; stop() leaves it behind as a daemon thread. "
    "It sends nothing more once that call returns, and a spool folder removed by `recover` "
    "meanwhile no longer crashes it (it used to die with a FileNotFoundError traceback)",
)
def test_stop_stops_the_writer_while_the_server_is_down(
    up: RestartableServer, tmp_path: Path
) -> None:
    # given a run whose block returns while the server is down
    service = MlflowService(
        tracking_uri=up.url,
        experiment_name="outage-stop",
        spool_dir=str(tmp_path / "spool"),
        autolog_disable=True,
        flush_interval=0.1,
        end_timeout=1,
    )
    before = set(threading.enumerate())
    with (
        service,
        pytest.raises(ServiceError, match="end_timeout"),
        service.run_context(RunConfig(name="stop", log_system_metrics=False)),
    ):
        for step in range(100):
            service.log_metrics({"loss": float(step)}, step=step)
        up.stop()
        for step in range(100, 200):
            service.log_metrics({"loss": float(step)}, step=step)

    # when the service has stopped, then its writer thread is gone
    time.sleep(1.0)
    writers = [
        thread
        for thread in threading.enumerate()
        if thread not in before and thread.name == "mlflow-batch-writer"
    ]
    assert writers == []


@pytest.mark.parametrize("recover_with", ["command", "start"])
def test_recovery_never_prints_the_credentials(
    up: RestartableServer,
    tmp_path: Path,
    recover_with: str,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    # given what a job killed mid-run left for a server reached with a password
    uri = up.url.replace("http://", f"http://user:{SECRET}@")
    client = _client(up.url)
    experiment = client.get_experiment_by_name("recover-credentials")
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment("recover-credentials")
    )
    run_id = client.create_run(experiment_id).info.run_id
    spool_dir = tmp_path / "spool"
    spool = RunSpool.create(spool_dir, run_id, mask_uri(uri))
    spool.append({"m": [["loss", 0.5, 1_700_000_000_000, 1]]})
    spool.close(remove=False)

    # when it is recovered, by the command or by a service's start()
    if recover_with == "command":
        result = recover_command(tmp_path, uri, spool_dir)
        assert result.returncode == 0, explain(result)
        printed = result.stdout + result.stderr
    else:
        service = MlflowService(
            tracking_uri=uri, spool_dir=str(spool_dir), experiment_name="recover-credentials"
        )
        capfd.readouterr()
        with service:
            pass
        captured = capfd.readouterr()
        printed = captured.out + captured.err

    # then it was sent, and nothing printed holds the password
    assert client.get_run(run_id).info.status == "KILLED"
    assert not (spool_dir / run_id).exists()
    for form in secret_forms(SECRET):
        assert form not in printed, printed


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(f"{url}/health", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_a_server_started_from_a_helper_thread_keeps_running(tmp_path: Path) -> None:
    # given a server started by a thread that then ends (its context is still open)
    running = contextlib.ExitStack()
    urls: list[str] = []
    starter = threading.Thread(
        target=lambda: urls.append(running.enter_context(local_mlflow_server(tmp_path)))
    )
    try:
        starter.start()
        starter.join(COMMAND_TIMEOUT)
        (url,) = urls

        # when a moment has passed, then it still answers
        time.sleep(2.0)
        assert _answers(url)
    finally:
        running.close()
