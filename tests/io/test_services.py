"""Tests of the three global services: LoggerService, AlertsService and MlflowService.

Real dependencies only: MLflow on SQLite stores under tmp_path, loguru writing to real files,
and plyer driven through the operating system (desktop environment variables and fake
``notify-send`` programs on PATH). Bounded-time assertions are made only against a configured
bound (``max_wait``, ``connect_timeout``) plus a generous margin.
"""

from __future__ import annotations

import http.server
import importlib.util
import io
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import typing as T
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pydantic
import pytest
from loguru import logger

from regression_model_template.io.services import (
    AlertsService,
    LoggerService,
    MlflowService,
    Service,
    ServiceError,
)
from regression_model_template.io.stores import environ_restored
from tests.conftest import LogCapture, notify_timed

# These machines have no internet: keep MLflow's telemetry quiet in every run of this module.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

MARGIN = 1.5  # seconds of slack over a configured bound, for a noisy machine
DESKTOP_VARIABLES = ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY")
MLFLOW_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
)
SLEEP = shutil.which("sleep") or "/bin/sleep"  # resolved before any test narrows PATH

# plyer prefers the xdg portal (/app) and python-dbus over notify-send: the fake notify-send
# programs below only drive plyer where neither is present (as on the machines this runs on).
requires_notify_send_backend = pytest.mark.skipif(
    os.path.isdir("/app") or importlib.util.find_spec("dbus") is not None,
    reason="plyer would pick the xdg portal or python-dbus, not notify-send",
)


# %% shared fixtures and helpers


@pytest.fixture
def make_logger() -> Iterator[Callable[..., LoggerService]]:
    """Build LoggerServices that are stopped after the test, even when it fails midway."""
    services: list[LoggerService] = []

    def make(**settings: T.Any) -> LoggerService:
        service = LoggerService(**settings)
        services.append(service)
        return service

    yield make
    for service in reversed(services):
        service.stop()


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "job.log"


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening on it (right after this call)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# %% Service


def test_service_is_abstract_and_stop_does_nothing_by_default() -> None:
    # given the base class, and a subclass that only implements start()
    class Minimal(Service):
        def start(self) -> None:
            pass

    # when / then: the base cannot be instantiated; the subclass stops harmlessly
    with pytest.raises(TypeError, match="abstract"):
        Service()  # type: ignore[abstract]
    Minimal().stop()


def test_service_context_manager_stops_when_the_block_raises(
    make_logger: Callable[..., LoggerService], log_file: Path
) -> None:
    # given a logger service used as a context manager
    service = make_logger(sink=str(log_file), format="{message}")

    # when the block raises
    with pytest.raises(RuntimeError, match="boom"), service:
        service.logger().info("inside the block")
        raise RuntimeError("boom")
    service.logger().info("after the block")

    # then the exception propagated and the service was stopped (its sink receives no more)
    assert read(log_file).splitlines() == ["inside the block"]


@pytest.mark.parametrize(
    ("model", "name", "value"),
    [
        (LoggerService(), "level", "INFO"),
        (AlertsService(), "enable", False),
        (MlflowService(), "tracking_uri", "sqlite:///other.db"),
        (MlflowService.RunConfig(name="run"), "name", "other"),
    ],
    ids=["logger", "alerts", "mlflow", "run-config"],
)
def test_models_are_frozen(model: pydantic.BaseModel, name: str, value: object) -> None:
    # given a built model / when a setting is reassigned / then it is refused
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(model, name, value)


@pytest.mark.parametrize(
    ("model", "data", "field_name"),
    [
        (LoggerService, {"levle": "INFO"}, "levle"),
        (AlertsService, {"enabled": False}, "enabled"),
        (MlflowService, {"tracking_url": "sqlite:///x.db"}, "tracking_url"),
        (MlflowService.RunConfig, {"name": "run", "tag": {}}, "tag"),
        (LoggerService, {"colorize": "no"}, "colorize"),
        (AlertsService, {"enable": "yes"}, "enable"),
        (AlertsService, {"max_wait": 0}, "max_wait"),
        (MlflowService, {"connect_timeout": "10"}, "connect_timeout"),
        (MlflowService, {"tracking_uri": " "}, "tracking_uri"),
        (MlflowService.RunConfig, {"name": 1}, "name"),
    ],
    ids=[
        "logger-extra",
        "alerts-extra",
        "mlflow-extra",
        "runconfig-extra",
        "logger-strict",
        "alerts-strict",
        "alerts-bound",
        "mlflow-strict",
        "mlflow-empty-uri",
        "runconfig-strict",
    ],
)
def test_misspelt_or_mistyped_settings_are_rejected(
    model: type[pydantic.BaseModel], data: dict[str, T.Any], field_name: str
) -> None:
    # given settings with a misspelt key or a wrong type / when validated / then an error names it
    with pytest.raises(pydantic.ValidationError) as error:
        model.model_validate(data)
    assert [e["loc"] for e in error.value.errors()] == [(field_name,)]


