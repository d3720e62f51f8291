"""The container: configuration layers, validation, lifecycles, wiring and overrides."""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import typing as T
from pathlib import Path

import pydantic
import pytest
from dependency_injector import providers
from dependency_injector.wiring import Provide
from loguru import logger

from regression_model_template.containers import (
    ConfigError,
    Container,
    UnwiredError,
    effective_config,
    inject,
    lifespan,
)
from regression_model_template.io.services import (
    AlertsService,
    LoggerService,
    MlflowService,
    ServiceError,
)
from regression_model_template.testing import free_port


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    path = tmp_path / "team.yaml"
    path.write_text(
        "logger:\n"
        "  level: WARNING\n"
        "  sink: ${LOG_FILE:fallback.log}\n"
        "alerts:\n"
        "  app_name: from-profile\n"
        "  enable: ${ALERTS_ON:false}\n"
        "mlflow:\n"
        "  experiment_name: from-profile\n"
    )
    return path


def _config(tmp_path: Path, store: str, **sections: dict[str, T.Any]) -> dict[str, T.Any]:
    """A configuration that keeps a test's services inside tmp_path."""
    base: dict[str, dict[str, T.Any]] = {
        "logger": {"sink": str(tmp_path / "job.log"), "colorize": False, "format": "{message}"},
        "alerts": {"enable": False},
        "mlflow": {"tracking_uri": store, "experiment_name": "tests"},
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return base


# %% configuration layers


def test_nothing_present_gives_the_embedded_defaults() -> None:
    container = Container(profile=False, environ={})

    assert container.logger_service().model_dump() == LoggerService().model_dump()
    assert container.alerts_service().model_dump() == AlertsService().model_dump()
    assert container.mlflow_service().model_dump() == MlflowService().model_dump()
    assert container.mlflow_service().tracking_uri == "sqlite:///mlruns/mlflow.db"


@pytest.mark.parametrize(
    ("environ", "explicit", "level", "source"),
    [
        ({}, None, "WARNING", "profile"),
        ({"RMT_LOGGER__LEVEL": "ERROR"}, None, "ERROR", "environment RMT_LOGGER__LEVEL"),
        ({"RMT_LOGGER__LEVEL": "ERROR"}, {"logger": {"level": "TRACE"}}, "TRACE", "explicit"),
    ],
)
def test_each_layer_beats_the_one_below_and_unrelated_values_survive(
    profile: Path,
    environ: dict[str, str],
    explicit: dict[str, T.Any] | None,
    level: str,
    source: str,
) -> None:
    container = Container(config=explicit, profile=profile, environ=environ)

    settings = effective_config(container)
    assert settings["logger.level"].value == level
    assert settings["logger.level"].source.startswith(source)
    # values from other layers are kept, not replaced by the higher layer's tree
    assert settings["logger.sink"].value == "fallback.log"
    assert settings["alerts.app_name"].source.startswith("profile")
    assert settings["logger.format"].source == "default"
    assert container.mlflow_service().experiment_name == "from-profile"


def test_config_from_dict_merges_instead_of_replacing(profile: Path) -> None:
    container = Container(profile=profile, environ={"RMT_ALERTS__MAX_WAIT": "5"})

    container.config.from_dict({"logger": {"level": "INFO"}})

    assert container.logger_service().level == "INFO"
    assert container.logger_service().sink == "fallback.log"  # from the profile
    assert container.alerts_service().max_wait == 5.0  # from the environment, typed
    assert effective_config(container)["logger.level"].source == "explicit"


def test_profile_expands_variables_with_defaults(profile: Path) -> None:
    container = Container(profile=profile, environ={"LOG_FILE": "/tmp/x.log", "ALERTS_ON": "true"})

    assert container.logger_service().sink == "/tmp/x.log"
    assert container.alerts_service().enable is True  # "true" read as a boolean


def test_mlflow_variables_are_honoured() -> None:
    environ = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999", "MLFLOW_EXPERIMENT_NAME": "exp"}

    container = Container(profile=False, environ=environ)

    assert container.mlflow_service().tracking_uri == "http://127.0.0.1:5999"
    assert container.mlflow_service().experiment_name == "exp"
    source = effective_config(container)["mlflow.tracking_uri"].source
    assert source == "environment MLFLOW_TRACKING_URI"


def test_profile_by_name_from_the_environment() -> None:
    environ = {"RMT_PROFILE": "server", "MLFLOW_TRACKING_URI": "https://u:s3cret@127.0.0.1:1"}

    container = Container(environ=environ)

    assert container.logger_service().serialize is True
    # servers have no desktop: alerts go to the URLs of ALERT_URLS (none here: the console)
    assert container.alerts_service().enable is True
    assert container.alerts_service().urls == []
    settings = effective_config(container)
    assert settings["mlflow.tracking_uri"].value == "https://u:***@127.0.0.1:1"
    assert "s3cret" not in repr(settings)


def test_default_profile_is_local() -> None:
    container = Container(environ={})

    assert effective_config(container)["mlflow.tracking_uri"].source.startswith("profile")
    assert effective_config(container)["mlflow.tracking_uri"].source.endswith("local.yaml")


def test_server_profile_requires_its_tracking_uri() -> None:
    with pytest.raises(ConfigError, match=r"mlflow.tracking_uri: environment variable "):
        Container(profile="server", environ={})


def test_unknown_profile_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"no profile named 'serve' \(did you mean 'server'\?\)"):
        Container(profile="serve", environ={})
    with pytest.raises(ConfigError, match=r"no profile named 'nope'"):
        Container(environ={"RMT_PROFILE": "nope"})
    with pytest.raises(ConfigError, match="no such file"):
        Container(profile="missing/profile.yaml", environ={})


