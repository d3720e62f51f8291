"""pytest plugin: fixtures to test jobs against the container in a few lines.

Installed with the package (entry point ``pytest11``), so any project that depends on
``regression-model-template`` gets these fixtures without a ``conftest.py``:

- ``service_container``: a fresh, wired :class:`regression_model_template.containers.Container`
  per test: MLflow on a SQLite store under ``tmp_path`` (spool in ``tmp_path/spool``), alerts
  recorded instead of shown, logs written to ``tmp_path/logs/job.log``. Unwired and shut down
  after the test.
- ``alerts_outbox``: the alerts sent during the test, in order, as
  ``Alert(title, message, level)``.
- ``logger_caplog``: loguru records in pytest's ``caplog``.
- ``service_container_packages``: override it to wire your own job packages.
- ``mlflow_store``: the URI of a fresh SQLite tracking store under ``tmp_path``.

Helpers: :func:`local_mlflow_server` (a real ``mlflow server`` on 127.0.0.1), :func:`free_port`,
:func:`clean_environ` (an environment for subprocesses without your shell's settings),
and :func:`mlflow_globals_restored`. Another machine for a test (a network namespace on a
private link, to test a server from outside): :mod:`regression_model_template.other_hosts`.

Example (a test in your project)::

    from regression_model_template.containers import lifespan

    def test_my_job_alerts(service_container, alerts_outbox):
        with lifespan(service_container):
            my_job()  # an @inject function wired to the container
        assert alerts_outbox[-1].title == "my_job"
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import typing as T
from pathlib import Path

import pydantic
import pytest
from dependency_injector import providers
from loguru import logger

from regression_model_template.containers import Container
from regression_model_template.io.services import AlertsService
from regression_model_template.io.stores import MLFLOW_GLOBALS, environ_restored
from regression_model_template.server.processes import free_port
from regression_model_template.server.tracking_server import MlflowServer

__all__ = [
    "Alert",
    "RecordingAlertsService",
    "clean_environ",
    "free_port",
    "local_mlflow_server",
    "mlflow_globals_restored",
]


class Alert(T.NamedTuple):
    """One alert sent during a test: its title, message and level.

    Example:
        >>> Alert("Training", "rmse=53.1", "success").level
        'success'
    """

    title: str
    message: str
    level: str = "info"


class RecordingAlertsService(AlertsService):
    """Alerts kept in an outbox list instead of being shown or printed.

    Example:
        >>> outbox: list[Alert] = []
        >>> alerts = RecordingAlertsService.recording_into(outbox)
        >>> with alerts:
        ...     alerts.notify("Training", "done")
        >>> outbox
        [Alert(title='Training', message='done', level='info')]
    """

    _outbox: list[Alert] = pydantic.PrivateAttr(default_factory=list)

    @classmethod
    def recording_into(cls, outbox: list[Alert]) -> RecordingAlertsService:
        """Return a service that appends each alert to ``outbox``.

        Example:
            >>> RecordingAlertsService.recording_into([]).channel
            'console'
        """
        service = cls(enable=False)
        service._outbox = outbox
        return service

    def start(self) -> None:
        """Nothing to choose: alerts are recorded.

        Example:
            >>> RecordingAlertsService().start()
        """

    def notify(self, title: str, message: str, level: str = "info") -> None:
        """Record the alert (every call: repeats are not folded here).

        Example:
            >>> RecordingAlertsService().notify("title", "message", level="warning")
        """
        self._outbox.append(Alert(title, message, level))


@pytest.fixture(scope="session")
def _mlflow_template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once: building the schema takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, _mlflow_template_store: Path) -> str:
    """The URI of a fresh SQLite tracking store in ``tmp_path/mlruns`` (schema already built)."""
    path = tmp_path / "mlruns" / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_mlflow_template_store, path)
    return f"sqlite:///{path}"


@pytest.fixture
def alerts_outbox() -> list[Alert]:
    """The alerts sent through ``service_container`` during the test, in order."""
    return []


@pytest.fixture
def service_container_packages() -> list[str]:
    """Packages to wire into ``service_container`` besides the bundled jobs.

    Override it in your ``conftest.py``: ``return ["my_project.jobs"]``.
    """
    return []


@pytest.fixture
def service_container(
    tmp_path: Path,
    mlflow_store: str,
    alerts_outbox: list[Alert],
    service_container_packages: list[str],
) -> T.Iterator[Container]:
    """A fresh, wired container isolated in ``tmp_path``; shut down and unwired afterwards."""
    container = Container(
        config={
            "logger": {"sink": str(tmp_path / "logs" / "job.log"), "colorize": False},
            "mlflow": {
                "tracking_uri": mlflow_store,
                "experiment_name": "tests",
                "spool_dir": str(tmp_path / "spool"),
            },
        },
        profile=False,
        environ={},
    )
    container.alerts_service.override(
        providers.Object(RecordingAlertsService.recording_into(alerts_outbox))
    )
    if service_container_packages:
        container.wire(packages=service_container_packages)
    with mlflow_globals_restored():
        try:
            yield container
        finally:
            container.services.shutdown()
            container.unwire()


@contextlib.contextmanager
def mlflow_globals_restored() -> T.Iterator[None]:
    """Undo what code run inside leaves in MLflow's globals: open runs, URIs, environment.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``;
    without this, one test's store would leak into the next test's configuration.

    Example:
        >>> import os
        >>> _ = os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        >>> with mlflow_globals_restored():
        ...     os.environ["MLFLOW_EXPERIMENT_ID"] = "7"
        >>> "MLFLOW_EXPERIMENT_ID" in os.environ
        False
    """
    with environ_restored(MLFLOW_GLOBALS):
        saved = {name: os.environ.get(name) for name in MLFLOW_GLOBALS}
        try:
            yield
        finally:
            if "mlflow" in sys.modules:
                import mlflow

                while mlflow.active_run() is not None:
                    mlflow.end_run("KILLED")
                mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]
                mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]


@pytest.fixture
def logger_caplog(caplog: pytest.LogCaptureFixture) -> T.Iterator[pytest.LogCaptureFixture]:
    """Pytest's ``caplog``, receiving loguru records too (``caplog.messages``, ``.records``)."""
    handler_id = logger.add(caplog.handler, format="{message}", level=0)
    try:
        yield caplog
    finally:
        logger.remove(handler_id)


