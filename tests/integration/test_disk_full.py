"""A spool on a full disk, the store a real ``mlflow server``: nothing lost, the run FINISHED."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from regression_model_template.io.services import MlflowService
from regression_model_template.testing import mlflow_globals_restored
from tests.conftest import LogCapture, fill_disk
from tests.io.test_disk_full import FULL, STEPS, _assert_every_value_stored, _log_step

pytestmark = [pytest.mark.server, pytest.mark.slow]

RunConfig = MlflowService.RunConfig


def test_a_disk_full_mid_run_loses_nothing_on_a_tracking_server(
    mlflow_server: str, small_tmpfs: Callable[[str], Path], captured_logs: LogCapture
) -> None:
    # given a job logging to a tracking server, its spool on a 2 MB disk that fills up mid-run
    disk = small_tmpfs("2m")
    spool_dir = disk / "spool"
    with mlflow_globals_restored():
        service = MlflowService(
            tracking_uri=mlflow_server,
            spool_dir=str(spool_dir),
            experiment_name="disk-full-server",
            autolog_disable=True,
            flush_interval=0.05,
        )

        # when it logs a few thousand steps of metrics and some parameters
        with service, service.run_context(RunConfig(name="full", log_system_metrics=False)) as run:
            for step in range(STEPS):
                if step == 100:
                    filler = fill_disk(disk)
                _log_step(service, step)
                if step == STEPS // 2:
                    filler.unlink()  # room again: the second half goes to the spool again

    # then nothing was raised, every value is on the server, the run FINISHED; one warning
    _assert_every_value_stored(MlflowClient(mlflow_server), run.info.run_id)
    warnings = [m for m in captured_logs.messages("WARNING") if FULL in m]
    assert len(warnings) == 1 and str(spool_dir / run.info.run_id) in warnings[0]