# %% validation


def test_every_bad_path_is_reported_at_once_with_suggestions() -> None:
    container = Container(
        config={
            "mlflow": {"tracking_uir": "sqlite:///x.db"},
            "alerts": {"max_wait": "soon"},
            "logger": {"level": "LOUD"},
            "alert": {},
        },
        profile=False,
        environ={"RMT_LOGGER__COLOURIZE": "false"},
    )

    with pytest.raises(ConfigError) as caught:
        container.services.init()

    assert caught.value.problems == [
        "alert: unknown section (did you mean 'alerts'?)",
        "logger.level: Value error, unknown log level 'LOUD' "
        "(expected one of TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL)",
        "logger.colourize: unknown key (did you mean 'colorize'?)",
        "alerts.max_wait: Input should be a valid number",
        "mlflow.tracking_uir: unknown key (did you mean 'tracking_uri'?)",
    ]


def test_a_bad_value_never_echoes_the_value() -> None:
    container = Container(
        config={"mlflow": {"connect_timeout": "token-abc123"}}, profile=False, environ={}
    )

    with pytest.raises(ConfigError) as caught:
        container.mlflow_service()

    assert "token-abc123" not in str(caught.value)
    assert "mlflow.connect_timeout" in str(caught.value)


def test_a_section_that_is_not_a_mapping_is_reported() -> None:
    container = Container(config={"logger": "INFO"}, profile=False, environ={})
    with pytest.raises(ConfigError, match="logger: expected a mapping"), lifespan(container):
        pass


# %% lifecycles


def test_lifespan_starts_in_order_and_stops_in_reverse(tmp_path: Path, mlflow_store: str) -> None:
    container = Container(config=_config(tmp_path, mlflow_store), profile=False, environ={})
    lines: list[str] = []
    handler_id = logger.add(lines.append, format="{message}")
    try:
        with lifespan(container):
            import mlflow

            assert mlflow.get_experiment_by_name("tests") is not None
    finally:
        logger.remove(handler_id)

    events = [line.split("(")[0].strip() for line in lines if line.startswith(("Start", "Stop"))]
    assert events == [
        "Started LoggerService",
        "Started AlertsService",
        "Started MlflowService",
        "Stopping MlflowService",
        "Stopping AlertsService",
        "Stopping LoggerService",
    ]


