"""pytest plugin: fixtures to test jobs against the container in a few lines.

Installed with the package (entry point ``pytest11``), so any project that depends on
``regression-model-template`` gets these fixtures without a ``conftest.py``:

- ``service_container``: a fresh, wired :class:`~regression_model_template.containers.Container`
  per test: MLflow on a SQLite store under ``tmp_path``, alerts recorded instead of shown,
  logs written to ``tmp_path/logs/job.log``. Unwired and shut down after the test.
- ``alerts_outbox``: the alerts sent during the test, in order, as ``Alert(title, message)``.
- ``logger_caplog``: loguru records in pytest's ``caplog``.
- ``service_container_packages``: override it to wire your own job packages.

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

__all__ = ["Alert", "RecordingAlertsService", "mlflow_globals_restored"]


class Alert(T.NamedTuple):
    """One alert sent during a test.

    Example:
        >>> Alert("Training", "rmse=53.1").title
        'Training'
    """

    title: str
    message: str


class RecordingAlertsService(AlertsService):
    """Alerts kept in an outbox list instead of being shown or printed.

    Example:
        >>> outbox: list[Alert] = []
        >>> alerts = RecordingAlertsService.recording_into(outbox)
        >>> with alerts:
        ...     alerts.notify("Training", "done")
        >>> outbox
        [Alert(title='Training', message='done')]
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

    def notify(self, title: str, message: str) -> None:
        """Record the alert.

        Example:
            >>> RecordingAlertsService().notify("title", "message")
        """
        self._outbox.append(Alert(title, message))


@pytest.fixture(scope="session")
def _mlflow_template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once: building the schema takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


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
    _mlflow_template_store: Path,
    alerts_outbox: list[Alert],
    service_container_packages: list[str],
) -> T.Iterator[Container]:
    """A fresh, wired container isolated in ``tmp_path``; shut down and unwired afterwards."""
    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir(parents=True)
    shutil.copyfile(_mlflow_template_store, store)
    container = Container(
        config={
            "logger": {"sink": str(tmp_path / "logs" / "job.log"), "colorize": False},
            "mlflow": {"tracking_uri": f"sqlite:///{store}", "experiment_name": "tests"},
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
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        if "mlflow" in sys.modules:
            import mlflow

            while mlflow.active_run() is not None:
                mlflow.end_run("KILLED")
            mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]
            mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def logger_caplog(caplog: pytest.LogCaptureFixture) -> T.Iterator[pytest.LogCaptureFixture]:
    """Pytest's ``caplog``, receiving loguru records too (``caplog.messages``, ``.records``)."""
    handler_id = logger.add(caplog.handler, format="{message}", level=0)
    try:
        yield caplog
    finally:
        logger.remove(handler_id)