# %% helpers for tests that run subprocesses or a real tracking server

#: Environment prefixes of settings that would leak from a user's shell into a test.
LEAKY_PREFIXES = ("MLFLOW_", "RMT_")


def clean_environ(**extra: str) -> dict[str, str]:
    """Return this process's environment without MLflow's or this package's settings, plus extra.

    Telemetry is always off. In-process MLflow use writes ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_EXPERIMENT_ID`` into ``os.environ``: a subprocess gets only what a test gives it.

    Example:
        >>> environ = clean_environ(RMT_LOGGER__LEVEL="INFO")
        >>> environ["RMT_LOGGER__LEVEL"], environ["MLFLOW_DISABLE_TELEMETRY"]
        ('INFO', 'true')
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY_PREFIXES)}
    environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    environ.update(extra)
    return environ


@contextlib.contextmanager
def local_mlflow_server(
    root: Path, startup_timeout: float = 60.0, port: int | None = None
) -> T.Iterator[str]:
    """Run a real ``mlflow server`` on 127.0.0.1 for the block; yield its URL.

    SQLite store and proxied artifacts under ``root``, one worker (ready in ~10 s), started
    and stopped by :func:`regression_model_template.server.tracking_server.MlflowServer`, in an
    environment without your shell's MLflow settings (:func:`clean_environ`).

    ``port``: the port to listen on (default: a free one). Starting again with the same ``root``
    and ``port`` brings back the same server, as after an outage.

    Raises:
        RuntimeError: the server exited or did not answer ``/health`` within
            ``startup_timeout`` seconds; the message ends with its output.
    """
    with MlflowServer(
        f"sqlite:///{root / 'mlflow.db'}",
        root / "artifacts",
        port=port,
        startup_timeout=startup_timeout,
        env=clean_environ(),
    ) as url:
        yield url