def test_a_failed_start_stops_what_already_started(tmp_path: Path) -> None:
    uri = f"http://admin:s3cret@127.0.0.1:{free_port()}"
    config = _config(tmp_path, uri, mlflow={"connect_timeout": 1.0})
    container = Container(config=config, profile=False, environ={})

    with (
        pytest.raises(ServiceError, match=r"MlflowService\.tracking_uri") as caught,
        lifespan(container),
    ):
        pytest.fail("the body must not run")

    assert "s3cret" not in str(caught.value)
    log = (tmp_path / "job.log").read_text()
    assert "Stopping AlertsService" in log
    assert "Stopping LoggerService" in log
    assert "s3cret" not in log
    # the logger's sink was removed: nothing more is written to the job's log
    logger.info("after the rollback")
    assert "after the rollback" not in (tmp_path / "job.log").read_text()


class _StopFails(AlertsService):
    def stop(self) -> None:
        raise RuntimeError("alerts could not stop")


def test_every_stop_runs_when_one_raises(tmp_path: Path, mlflow_store: str) -> None:
    container = Container(config=_config(tmp_path, mlflow_store), profile=False, environ={})
    container.alerts_service.override(providers.Object(_StopFails(enable=False)))

    with (
        pytest.raises(ServiceError, match=r"1 service\(s\) failed to stop: alerts could not stop"),
        lifespan(container),
    ):
        pass

    log = (tmp_path / "job.log").read_text()
    assert "Could not stop _StopFails: alerts could not stop" in log
    assert "Stopping LoggerService" in log  # stopped after the failure
    logger.info("after the stop")
    assert "after the stop" not in (tmp_path / "job.log").read_text()


def test_init_and_shutdown_resources_work_like_lifespan(tmp_path: Path, mlflow_store: str) -> None:
    container = Container(config=_config(tmp_path, mlflow_store), profile=False, environ={})

    container.init_resources()
    logger.info("while running")
    container.shutdown_resources()
    logger.info("after shutdown")

    log = (tmp_path / "job.log").read_text()
    assert "while running" in log
    assert "after shutdown" not in log


class _CountingAlerts(AlertsService):
    _starts: list[int] = pydantic.PrivateAttr(default_factory=list)

    def start(self) -> None:
        self._starts.append(1)
        super().start()


