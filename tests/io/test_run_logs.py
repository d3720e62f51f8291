"""Each run keeps its own log: ``run.log`` among its artifacts, whatever ends the run.

Real SQLite stores under ``tmp_path``, real loguru sinks, and child Python processes ended by
SIGTERM or SIGKILL for the crash paths.
"""

from __future__ import annotations

import json
import logging
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
from loguru import logger
from mlflow.tracking import MlflowClient

from regression_model_template.containers import Container, lifespan
from regression_model_template.io.services import LoggerService, MlflowService
from regression_model_template.testing import clean_environ
from tests.conftest import run_log

RunConfig = MlflowService.RunConfig
CHILD_TIMEOUT = 120.0


def _run_config(name: str) -> MlflowService.RunConfig:
    return RunConfig(name=name, log_system_metrics=False)


@pytest.fixture
def services(tmp_path: Path, mlflow_store: str) -> T.Iterator[tuple[LoggerService, MlflowService]]:
    """A LoggerService writing plain text to a file, and an MlflowService on SQLite."""
    logger_service = LoggerService(sink=str(tmp_path / "job.log"), format="{level} {message}")
    mlflow_service = MlflowService(
        tracking_uri=mlflow_store, autolog_disable=True, spool_dir=str(tmp_path / "spool")
    )
    mlflow_service.log_runs_like(logger_service.format, logger_service.level)
    with logger_service, mlflow_service:
        yield logger_service, mlflow_service


def test_a_failed_run_keeps_its_lines_and_the_traceback(
    tmp_path: Path, services: tuple[LoggerService, MlflowService]
) -> None:
    _, service = services
    # given a job that logs through loguru and the standard library, then raises
    with pytest.raises(ValueError, match="bad input"), service.run_context(_run_config("f")) as run:
        logger.info("loading the data")
        logging.getLogger("my_job").warning("3 rows dropped")
        logging.getLogger("mlflow.tracking").warning("a record of MLflow's")
        raise ValueError("bad input")

    # then the FAILED run has a run.log with the lines and the traceback
    client = service.client()
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    text = run_log(client, run.info.run_id, tmp_path)
    assert text is not None
    assert "INFO loading the data\n" in text
    assert "WARNING 3 rows dropped\n" in text
    assert "WARNING a record of MLflow's\n" in text
    assert "The run ended FAILED:\nTraceback (most recent call last):" in text
    assert text.rstrip().endswith("ValueError: bad input")
    # and the job's own log has the same lines: the run's log is a copy, not a diversion
    assert "INFO loading the data" in (tmp_path / "job.log").read_text()


def test_nested_runs_each_get_the_lines_written_while_innermost(
    tmp_path: Path, services: tuple[LoggerService, MlflowService]
) -> None:
    _, service = services
    with service.run_context(_run_config("outer")) as outer:
        logger.info("outer before")
        with service.run_context(_run_config("inner")) as inner:
            logger.info("inner")
            worker = threading.Thread(target=lambda: logger.info("from a worker thread"))
            worker.start()
            worker.join()
        logger.info("outer after")
    logger.info("after every run")

    client = service.client()
    assert client.get_run(outer.info.run_id).info.status == "FINISHED"
    outer_log = run_log(client, outer.info.run_id, tmp_path)
    inner_log = run_log(client, inner.info.run_id, tmp_path)
    assert outer_log == "INFO outer before\nINFO outer after\n"
    assert inner_log == "INFO inner\nINFO from a worker thread\n"


def test_json_records_carry_the_run_id_inside_a_run_only(tmp_path: Path, mlflow_store: str) -> None:
    sink = tmp_path / "job.jsonl"
    logger_service = LoggerService(sink=str(sink), serialize=True)
    service = MlflowService(
        tracking_uri=mlflow_store, autolog_disable=True, spool_dir=str(tmp_path / "spool")
    )
    with logger_service, service:
        logger.info("before")
        with service.run_context(_run_config("json")) as run:
            logger.info("inside")
            logging.getLogger("my_job").warning("stdlib inside")
        logger.info("after")

    records = [json.loads(line)["record"] for line in sink.read_text().splitlines()]
    run_ids = {r["message"]: r["extra"].get("mlflow_run_id") for r in records}
    assert run_ids["inside"] == run_ids["stdlib inside"] == run.info.run_id
    assert run_ids["before"] is None and run_ids["after"] is None
    # a JSON sink does not change the run's log: it is text in the logger's format
    text = run_log(service.client(), run.info.run_id, tmp_path)
    assert text is not None and "| INFO     | " in text and "- inside\n" in text