def test_defaults_match_the_spec() -> None:
    # given services built with no settings / then their defaults are the documented ones
    assert LoggerService().model_dump(exclude={"format", "intercept_stdlib"}) == {
        "sink": "stderr",
        "level": "DEBUG",
        "colorize": None,  # colour only on a terminal
        "serialize": False,
        "backtrace": True,
        "diagnose": False,
        "catch": True,
    }
    alerts = AlertsService()
    assert (alerts.enable, alerts.app_name, alerts.timeout) == (
        True,
        "regression_model_template",
        None,
    )
    assert 0 < alerts.max_wait <= 3  # "a couple of seconds"
    mlflow_service = MlflowService()
    assert mlflow_service.experiment_name == "regression_model_template"
    assert mlflow_service.registry_name == "regression_model_template"
    assert mlflow_service.registry == mlflow_service.tracking_uri
    assert mlflow_service.autolog_disable is False
    assert MlflowService.RunConfig(name="run").log_system_metrics is True


# %% LoggerService


def test_default_format_shows_timestamp_level_and_source(
    make_logger: Callable[..., LoggerService], log_file: Path
) -> None:
    # given a logger service writing to a file with the default settings
    service = make_logger(sink=str(log_file))
    service.start()

    # when a line is logged
    line = sys._getframe().f_lineno + 1
    service.logger().info("model trained")
    service.stop()

    # then the file holds one plain-text line: timestamp | level | name:function:line - message
    pattern = (
        r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{3} \| INFO     \| "
        + re.escape(f"{__name__}:test_default_format_shows_timestamp_level_and_source:{line}")
        + r" - model trained"
    )
    assert re.fullmatch(pattern, read(log_file).strip()), read(log_file)


class _Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize(
    ("colorize", "terminal", "coloured"),
    [
        (None, False, False),  # a pipe, a file, a CI log: plain text
        (None, True, True),  # a terminal: colours
        (True, False, True),  # forced on
        (False, True, False),  # forced off
    ],
)
def test_colours_follow_the_terminal_unless_forced(
    make_logger: Callable[..., LoggerService],
    monkeypatch: pytest.MonkeyPatch,
    colorize: bool | None,
    terminal: bool,
    coloured: bool,
) -> None:
    # given stdout that is (or is not) a terminal, and a logger with the default format
    stream = _Stream(terminal)
    monkeypatch.setattr(sys, "stdout", stream)
    settings = {} if colorize is None else {"colorize": colorize}
    service = make_logger(sink="stdout", **settings)

    # when it logs a line
    with service:
        service.logger().info("hello")

    # then escape codes are written exactly when colours are wanted
    assert "hello" in stream.getvalue()
    assert ("\x1b[" in stream.getvalue()) is coloured


def test_logger_returns_the_loguru_logger() -> None:
    # given a logger service / when its logger is requested / then it is loguru's logger
    assert LoggerService().logger() is logger