def test_entering_twice_or_from_threads_starts_each_service_once(
    tmp_path: Path, mlflow_store: str
) -> None:
    container = Container(config=_config(tmp_path, mlflow_store), profile=False, environ={})
    alerts = _CountingAlerts(enable=False)
    container.alerts_service.override(providers.Object(alerts))
    barrier = threading.Barrier(8)
    inside = threading.Barrier(8)
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            barrier.wait()
            with lifespan(container):
                inside.wait()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with lifespan(container), lifespan(container):
        pass
    threads = [threading.Thread(target=enter) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(alerts._starts) == 2  # once for the nested pair, once for the 8 threads


def test_eight_threads_get_one_instance() -> None:
    container = Container(profile=False, environ={})
    barrier = threading.Barrier(8)
    seen: list[MlflowService] = []

    def ask() -> None:
        barrier.wait()
        seen.append(container.mlflow_service())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(seen) == 8
    assert len({id(service) for service in seen}) == 1


def test_reset_override_keeps_the_configuration() -> None:
    container = Container(config={"logger": {"level": "ERROR"}}, profile=False, environ={})
    container.logger_service.override(providers.Object(LoggerService(level="TRACE")))

    container.reset_override()

    assert container.logger_service().level == "ERROR"


# %% wiring and overrides


@inject
def _job(
    title: str,
    alerts: AlertsService = Provide[Container.alerts_service],
    mlflow_service: MlflowService = Provide[Container.mlflow_service],
) -> str:
    alerts.notify(title, mlflow_service.experiment_name)
    return mlflow_service.experiment_name


def test_wired_jobs_receive_the_services_and_explicit_arguments_win(
    capsys: pytest.CaptureFixture[str],
) -> None:
    container = Container(
        config={"alerts": {"enable": False}, "mlflow": {"experiment_name": "wired"}},
        profile=False,
        environ={},
    )
    container.wire(modules=[sys.modules[__name__]])
    try:
        assert _job("first") == "wired"
        assert _job("second", mlflow_service=MlflowService(experiment_name="mine")) == "mine"
    finally:
        container.unwire()

    assert capsys.readouterr().out.splitlines() == [
        "[regression_model_template] first: wired",
        "[regression_model_template] second: mine",
    ]


def test_an_unwired_job_fails_with_a_clear_message() -> None:
    with pytest.raises(UnwiredError, match=r"_job\(\) needs 'alerts', provided by a container"):
        _job("title")


@inject
async def _async_job(alerts: AlertsService = Provide[Container.alerts_service]) -> str:
    return alerts.app_name


@inject
def _generator_job(alerts: AlertsService = Provide[Container.alerts_service]) -> T.Iterator[str]:
    yield alerts.app_name


@inject
async def _async_generator_job(
    alerts: AlertsService = Provide[Container.alerts_service],
) -> T.AsyncIterator[str]:
    yield alerts.app_name


def test_inject_keeps_the_kind_of_function() -> None:
    # frameworks (FastAPI, pytest-asyncio) look at a function before they call it
    assert inspect.iscoroutinefunction(_async_job)
    assert inspect.isasyncgenfunction(_async_generator_job)
    # dependency-injector's own @inject turns a generator function into a plain function that
    # returns the generator; ours is no worse (it still returns one)
    assert inspect.isgenerator(_generator_job(alerts=AlertsService(enable=False)))


def test_async_and_generator_jobs_receive_services_or_say_they_are_unwired() -> None:
    async def collect(agen: T.AsyncIterator[str]) -> list[str]:
        return [item async for item in agen]

    # unwired: the same clear error, when the job runs
    with pytest.raises(UnwiredError, match=r"_async_job\(\) needs 'alerts'"):
        asyncio.run(_async_job())
    with pytest.raises(UnwiredError, match=r"_generator_job\(\) needs 'alerts'"):
        _generator_job()
    with pytest.raises(UnwiredError, match=r"_async_generator_job\(\) needs 'alerts'"):
        asyncio.run(collect(_async_generator_job()))

    # wired: each kind receives the container's service
    container = Container(config={"alerts": {"app_name": "wired"}}, profile=False, environ={})
    container.wire(modules=[__name__])
    try:
        assert asyncio.run(_async_job()) == "wired"
        assert list(_generator_job()) == ["wired"]
        assert asyncio.run(collect(_async_generator_job())) == ["wired"]
    finally:
        container.unwire()


def test_override_and_unoverride_a_provider() -> None:
    container = Container(profile=False, environ={})
    replacement = MlflowService(experiment_name="overridden")

    with container.mlflow_service.override(replacement):
        assert container.mlflow_service() is replacement
    assert container.mlflow_service().experiment_name == "regression_model_template"


def test_service_container_fixture_isolates_each_test(
    service_container: Container, alerts_outbox: list[T.Any], tmp_path: Path
) -> None:
    with lifespan(service_container):
        service_container.alerts_service().notify("hello", "world")
        service_container.logger_service().logger().info("to the job log")

    assert alerts_outbox == [("hello", "world", "info")]
    assert str(tmp_path) in service_container.mlflow_service().tracking_uri
    assert "to the job log" in (tmp_path / "logs" / "job.log").read_text()


def test_a_misspelt_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"RMT_LOGGER_LEVEL: not a setting \(expected RMT_"):
        Container(profile=False, environ={"RMT_LOGGER_LEVEL": "INFO"})