def test_a_patcher_of_the_application_keeps_working(tmp_path: Path, mlflow_store: str) -> None:
    seen: dict[str, dict[str, T.Any]] = {}
    logger.configure(patcher=lambda record: record["extra"].update(app="mine"))
    handler_id = logger.add(
        lambda message: seen.update({message.record["message"]: message.record["extra"]})
    )
    service = MlflowService(
        tracking_uri=mlflow_store, autolog_disable=True, spool_dir=str(tmp_path / "spool")
    )
    try:
        with service, service.run_context(_run_config("patched")) as run:
            logger.info("inside")
        logger.info("after")
    finally:
        logger.remove(handler_id)
        logger.configure(patcher=lambda record: None)

    assert seen["inside"] == {"app": "mine", "mlflow_run_id": run.info.run_id}
    assert seen["after"] == {"app": "mine"}


def test_capture_off_stores_no_log(tmp_path: Path, mlflow_store: str) -> None:
    service = MlflowService(
        tracking_uri=mlflow_store,
        autolog_disable=True,
        spool_dir=str(tmp_path / "spool"),
        capture_log=False,
    )
    with service, service.run_context(_run_config("off")) as run:
        logger.info("not kept")

    assert run_log(service.client(), run.info.run_id, tmp_path) is None
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_log_past_the_cap_keeps_its_head_and_tail(tmp_path: Path, mlflow_store: str) -> None:
    service = MlflowService(
        tracking_uri=mlflow_store,
        autolog_disable=True,
        spool_dir=str(tmp_path / "capped"),
        capture_log_max_bytes=10_000,
    )
    service.log_runs_like("{message}", "DEBUG")
    with service, service.run_context(_run_config("capped")) as run:
        for i in range(5_000):
            logger.info("line {:05d}", i)  # 11 bytes each: 55,000 in all

    text = run_log(service.client(), run.info.run_id, tmp_path)
    assert text is not None
    assert len(text.encode()) <= 10_000 + 200
    lines = text.splitlines()
    assert lines[0] == "line 00000" and lines[-1] == "line 04999"
    [marker] = [line for line in lines if not line.startswith("line ")]
    kept = len(lines) - 1
    assert f"({5_000 - kept:,} lines) cut" in marker
    assert "size cap of 10,000 bytes" in marker


def test_secrets_known_to_the_services_are_masked_in_the_log(
    tmp_path: Path, mlflow_store: str
) -> None:
    hook = "json://127.0.0.1:9/hook/t0kenABC123"
    registry = "http://bob:pa55w0rd@127.0.0.1:9"
    container = Container(
        config={
            "logger": {"sink": str(tmp_path / "job.log"), "format": "{message}"},
            "alerts": {"enable": False, "urls": [hook]},
            "mlflow": {
                "tracking_uri": mlflow_store,
                "registry_uri": registry,
                "autolog_disable": True,
                "spool_dir": str(tmp_path / "spool"),
            },
        },
        profile=False,
        environ={},
    )
    with lifespan(container):
        service = container.mlflow_service()
        with service.run_context(_run_config("secrets")) as run:
            logger.info("registry at {}, alerts to {}", registry, hook)

    text = run_log(service.client(), run.info.run_id, tmp_path)
    assert text is not None
    assert "pa55w0rd" not in text and "t0kenABC123" not in text
    assert "registry at http://bob:***@127.0.0.1:9" in text


def test_an_artifact_store_that_refuses_the_log_leaves_it_for_recover(
    tmp_path: Path, services: tuple[LoggerService, MlflowService], mlflow_store: str
) -> None:
    _, service = services
    client = service.client()
    experiment = client.get_experiment_by_name("regression_model_template")
    assert experiment is not None
    # given an artifact location that cannot be written (a file where its folder should be)
    blocker = tmp_path / "blocked"
    blocker.write_text("not a folder")
    experiment_id = client.create_experiment("blocked", artifact_location=str(blocker / "x"))
    service_blocked = MlflowService(
        tracking_uri=mlflow_store,
        experiment_name="blocked",
        autolog_disable=True,
        spool_dir=str(tmp_path / "spool-blocked"),
    )
    with service_blocked, service_blocked.run_context(_run_config("blocked")) as run:
        logger.info("worth keeping")

    # then the run ended as it should, and its log waits in the spool
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert client.get_run(run.info.run_id).info.experiment_id == experiment_id
    kept = tmp_path / "spool-blocked" / run.info.run_id / "run.log"
    assert "worth keeping" in kept.read_text()

    # when the artifact store is fixed, recover uploads it and says so
    blocker.unlink()
    [report] = service_blocked.recover()
    assert "its log uploaded" in report.summary()
    text = run_log(client, run.info.run_id, tmp_path)
    assert text is not None and "worth keeping" in text
    assert not kept.parent.exists()


