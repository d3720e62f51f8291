"""What is printed while a run is open lands in its ``run.log``, and still on the console.

Real SQLite stores under ``tmp_path``, real runs; the run's log is downloaded from the store.
The console is pytest's ``capsys``: the streams a test sees as ``sys.stdout``/``sys.stderr``.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import typing as T
from pathlib import Path

import pytest
from loguru import logger

from regression_model_template.io.services import LoggerService, MlflowService
from tests.conftest import run_log

RunConfig = MlflowService.RunConfig


def _run_config(name: str) -> MlflowService.RunConfig:
    return RunConfig(name=name, log_system_metrics=False)


def _service(tmp_path: Path, store: str, **settings: T.Any) -> MlflowService:
    service = MlflowService(
        tracking_uri=store, autolog_disable=True, spool_dir=str(tmp_path / "spool"), **settings
    )
    service.log_runs_like("{level} {message}", "DEBUG")
    return service


def test_a_print_lands_in_the_run_log_and_on_the_console(
    tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    console = sys.stdout, sys.stderr
    service = _service(tmp_path, mlflow_store)
    # given a run in which the job prints, to both streams, a line in pieces and a progress bar
    with service, service.run_context(_run_config("prints")) as run:
        print("hello from print")
        print("a warning printed", file=sys.stderr)
        print("loss", end=" ")
        print(0.5)
        sys.stderr.write("\r 50%|#####     |\r100%|##########|")
        sys.stderr.write("\n")
        logger.info("a logged line")

    # then the console shows each line once, as printed
    out, err = capsys.readouterr()
    assert out == "hello from print\nloss 0.5\n"
    assert err.count("a warning printed\n") == 1
    # and the run's log has the printed lines among the logged ones, in order
    text = run_log(service.client(), run.info.run_id, tmp_path)
    assert text == (
        "hello from print\na warning printed\nloss 0.5\n100%|##########|\nINFO a logged line\n"
    )
    # and the process has its own streams back: the very same objects
    assert (sys.stdout, sys.stderr) == console
    assert sys.stdout is console[0] and sys.stderr is console[1]


def test_the_streams_are_given_back_when_the_run_fails_or_is_interrupted(
    tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    console = sys.stdout, sys.stderr
    service = _service(tmp_path, mlflow_store)
    with service:
        with pytest.raises(ValueError), service.run_context(_run_config("failed")) as failed:
            print("before the error")
            raise ValueError("bad input")
        assert sys.stdout is console[0] and sys.stderr is console[1]
        with pytest.raises(KeyboardInterrupt), service.run_context(_run_config("killed")):
            raise KeyboardInterrupt
        assert sys.stdout is console[0] and sys.stderr is console[1]
        print("between the runs")  # no run open: kept by nobody

    client = service.client()
    assert client.get_run(failed.info.run_id).info.status == "FAILED"
    text = run_log(client, failed.info.run_id, tmp_path)
    assert text is not None
    assert text.startswith("before the error\nThe run ended FAILED:\n")
    assert "between the runs\n" in capsys.readouterr().out


def test_a_nested_run_gets_its_own_prints_and_the_parent_keeps_capturing(
    tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    service = _service(tmp_path, mlflow_store)
    with service, service.run_context(_run_config("outer")) as outer:
        print("outer before")
        with service.run_context(_run_config("inner")) as inner:
            print("inner")
        print("outer after")

    client = service.client()
    assert run_log(client, outer.info.run_id, tmp_path) == "outer before\nouter after\n"
    assert run_log(client, inner.info.run_id, tmp_path) == "inner\n"


def test_a_redirect_inside_a_run_is_teed_too_and_each_line_is_copied_once(
    tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    console = sys.stdout
    redirected = io.StringIO()
    service = _service(tmp_path, mlflow_store)
    # given a job that redirects stdout inside its run, and opens a nested run under it
    with service, service.run_context(_run_config("outer")) as outer:
        print("outer before")
        with contextlib.redirect_stdout(redirected):
            with service.run_context(_run_config("inner")) as inner:
                print("inner, redirected")
            print("outer, redirected")
        print("outer after")

    client = service.client()
    assert run_log(client, inner.info.run_id, tmp_path) == "inner, redirected\n"
    assert run_log(client, outer.info.run_id, tmp_path) == (
        "outer before\nouter, redirected\nouter after\n"
    )
    assert redirected.getvalue() == "inner, redirected\nouter, redirected\n"
    assert capsys.readouterr().out == "outer before\nouter after\n"
    assert sys.stdout is console


def test_no_line_twice_when_a_console_sink_is_added_inside_the_run(
    tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    service = _service(tmp_path, mlflow_store)
    # given sinks on the console that are added while the run is open (so while stderr is
    # the tee): the LoggerService's own, and one of the application's
    with (
        service,
        service.run_context(_run_config("sinks")) as run,
        LoggerService(sink="stderr", format="{message}", colorize=False),
    ):
        handler_id = logger.add(sys.stderr, format="mine: {message}", colorize=False)
        try:
            logger.info("logged once")
        finally:
            logger.remove(handler_id)

    # then the console has the line once per sink, and the run's log once
    err = capsys.readouterr().err
    assert err.count("mine: logged once\n") == 1
    assert err.replace("mine: logged once\n", "").count("logged once\n") == 1
    assert run_log(service.client(), run.info.run_id, tmp_path) == "INFO logged once\n"


def test_lines_printed_by_threads_at_once_stay_whole(
    tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    service = _service(tmp_path, mlflow_store)

    def chatter(worker: int) -> None:
        for line in range(200):
            print("worker", worker, "line", line)  # five writes per line

    with service, service.run_context(_run_config("threads")) as run:
        threads = [threading.Thread(target=chatter, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    text = run_log(service.client(), run.info.run_id, tmp_path)
    assert text is not None
    expected = {f"worker {w} line {n}" for w in range(4) for n in range(200)}
    assert sorted(text.splitlines()) == sorted(expected)


def test_printed_secrets_are_masked_in_the_run_log(
    tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = "http://bob:pa55w0rd@127.0.0.1:9"
    service = _service(tmp_path, mlflow_store, registry_uri=registry)
    with service, service.run_context(_run_config("secret")) as run:
        print(f"registry at {registry}")

    text = run_log(service.client(), run.info.run_id, tmp_path)
    assert text == "registry at http://bob:***@127.0.0.1:9\n"


def test_without_a_captured_log_the_streams_are_never_replaced(
    tmp_path: Path, mlflow_store: str
) -> None:
    service = _service(tmp_path, mlflow_store, capture_log=False)
    with service, service.run_context(_run_config("off")):
        seen = sys.stdout, sys.stderr
    assert seen == (sys.stdout, sys.stderr)
    assert type(seen[0]).__name__ != "StreamTee"
