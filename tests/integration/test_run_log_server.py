"""The run's log against a real ``mlflow server`` with proxied artifacts (127.0.0.1)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from loguru import logger

from regression_model_template.io.services import LoggerService, MlflowService
from regression_model_template.testing import mlflow_globals_restored

pytestmark = [pytest.mark.server, pytest.mark.slow]

SECRET = "s3cretLOG"


def test_the_run_log_is_downloadable_from_the_server(mlflow_server: str, tmp_path: Path) -> None:
    # The server runs without authentication: it accepts and ignores basic-auth credentials.
    with_credentials = mlflow_server.replace("http://", f"http://user:{SECRET}@")
    logger_service = LoggerService(sink=str(tmp_path / "job.log"), format="{level} {message}")
    service = MlflowService(
        tracking_uri=with_credentials,
        experiment_name="server-run-log",
        autolog_disable=True,
        spool_dir=str(tmp_path / "spool"),
    )
    service.log_runs_like(logger_service.format, logger_service.level)
    with (
        mlflow_globals_restored(),
        logger_service,
        service,
        service.run_context(MlflowService.RunConfig(name="log", log_system_metrics=False)) as run,
    ):
        logger.info("training against {}", with_credentials)
        logging.getLogger("my_job").warning("a standard-library line")
        service.log_metrics({"loss": 0.5}, step=1)

    client = service.client()
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert client.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    path = client.download_artifacts(run.info.run_id, "run.log", str(tmp_path))
    text = Path(path).read_text()
    assert f"INFO training against {mlflow_server.replace('http://', 'http://user:***@')}\n" in text
    assert "WARNING a standard-library line\n" in text
    assert SECRET not in text
    assert list((tmp_path / "spool").iterdir()) == []  # nothing left behind