# %% child processes: SIGTERM, SIGKILL

_CHILD = """
import logging, os, sys, time
from loguru import logger
from regression_model_template.io.services import LoggerService, MlflowService
logger_service = LoggerService(sink=sys.argv[3], format="{{level}} {{message}}")
service = MlflowService(tracking_uri=sys.argv[1], spool_dir=sys.argv[2], autolog_disable=True)
service.log_runs_like(logger_service.format, logger_service.level)
with logger_service, service:
    with service.run_context(MlflowService.RunConfig(name="child", log_system_metrics=False)):
{body}
"""


def _child(tmp_path: Path, store: str, body: str) -> subprocess.Popen[bytes]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(body=textwrap.indent(textwrap.dedent(body), " " * 8)))
    return subprocess.Popen(
        [sys.executable, str(script), store, str(tmp_path / "spool"), str(tmp_path / "job.log")],
        cwd=tmp_path,
        env=clean_environ(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "child.err").open("wb"),
    )


def _wait_for_line(tmp_path: Path, process: subprocess.Popen[bytes], line: str) -> None:
    log, deadline = tmp_path / "job.log", time.monotonic() + CHILD_TIMEOUT
    while not (log.exists() and line in log.read_text()):
        if process.poll() is not None:
            pytest.fail(f"the child exited: {(tmp_path / 'child.err').read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"the child did not log {line!r} within {CHILD_TIMEOUT:g} s")
        time.sleep(0.02)


def _only_run(store: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("regression_model_template")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    return client, run.info.run_id


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_with_its_log(tmp_path: Path, mlflow_store: str) -> None:
    process = _child(
        tmp_path,
        mlflow_store,
        """
        for i in range(3):
            logger.info("step {}", i)
        logger.info("waiting")
        time.sleep(CHILD_TIMEOUT)
        """.replace("CHILD_TIMEOUT", str(CHILD_TIMEOUT)),
    )
    try:
        _wait_for_line(tmp_path, process, "waiting")
        process.send_signal(signal.SIGTERM)
        assert process.wait(CHILD_TIMEOUT) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()

    client, run_id = _only_run(mlflow_store)
    assert client.get_run(run_id).info.status == "KILLED"
    text = run_log(client, run_id, tmp_path)
    assert text == "INFO step 0\nINFO step 1\nINFO step 2\nINFO waiting\n" + (
        "The run ended KILLED (Terminated)\n"
    )


@pytest.mark.slow
def test_after_kill_9_recover_uploads_the_log_up_to_the_kill(
    tmp_path: Path, mlflow_store: str
) -> None:
    process = _child(
        tmp_path,
        mlflow_store,
        """
        for i in range(200):
            logger.info("step {}", i)
        logging.getLogger("my_job").warning("last line before the kill")
        time.sleep(CHILD_TIMEOUT)
        """.replace("CHILD_TIMEOUT", str(CHILD_TIMEOUT)),
    )
    try:
        _wait_for_line(tmp_path, process, "last line before the kill")
        os.kill(process.pid, signal.SIGKILL)
        process.wait(CHILD_TIMEOUT)
    finally:
        process.kill()
        process.wait()
    client, run_id = _only_run(mlflow_store)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert run_log(client, run_id, tmp_path) is None

    result = subprocess.run(
        [sys.executable, "-m", "regression_model_template", "recover"],
        cwd=tmp_path,
        env=clean_environ(
            MLFLOW_TRACKING_URI=mlflow_store,
            RMT_MLFLOW__SPOOL_DIR=str(tmp_path / "spool"),
            RMT_ALERTS__ENABLE="false",
        ),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run {run_id}: 0 value(s) sent, its log uploaded (" in result.stdout
    assert client.get_run(run_id).info.status == "KILLED"
    text = run_log(client, run_id, tmp_path)
    expected = "".join(f"INFO step {i}\n" for i in range(200))
    assert text == expected + "WARNING last line before the kill\n"