def test_file_sink_creates_its_folder(
    make_logger: Callable[..., LoggerService], tmp_path: Path
) -> None:
    # given a log file in folders that do not exist yet
    sink = tmp_path / "a" / "b" / "job.log"

    # when the service starts and logs
    with make_logger(sink=str(sink), format="{message}") as service:
        service.logger().info("hello")

    # then the folders were created and the line written
    assert read(sink) == "hello\n"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_stdout_and_stderr_are_streams_not_file_names(
    make_logger: Callable[..., LoggerService],
    stream: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # given a logger service whose sink names a stream
    monkeypatch.chdir(tmp_path)
    service = make_logger(sink=stream, format="{message}")

    # when it logs
    with service:
        service.logger().info("to the stream")

    # then the line went to that stream and no file of that name was created
    assert "to the stream" in getattr(capsys.readouterr(), stream[3:])
    assert not (tmp_path / stream).exists()


def test_level_filters_lower_records_and_is_case_insensitive(
    make_logger: Callable[..., LoggerService], log_file: Path
) -> None:
    # given a service at level "warning" (lower case)
    service = make_logger(sink=str(log_file), level="warning", format="{level} {message}")
    assert service.level == "WARNING"

    # when records below and at that level are logged
    with service:
        service.logger().info("detail")
        service.logger().warning("attention")

    # then only the one at the level is written
    assert read(log_file).splitlines() == ["WARNING attention"]


def test_invalid_level_is_rejected_at_construction_naming_level() -> None:
    # given / when an unknown level / then a ValidationError names the field
    with pytest.raises(pydantic.ValidationError, match="unknown log level 'LOUD'") as error:
        LoggerService(level="LOUD")
    assert [e["loc"] for e in error.value.errors()] == [("level",)]


@pytest.mark.parametrize("kind", ["directory", "empty"])
def test_unusable_sink_is_rejected_at_construction_naming_sink(tmp_path: Path, kind: str) -> None:
    # given a sink that is an existing directory, or empty
    sink = str(tmp_path) if kind == "directory" else "  "

    # when / then the service cannot be built, and the error names the field
    with pytest.raises(pydantic.ValidationError) as error:
        LoggerService(sink=sink)
    assert [e["loc"] for e in error.value.errors()] == [("sink",)]


def test_unwritable_sink_fails_at_start_naming_sink(
    make_logger: Callable[..., LoggerService], tmp_path: Path
) -> None:
    # given a log path whose "folder" is a regular file (unwritable even for root)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    service = make_logger(sink=str(blocker / "job.log"))
    root_handlers = logging.getLogger().handlers[:]

    # when it starts
    with pytest.raises(ServiceError) as error:
        service.start()

    # then one clear error names the service and the setting, chained to the OS error,
    # and nothing was left half-installed
    assert error.value.setting == "sink"
    assert str(error.value).startswith("LoggerService.sink: ")
    assert str(blocker) in str(error.value)
    assert isinstance(error.value.__cause__, OSError)
    assert logging.getLogger().handlers == root_handlers


def test_starting_twice_does_not_duplicate_lines(
    make_logger: Callable[..., LoggerService], log_file: Path
) -> None:
    # given a service started twice
    service = make_logger(sink=str(log_file), format="{message}")
    service.start()
    service.start()

    # when one line is logged
    service.logger().info("once")
    logging.getLogger("some.lib").warning("stdlib once")
    service.stop()

    # then it is written once
    assert read(log_file).splitlines() == ["once", "stdlib once"]


def test_stop_removes_only_its_own_handler(
    make_logger: Callable[..., LoggerService],
    log_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a handler someone else added: pytest's documented caplog bridge
    bridge_id = logger.add(caplog.handler, format="{message}", level="INFO")
    try:
        service = make_logger(sink=str(log_file), format="{message}")

        # when the service starts, logs, and stops, then more is logged
        service.start()
        logger.info("while running")
        service.stop()
        logger.info("after stop")
    finally:
        logger.remove(bridge_id)

    # then the other handler received everything, the service's sink only what came before stop
    assert [r.getMessage() for r in caplog.records] == ["while running", "after stop"]
    assert read(log_file).splitlines() == ["while running"]


def test_stop_without_start_or_twice_is_harmless(
    make_logger: Callable[..., LoggerService], log_file: Path
) -> None:
    # given a service never started
    service = make_logger(sink=str(log_file), format="{message}")

    # when it is stopped, then started, stopped twice, and restarted
    service.stop()
    service.start()
    service.stop()
    service.stop()
    with service:
        service.logger().info("still works")

    # then nothing failed and the service still logs normally
    assert read(log_file).splitlines() == ["still works"]


def test_stdlib_logging_records_reach_the_sink(
    make_logger: Callable[..., LoggerService], log_file: Path
) -> None:
    # given a running logger service
    with make_logger(sink=str(log_file), format="{level} {message}"):
        # when a library logs through the standard logging module
        logging.getLogger("some.lib").warning("disk almost full")

    # then the record is in the same sink
    assert read(log_file).splitlines() == ["WARNING disk almost full"]


@pytest.mark.parametrize("order", ["logger-first", "mlflow-first"])
def test_mlflow_logger_records_reach_the_sink(
    make_logger: Callable[..., LoggerService],
    log_file: Path,
    mlflow_service: MlflowService,
    order: str,
) -> None:
    # given a logger service and an mlflow service, started in either order
    service = make_logger(sink=str(log_file), format="{level} {name} {message}")
    first, second = (
        (service, mlflow_service) if order == "logger-first" else (mlflow_service, service)
    )
    with first, second:
        # when MLflow's own logger (which does not propagate) emits a record, and MLflow's code
        # logs (the system metrics monitor of a run announces itself at INFO)
        logging.getLogger("mlflow").warning("from the mlflow logger")
        with mlflow_service.run_context(MlflowService.RunConfig(name="with-system-metrics")):
            pass

    # then both are in the loguru sink
    lines = read(log_file).splitlines()
    assert f"WARNING {__name__} from the mlflow logger" in lines
    assert any(re.match(r"INFO mlflow\.system_metrics\.\S+ ", line) for line in lines), lines


def test_stop_gives_mlflow_loggers_their_handlers_back(
    make_logger: Callable[..., LoggerService], log_file: Path, mlflow_service: MlflowService
) -> None:
    # given MLflow's logger as MLflow configured it
    with mlflow_service:
        before = logging.getLogger("mlflow").handlers[:]

        # when a logger service starts and stops
        with make_logger(sink=str(log_file)):
            assert logging.getLogger("mlflow").handlers != before
        # then MLflow's own handlers are back
        assert logging.getLogger("mlflow").handlers == before


def _check_token(token: str) -> None:
    raise PermissionError("token rejected")


def _login(token: str) -> None:
    _check_token(token)


@pytest.mark.parametrize(
    ("settings", "shown"), [({}, False), ({"diagnose": True}, True)], ids=["default", "diagnose"]
)
def test_tracebacks_do_not_show_local_values_by_default(
    make_logger: Callable[..., LoggerService],
    log_file: Path,
    settings: dict[str, T.Any],
    shown: bool,
) -> None:
    # given a logger service (default settings, or diagnose explicitly on)
    token = "tok-" + secrets.token_hex(8)
    with make_logger(sink=str(log_file), **settings) as service:
        # when an exception involving a local variable holding a token is logged
        try:
            _login(token)
        except PermissionError:
            service.logger().exception("login failed")

    # then the traceback is logged, but the token's value only when diagnose is on
    text = read(log_file)
    assert "PermissionError: token rejected" in text
    assert (token in text) is shown


# %% AlertsService


def forget_plyer_backend() -> None:
    """plyer picks its backend once per process, from PATH at that moment (the machine's).

    Each test here builds another machine (its own PATH), so the choice is forgotten around it.
    """
    import plyer

    object.__setattr__(plyer.notification, "_obj", None)


@pytest.fixture
def desktop_session(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A session with a display (as on a workstation)."""
    for name in DESKTOP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    forget_plyer_backend()
    yield
    forget_plyer_backend()


@pytest.fixture
def headless(monkeypatch: pytest.MonkeyPatch) -> None:
    """No display and no session bus (as in CI, a container or an ssh session)."""
    for name in DESKTOP_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder that is the whole PATH: no notify-send unless a test installs one."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    return folder


def install_notify_send(bin_dir: Path, body: str, *, executable: bool = True) -> Path:
    script = bin_dir / "notify-send"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755 if executable else 0o644)
    return script


def test_disabled_alerts_print_the_console_line(
    capsys: pytest.CaptureFixture[str], captured_logs: LogCapture
) -> None:
    # given disabled alerts
    alerts = AlertsService(enable=False, app_name="demo")

    # when started and notified
    with alerts:
        alerts.notify("Training", "done")

    # then the console line is printed, start logged why, and nothing is warned
    assert capsys.readouterr().out == "[demo] Training: done\n"
    assert any("console" in m and "alerts.enable" in m for m in captured_logs.messages("DEBUG"))
    assert captured_logs.messages("WARNING") == []


@requires_notify_send_backend
def test_enabled_alerts_show_a_desktop_notification(
    desktop_session: None,
    bin_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    captured_logs: LogCapture,
) -> None:
    # given a desktop with a working notify-send
    shown = tmp_path / "shown.txt"
    install_notify_send(bin_dir, f"printf '%s\\n' \"$@\" > '{shown}'")
    alerts = AlertsService(app_name="demo")

    # when started and notified
    with alerts:
        assert alerts.channel == "desktop"
        alerts.notify("Training done", "r2 is 0.45")

    # then the desktop received the title, message and app name, and the console nothing
    arguments = read(shown).splitlines()
    assert arguments[:2] == ["Training done", "r2 is 0.45"]
    assert arguments[arguments.index("-a") + 1] == "demo"
    assert capsys.readouterr().out == ""
    assert any("desktop" in m for m in captured_logs.messages("DEBUG"))
    assert captured_logs.messages("WARNING") == []


@requires_notify_send_backend
@pytest.mark.xfail(
    strict=True,
    reason="plyer's public facade ignores notify-send's exit code; alerts go through the facade "
    "(issue 8, sharp edge 7), so a display without a notification daemon counts as shown",
)
def test_a_desktop_that_cannot_show_the_alert_falls_back_to_the_console(
    desktop_session: None,
    bin_dir: Path,
    capsys: pytest.CaptureFixture[str],
    captured_logs: LogCapture,
) -> None:
    # given a display but no notification daemon: notify-send prints an error and exits 1,
    # which plyer's own backend ignores (nothing shown, no error)
    install_notify_send(bin_dir, "echo 'GDBus.Error: no notification daemon' >&2\nexit 1")
    alerts = AlertsService(app_name="demo", timeout=3)

    # when notified twice
    with alerts:
        alerts.notify("a", "1")
        alerts.notify("b", "2")

    # then both alerts reach the console, and one warning carries notify-send's reason
    assert capsys.readouterr().out == "[demo] a: 1\n[demo] b: 2\n"
    warnings = captured_logs.messages("WARNING")
    assert len(warnings) == 1
    assert "notify-send exited 1: GDBus.Error: no notification daemon" in warnings[0]


def test_with_a_desktop_alerts_go_through_plyers_public_facade(
    desktop_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # given a desktop session and, as in the template's own tests that users copy, plyer's
    # public notify replaced by a recorder
    import plyer

    calls: list[dict[str, T.Any]] = []
    # (set on plyer's backend object, which desktop_session forgets after the test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plyer chooses its backend here, warning for each
        plyer.notification.notify = lambda **kwargs: calls.append(kwargs)
    alerts = AlertsService(app_name="demo", timeout=5)

    # when started and notified
    with alerts:
        alerts.notify("Training", "done")

    # then plyer.notification.notify received the alert once, and the console nothing
    assert calls == [{"title": "Training", "message": "done", "app_name": "demo", "timeout": 5}]
    assert capsys.readouterr().out == ""


def test_notify_before_start_alerts_like_a_started_service(
    desktop_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # given the template's own test, which users copy: a service that is never started, and
    # plyer's public notify patched
    alerts = AlertsService(enable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plyer chooses its backend here, warning for each
        patched = mock.patch(target="plyer.notification.notify")
    with patched as notify:
        # when it alerts without start()
        alerts.notify(title="test", message="hello")

        # then the desktop got the alert once, and the console nothing
        notify.assert_called_once_with(title="test", message="hello", app_name=alerts.app_name)
        assert capsys.readouterr().out == ""
        assert alerts.channels == ["desktop"]

        # and after stop() alerts are printed, the desktop left alone
        alerts.stop()
        alerts.notify(title="test", message="again")
        assert notify.call_count == 1
    assert capsys.readouterr().out == f"[{alerts.app_name}] test: again\n"


def test_a_raising_facade_falls_back_to_the_console(
    desktop_session: None,
    capsys: pytest.CaptureFixture[str],
    captured_logs: LogCapture,
) -> None:
    # given a desktop whose plyer facade raises (another OS, another plyer version)
    import plyer

    def broken(**kwargs: T.Any) -> None:
        raise OSError("backend exploded")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plyer chooses its backend here, warning for each
        plyer.notification.notify = broken  # forgotten with the backend after the test
    alerts = AlertsService(app_name="demo")

    # when notified
    with alerts:
        alerts.notify("Training", "done")

    # then the alert is a console line and the warning gives the cause
    assert capsys.readouterr().out == "[demo] Training: done\n"
    [warning] = captured_logs.messages("WARNING")
    assert "OSError: backend exploded" in warning


@requires_notify_send_backend
def test_headless_session_goes_to_the_console_without_calling_the_backend(
    headless: None,
    bin_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    captured_logs: LogCapture,
) -> None:
    # given notify-send installed but no display nor session bus: the real one would print an
    # error and exit 1, and plyer would return normally with nothing shown
    called = tmp_path / "called.txt"
    install_notify_send(bin_dir, f"touch '{called}'\necho 'Cannot autolaunch D-Bus' >&2\nexit 1")
    alerts = AlertsService(app_name="demo")

    # when started and notified twice
    with alerts:
        alerts.notify("a", "1")
        alerts.notify("b", "2")

    # then both alerts are console lines, the silent backend was not used, one warning says why
    assert capsys.readouterr().out == "[demo] a: 1\n[demo] b: 2\n"
    assert not called.exists()
    [warning] = captured_logs.messages("WARNING")
    assert "DISPLAY" in warning


@requires_notify_send_backend
def test_no_backend_goes_to_the_console_with_one_warning(
    desktop_session: None,
    bin_dir: Path,
    capsys: pytest.CaptureFixture[str],
    captured_logs: LogCapture,
) -> None:
    # given a desktop session but no notification backend at all (no dbus, no notify-send)
    alerts = AlertsService(app_name="demo")

    # when started (plyer's own warnings silenced) and notified twice
    with warnings.catch_warnings(record=True) as python_warnings, alerts:
        warnings.simplefilter("always")
        alerts.notify("a", "1")
        alerts.notify("b", "2")

    # then both alerts are console lines and one warning says why
    assert capsys.readouterr().out == "[demo] a: 1\n[demo] b: 2\n"
    [warning] = captured_logs.messages("WARNING")
    assert "no notification backend" in warning
    assert python_warnings == []


@requires_notify_send_backend
def test_hanging_backend_is_bounded_by_max_wait(
    desktop_session: None,
    bin_dir: Path,
    capsys: pytest.CaptureFixture[str],
    captured_logs: LogCapture,
) -> None:
    # given a notification daemon that never answers (notify-send blocks for 5 s)
    install_notify_send(bin_dir, f"exec '{SLEEP}' 5")
    alerts = AlertsService(app_name="demo", max_wait=0.5)

    with alerts:
        # when notified twice
        durations = notify_timed(alerts, ("a", "b"), "msg")

    # then each call returned within max_wait (plus margin), both went to the console,
    # and one warning names the bound
    assert max(durations) < alerts.max_wait + MARGIN, durations
    assert capsys.readouterr().out == "[demo] a: msg\n[demo] b: msg\n"
    [warning] = captured_logs.messages("WARNING")
    assert "max_wait" in warning
    assert alerts.channel == "console"


@requires_notify_send_backend
@pytest.mark.parametrize("failure", ["deleted", "not-executable"])
def test_failing_backend_never_raises_and_warns_once(
    desktop_session: None,
    bin_dir: Path,
    capsys: pytest.CaptureFixture[str],
    captured_logs: LogCapture,
    failure: str,
) -> None:
    # given a notify-send that cannot run: removed after start, or not executable
    script = install_notify_send(bin_dir, "exit 0", executable=failure == "deleted")
    alerts = AlertsService(app_name="demo")
    alerts.start()
    if failure == "deleted":
        script.unlink()

    # when notified twice
    alerts.notify("a", "1")
    alerts.notify("b", "2")
    alerts.stop()

    # then nothing raised, both alerts are console lines, and one warning gives the cause
    assert capsys.readouterr().out == "[demo] a: 1\n[demo] b: 2\n"
    [warning] = captured_logs.messages("WARNING")
    expected = "FileNotFoundError" if failure == "deleted" else "PermissionError"
    assert expected in warning


@requires_notify_send_backend
def test_each_distinct_cause_is_warned_once(
    desktop_session: None,
    bin_dir: Path,
    capsys: pytest.CaptureFixture[str],
    captured_logs: LogCapture,
) -> None:
    # given a started service whose notify-send disappears, then comes back not executable
    script = install_notify_send(bin_dir, "exit 0")
    alerts = AlertsService(app_name="demo")
    alerts.start()
    script.unlink()

    # when notified under the first cause, then twice under the second one
    alerts.notify("a", "1")
    install_notify_send(bin_dir, "exit 0", executable=False)
    alerts.notify("b", "2")
    alerts.notify("c", "3")
    alerts.stop()

    # then every alert is a console line and each cause was warned exactly once
    assert capsys.readouterr().out.count("[demo] ") == 3
    warned = captured_logs.messages("WARNING")
    assert len(warned) == 2
    assert "FileNotFoundError" in warned[0] and "PermissionError" in warned[1]


@requires_notify_send_backend
def test_stop_sends_later_alerts_to_the_console(
    desktop_session: None,
    bin_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # given a started service with a working desktop
    shown = tmp_path / "shown.txt"
    install_notify_send(bin_dir, f"touch '{shown}'")
    alerts = AlertsService(app_name="demo")
    alerts.start()

    # when stopped, then notified
    alerts.stop()
    alerts.notify("late", "alert")

    # then the alert is a console line and the desktop was not used
    assert capsys.readouterr().out == "[demo] late: alert\n"
    assert not shown.exists()


# %% MlflowService


@pytest.fixture(autouse=True)
def _mlflow_isolation() -> Iterator[None]:
    """Start each test with MLflow's global state clean; fail a test that leaves a run active."""
    with environ_restored(MLFLOW_VARIABLES):
        for name in MLFLOW_VARIABLES:
            os.environ.pop(name, None)
        yield
        if "mlflow" not in sys.modules:
            return
        import mlflow

        leftover = []
        while (run := mlflow.active_run()) is not None:
            leftover.append(run.info.run_id)
            mlflow.end_run("KILLED")
        mlflow.autolog(disable=True)
        # None resets to MLflow's default (and clears MLFLOW_TRACKING_URI); not in the stubs
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        if leftover:
            pytest.fail(f"the test left active MLflow runs: {leftover}")


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store per module: creating its schema costs seconds, later use milliseconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow_service(store_uri: str) -> MlflowService:
    """A service on the shared store, with an experiment of its own."""
    return MlflowService(tracking_uri=store_uri, experiment_name=f"test-{uuid.uuid4().hex}")


@pytest.fixture
def store(store_uri: str) -> T.Any:
    """An MlflowClient reading the shared store directly, independent of the service."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store_uri)


def with_settings(service: MlflowService, **settings: T.Any) -> MlflowService:
    """A new service (validated, with its own state) with some settings changed."""
    return MlflowService.model_validate({**service.model_dump(), **settings})


def run_config(name: str) -> MlflowService.RunConfig:
    return MlflowService.RunConfig(name=name, log_system_metrics=False)


def test_importing_the_package_does_not_import_mlflow_nor_apprise() -> None:
    # given a fresh interpreter / when the package and the services module are imported, and
    # alerts without URLs start and notify
    code = (
        "import regression_model_template, regression_model_template.io.services as s, sys\n"
        "with s.AlertsService(enable=True) as alerts:\n"
        "    alerts.notify('t', 'm')\n"
        "heavy = [m for m in ('mlflow', 'apprise') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    # then neither mlflow nor apprise was imported
    assert result.returncode == 0, result.stderr


def test_default_store_is_sqlite_under_mlruns_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a working directory without any MLflow folder, and default settings
    monkeypatch.chdir(tmp_path)
    service = MlflowService(autolog_disable=True)

    # when the service starts
    with service:
        pass

    # then an SQLite store was created under mlruns/, holding the default experiment
    from mlflow.tracking import MlflowClient

    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert client.get_experiment_by_name("regression_model_template") is not None


def test_start_sets_uris_and_creates_or_selects_the_experiment(
    mlflow_service: MlflowService, store_uri: str, tmp_path: Path
) -> None:
    import mlflow

    # given a service with its own registry URI
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    service = with_settings(mlflow_service, registry_uri=registry)

    # when it starts, and a second service for the same experiment starts
    with service:
        assert mlflow.get_tracking_uri() == store_uri
        assert mlflow.get_registry_uri() == registry
        created = mlflow.get_experiment_by_name(service.experiment_name)
    with mlflow_service, mlflow_service.run_context(run_config("run")) as run:
        pass

    # then the experiment was created once and selected the second time
    assert created is not None
    assert run.info.experiment_id == created.experiment_id


def test_stop_restores_the_environment_mlflow_wrote(
    mlflow_service: MlflowService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a parent environment with its own tracking URI and no experiment id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)

    # when the service runs: MLflow writes the service's values into os.environ
    with mlflow_service:
        assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_service.tracking_uri
        assert "MLFLOW_EXPERIMENT_ID" in os.environ
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"

    # then stop gives child processes and later containers the environment back
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ


@pytest.mark.parametrize("disable", [False, True], ids=["autolog-on", "autolog-off"])
def test_start_configures_autolog(
    mlflow_service: MlflowService, store: T.Any, disable: bool
) -> None:
    import numpy as np
    from sklearn.linear_model import LinearRegression

    # given a service with autolog on (the default) or off
    service = with_settings(mlflow_service, autolog_disable=disable)

    # when a model is fitted while the service is running
    with service:
        LinearRegression().fit(np.array([[0.0], [1.0], [2.0]]), np.array([0.0, 1.0, 2.0]))

    # then autolog recorded the fit in the service's experiment only when enabled
    experiment = store.get_experiment_by_name(service.experiment_name)
    runs = store.search_runs([experiment.experiment_id])
    assert len(runs) == (0 if disable else 1)
    if not disable:
        assert runs[0].data.params["fit_intercept"] == "True"


def test_run_context_ends_finished_with_name_description_and_tags(
    mlflow_service: MlflowService, store: T.Any
) -> None:
    # given a started service and a run configuration with the default system metrics
    config = MlflowService.RunConfig(name="training", description="baseline", tags={"team": "ml"})

    # when a run block ends normally
    with mlflow_service, mlflow_service.run_context(config) as run:
        assert run.info.status == "RUNNING"

    # then the run is FINISHED, in the service's experiment, with its name, description and tags
    stored = store.get_run(run.info.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.info.run_name == "training"
    assert stored.data.tags["mlflow.note.content"] == "baseline"
    assert stored.data.tags["team"] == "ml"
    experiment = store.get_experiment(stored.info.experiment_id)
    assert experiment.name == mlflow_service.experiment_name


def test_run_context_ends_failed_when_the_block_raises(
    mlflow_service: MlflowService, store: T.Any
) -> None:
    # given a started service
    with mlflow_service:
        # when the run block raises
        with (
            pytest.raises(ValueError, match="bad data"),
            mlflow_service.run_context(run_config("training")) as run,
        ):
            raise ValueError("bad data")

        # then the exception propagated and the run is FAILED
        assert store.get_run(run.info.run_id).info.status == "FAILED"


def test_run_context_ends_killed_on_keyboard_interrupt(
    mlflow_service: MlflowService, store: T.Any
) -> None:
    # given a started service
    with mlflow_service:
        # when the user interrupts the run block (Ctrl-C)
        with (
            pytest.raises(KeyboardInterrupt),
            mlflow_service.run_context(run_config("training")) as run,
        ):
            raise KeyboardInterrupt

        # then the interrupt propagated and the run is KILLED
        assert store.get_run(run.info.run_id).info.status == "KILLED"


def test_run_started_inside_another_becomes_nested(
    mlflow_service: MlflowService, store: T.Any
) -> None:
    # given a started service with an active run
    with mlflow_service, mlflow_service.run_context(run_config("outer")) as outer:
        # when another run is started inside it
        with mlflow_service.run_context(run_config("inner")) as inner:
            pass
        # then it is a nested child, and the outer run is active again
        import mlflow

        active = mlflow.active_run()
        assert active is not None and active.info.run_id == outer.info.run_id

    stored = store.get_run(inner.info.run_id)
    assert stored.data.tags["mlflow.parentRunId"] == outer.info.run_id
    assert stored.info.status == "FINISHED"
    assert store.get_run(outer.info.run_id).info.status == "FINISHED"


def test_stop_ends_a_run_left_open_as_killed_and_keeps_its_data(
    mlflow_service: MlflowService, store: T.Any, captured_logs: LogCapture
) -> None:
    import mlflow

    # given a run in progress with a value still pending in the service's buffer (e.g. a
    # shutdown handler stops the services mid-run)
    mlflow_service.start()
    with mlflow_service.run_context(run_config("training")) as run:
        mlflow_service.log_metrics({"loss": 0.25})

        # when the service stops while the run is still open
        mlflow_service.stop()

        # then the pending value is written and the run ended KILLED at once, with a warning
        stopped = store.get_run(run.info.run_id)
        assert mlflow.active_run() is None
        assert stopped.info.status == "KILLED"
        assert stopped.data.metrics == {"loss": 0.25}
        assert any(run.info.run_id in m for m in captured_logs.messages("WARNING"))

    # and leaving the block afterwards neither raises nor changes the status
    assert store.get_run(run.info.run_id).info.status == "KILLED"


def test_client_works_before_start_and_after_stop(
    mlflow_service: MlflowService, store_uri: str
) -> None:
    import mlflow

    # given a service never started / when its client is used / then it reads the service's store
    before = mlflow_service.client()
    experiment_id = before.create_experiment(f"made-before-start-{uuid.uuid4().hex}")

    with mlflow_service, mlflow_service.run_context(run_config("run")) as run:
        pass

    # given the service stopped and MLflow's global URI pointing elsewhere
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]

    # when its client is used / then it is still bound to the service's URIs
    after = mlflow_service.client()
    assert after.get_run(run.info.run_id).info.status == "FINISHED"
    assert after.get_experiment(experiment_id) is not None
    assert after.tracking_uri == store_uri


SECRET_URIS = [
    ("tracking_uri", "https://alice:s3cret-pw@mlflow.example.com/", "s3cret-pw"),
    ("tracking_uri", "https://tok3n-s3cret@mlflow.example.com/", "tok3n-s3cret"),
    ("tracking_uri", "https://mlflow.example.com/?token=q-s3cret", "q-s3cret"),
    ("tracking_uri", "postgresql://bob:pg-s3cret@db.example.com:5432/mlflow", "pg-s3cret"),
    ("registry_uri", "https://carol:reg-s3cret@registry.example.com/", "reg-s3cret"),
]


@pytest.mark.parametrize(
    ("setting", "uri", "secret"), SECRET_URIS, ids=["password", "token", "query", "pg", "registry"]
)
def test_repr_and_str_mask_credentials_in_uris(setting: str, uri: str, secret: str) -> None:
    # given a service configured with credentials inside a URI
    service = MlflowService.model_validate({setting: uri})

    # when it is shown / then the secret is masked but the host stays visible
    for text in (repr(service), str(service), f"{service}", f"{[service]}"):
        assert secret not in text
        assert "***" in text
        assert "example.com" in text


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    done = threading.Event()
    connections: list[socket.socket] = []

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connections.append(connection)

    thread = threading.Thread(target=serve, name="silent-server", daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    done.set()
    thread.join(timeout=5)
    for connection in connections:
        connection.close()
    server.close()
    assert connections, "the service never connected to the silent server"


@pytest.fixture
def not_found_server() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering 404 to everything; yields its port."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"not an mlflow server")

        do_POST = do_GET

        def log_message(self, format: str, *args: T.Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="not-found", daemon=True
    )
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def start_and_time(service: MlflowService) -> tuple[ServiceError, float]:
    started = time.monotonic()
    with pytest.raises(ServiceError) as error:
        service.start()
    return error.value, time.monotonic() - started


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_refused_tracking_server_fails_fast_without_credentials(scheme: str) -> None:
    # given a tracking URI with credentials and a port where nothing listens
    service = MlflowService(
        tracking_uri=f"{scheme}://user:s3cret@127.0.0.1:{free_port()}", connect_timeout=1
    )

    # when the service starts
    error, elapsed = start_and_time(service)

    # then it fails within the bound with a message naming service and setting, no credentials
    assert elapsed < service.connect_timeout + MARGIN, elapsed
    assert str(error).startswith("MlflowService.tracking_uri: ")
    assert "connect_timeout" in str(error)
    assert "s3cret" not in str(error)
    assert error.__cause__ is not None and "s3cret" not in str(error.__cause__)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_silent_tracking_server_fails_within_connect_timeout(
    silent_server: int, scheme: str
) -> None:
    # given a server that accepts connections but never answers (not even a TLS handshake)
    service = MlflowService(
        tracking_uri=f"{scheme}://user:s3cret@127.0.0.1:{silent_server}", connect_timeout=1
    )

    # when the service starts
    error, elapsed = start_and_time(service)

    # then it gives up after connect_timeout (MLflow alone would retry for minutes)
    assert elapsed < service.connect_timeout + MARGIN, elapsed
    assert str(error).startswith("MlflowService.tracking_uri: ")
    assert "s3cret" not in str(error)
    assert error.__cause__ is not None and "s3cret" not in str(error.__cause__)


@pytest.mark.parametrize("case", ["refused", "not-mlflow", "postgresql", "unknown-scheme"])
def test_failed_start_leaves_no_credentials_in_tracebacks_or_logs(
    make_logger: Callable[..., LoggerService],
    log_file: Path,
    not_found_server: int,
    case: str,
) -> None:
    # given a logger service, and tracking URIs with credentials that cannot be used: nothing
    # listening, an HTTP server that is not MLflow (MLflow itself fails), a database, a scheme
    # MLflow does not know (MLflow's own message quotes the whole URI)
    uri = {
        "refused": f"https://user:s3cret@127.0.0.1:{free_port()}",
        "not-mlflow": f"http://user:s3cret@127.0.0.1:{not_found_server}",
        "postgresql": f"postgresql://user:s3cret@127.0.0.1:{free_port()}/mlflow",
        "unknown-scheme": "foo://user:s3cret@127.0.0.1/mlflow",
    }[case]
    service = MlflowService(tracking_uri=uri, connect_timeout=1)
    with make_logger(sink=str(log_file), colorize=False) as log:
        # when the start fails and the job logs the exception with its traceback
        with pytest.raises(ServiceError) as error:
            service.start()
        log.logger().opt(exception=error.value).error("could not start")

    # then the message names service and setting, and no message, chained cause, printed
    # traceback or log line carries the secret
    assert str(error.value).startswith("MlflowService.tracking_uri: ")
    chain: list[BaseException] = []
    cause: BaseException | None = error.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    assert len(chain) > 1, "the original exception is chained"
    assert all("s3cret" not in str(exc) for exc in chain)
    assert "s3cret" not in "".join(traceback.format_exception(error.value))
    text = read(log_file)
    assert "could not start" in text
    assert "s3cret" not in text


@pytest.mark.parametrize("case", ["unknown-scheme", "folder-is-a-file"])
def test_unusable_tracking_uri_fails_at_start_naming_the_setting(tmp_path: Path, case: str) -> None:
    # given a URI MLflow cannot use, or an SQLite file whose folder cannot be created
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    uri = {
        "unknown-scheme": "foo://somewhere",
        "folder-is-a-file": f"sqlite:///{blocker / 'mlflow.db'}",
    }[case]

    # when the service starts
    with pytest.raises(ServiceError) as error:
        MlflowService(tracking_uri=uri).start()

    # then one error names service and setting, chained to the original exception
    assert error.value.service == "MlflowService"
    assert error.value.setting == "tracking_uri"
    assert str(error.value).startswith("MlflowService.tracking_uri: ")
    assert error.value.__cause__ is not None


def test_a_failed_start_leaves_the_process_as_it_was(tmp_path: Path) -> None:
    # given a service whose store MLflow refuses once it has been pointed at it
    import signal

    service = MlflowService(tracking_uri="foo://somewhere")

    # when the start fails
    with pytest.raises(ServiceError):
        service.start()

    # then nothing it changed stays behind: MLflow's variables, the quiet-links switch, SIGTERM
    for name in (*MLFLOW_VARIABLES, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        assert name not in os.environ, name
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(ServiceError, match="not started"):
        service.log_metrics({"loss": 1.0})


def test_stop_gives_mlflow_its_uris_back_and_turns_autolog_off(mlflow_store: str) -> None:
    import mlflow

    before = mlflow.get_tracking_uri()
    service = MlflowService(tracking_uri=mlflow_store)

    with service:
        assert mlflow.get_tracking_uri() == mlflow_store

    assert mlflow.get_tracking_uri() == before
    assert not mlflow.is_tracking_uri_set()  # type: ignore[no-untyped-call]
