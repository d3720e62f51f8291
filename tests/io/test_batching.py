"""Buffered metric logging: every value lands, in the right run, whatever ends the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import typing as T
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from regression_model_template.io.batching import BatchWriter
from regression_model_template.io.services import MlflowService, ServiceError
from tests.conftest import LogCapture, Receiver

RunConfig = MlflowService.RunConfig


@pytest.fixture
def service(mlflow_store: str) -> T.Iterator[MlflowService]:
    service = MlflowService(
        tracking_uri=mlflow_store,
        experiment_name="batching",
        autolog_disable=True,
        flush_interval=0.2,
    )
    with service:
        yield service


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _status(client: MlflowClient, run_id: str) -> str:
    return str(client.get_run(run_id).info.status)


def test_values_land_in_the_run_that_was_active_when_logged(service: MlflowService) -> None:
    with service.run_context(RunConfig(name="outer", log_system_metrics=False)) as outer:
        service.log_metrics({"loss": 1.0}, step=0)
        with service.run_context(RunConfig(name="inner", log_system_metrics=False)) as inner:
            service.log_metrics({"loss": 2.0}, step=0)
            service.log_params({"depth": 3})
        service.log_metrics({"loss": 0.5}, step=1)

    client = service.client()
    assert _history(client, outer.info.run_id, "loss") == [(0, 1.0), (1, 0.5)]
    assert _history(client, inner.info.run_id, "loss") == [(0, 2.0)]
    assert client.get_run(inner.info.run_id).data.params == {"depth": "3"}
    assert _status(client, outer.info.run_id) == "FINISHED"


def test_many_threads_at_once_lose_nothing(service: MlflowService) -> None:
    def work(thread: int) -> None:
        for step in range(250):
            service.log_metrics({f"t{thread}": float(step)}, step=step)

    with service.run_context(RunConfig(name="threads", log_system_metrics=False)) as run:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    client = service.client()
    for i in range(8):
        assert len(_history(client, run.info.run_id, f"t{i}")) == 250


@pytest.mark.parametrize(
    ("error", "status"), [(ValueError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_a_run_ended_by_an_exception_keeps_every_value(
    service: MlflowService, error: BaseException, status: str
) -> None:
    with (
        pytest.raises(type(error)),
        service.run_context(RunConfig(name="raises", log_system_metrics=False)) as run,
    ):
        for step in range(2000):
            service.log_metrics({"loss": float(step)}, step=step)
        raise error

    client = service.client()
    assert len(_history(client, run.info.run_id, "loss")) == 2000
    assert _status(client, run.info.run_id) == status


def test_logging_outside_a_run_or_a_started_service_is_an_error(mlflow_store: str) -> None:
    service = MlflowService(tracking_uri=mlflow_store, autolog_disable=True)
    with pytest.raises(ServiceError, match="not started"):
        service.log_metrics({"loss": 1.0})
    with service, pytest.raises(ServiceError, match="no active run"):
        service.log_metrics({"loss": 1.0})


def test_stop_writes_what_is_buffered(mlflow_store: str) -> None:
    service = MlflowService(tracking_uri=mlflow_store, autolog_disable=True, flush_interval=60)
    client = service.client()
    run_id = client.create_run(client.create_experiment("stop")).info.run_id
    service.start()
    writer = service._started().writer
    writer.log_metrics(run_id, {"loss": 1.0}, step=0)
    assert writer.pending == 1  # the interval is long: still buffered

    service.stop()

    assert _history(client, run_id, "loss") == [(0, 1.0)]


def test_memory_stays_bounded_however_long_the_backlog(mlflow_store: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("bounded")).info.run_id
    writer = BatchWriter(client, tmp_path, interval=10)
    most = 0
    for step in range(1500):
        writer.log_metrics(run_id, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}, step=step)
        most = max(most, writer.buffered)
    writer.close()

    assert most <= 1000 + 4
    assert len(client.get_metric_history(run_id, "e")) == 1500


_CHILD = """
import os, signal, sys
import mlflow
from regression_model_template.io.services import MlflowService
service = MlflowService(tracking_uri=sys.argv[1], autolog_disable=True, flush_interval=60)
service.start()
{body}
"""


def _child(tmp_path: Path, uri: str, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(body=textwrap.dedent(body)))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    return subprocess.run(
        [sys.executable, str(script), uri], capture_output=True, text=True, env=env, timeout=120
    )


def _only_run(uri: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("regression_model_template")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0].info.run_id


def test_sigterm_flushes_and_ends_the_run_killed(tmp_path: Path, mlflow_store: str) -> None:
    result = _child(
        tmp_path,
        mlflow_store,
        """
        with service.run_context(MlflowService.RunConfig(name="term")):
            for step in range(2000):
                service.log_metrics({"loss": float(step)}, step=step)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the job")
        """,
    )

    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    client, run_id = _only_run(mlflow_store)
    assert len(client.get_metric_history(run_id, "loss")) == 2000
    assert _status(client, run_id) == "KILLED"


# 500 values wait for the exit hook whole (under one batch, and the interval is 60 s): the
# write happens during interpreter shutdown, where Python 3.12 refuses to start a thread.
@pytest.mark.parametrize("count", [500, 2000])
def test_normal_interpreter_exit_writes_what_is_buffered(
    tmp_path: Path, mlflow_store: str, count: int
) -> None:
    result = _child(
        tmp_path,
        mlflow_store,
        f"""
        mlflow.start_run()  # never ended, and the service is never stopped
        for step in range({count}):
            service.log_metrics({{"loss": float(step)}}, step=step)
        """,
    )

    assert result.returncode == 0, result.stderr
    client, run_id = _only_run(mlflow_store)
    assert len(client.get_metric_history(run_id, "loss")) == count
    assert result.stderr.count("Traceback") == 0, result.stderr
    assert "not written" not in result.stdout, result.stdout


def test_a_store_slow_to_answer_is_warned_once_and_its_return_said(
    receiver: Receiver, tmp_path: Path, captured_logs: LogCapture
) -> None:
    # given a tracking server that takes 1.5 s to answer each write (MLflow retrying inside)
    receiver.delay = 1.5
    client = MlflowClient(f"http://127.0.0.1:{receiver.port}")
    writer = BatchWriter(client, tmp_path, slow_after=0.3, interval=0.05)

    # when values are logged and flushed
    started = time.monotonic()
    writer.log_metrics("0123456789abcdef", {"loss": 1.0})
    logged = time.monotonic() - started
    writer.close()

    # then the caller did not wait, one warning said the store was not answering and how many
    # values wait, and one line said when it was back
    assert logged < receiver.delay
    assert receiver.requests[0].path.endswith("/runs/log-batch")
    [warning] = captured_logs.messages("WARNING")
    assert "cannot be reached (no answer for 0.3 s" in warning and "1 values wait" in warning
    assert any("reachable again" in m for m in captured_logs.messages("INFO"))
