"""Credentials the server refuses (401/403) are not a refusal of the values: they wait.

A token expires, a password is rotated: the server answers 401 to every write until the job's
credentials are right again. The values did nothing wrong; they wait in the spool, one warning
says why, and ``recover`` sends them once the credentials work.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from regression_model_template.io.services import MlflowService, ServiceError
from regression_model_template.testing import mlflow_globals_restored
from tests.conftest import LogCapture
from tests.integration.recording_proxy import RecordingProxy

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.mark.parametrize("status", [401, 403])
def test_values_refused_for_credentials_wait_in_the_spool_for_recover(
    tmp_path: Path, recording_proxy: RecordingProxy, captured_logs: LogCapture, status: int
) -> None:
    # given a server that answers every write with 401/403 (expired credentials)
    spool_dir = tmp_path / "spool"
    service = MlflowService(
        tracking_uri=recording_proxy.url,
        experiment_name="credentials",
        spool_dir=str(spool_dir),
        autolog_disable=True,
        flush_interval=0.05,
        end_timeout=3,
    )
    recording_proxy.refuse_log_batch(status)

    # when a run logs 300 values and ends
    with (
        mlflow_globals_restored(),
        service,
        pytest.raises(ServiceError, match="did not take its last values within 3 s") as ended,
        service.run_context(MlflowService.RunConfig(name="expired")) as run,
    ):
        for step in range(300):
            service.log_metrics({"loss": step / 7}, step=step)
    run_id = run.info.run_id

    # then nothing reached the server, one warning said why, and the values wait in the spool
    code = "UNAUTHENTICATED" if status == 401 else "PERMISSION_DENIED"
    assert code in str(ended.value)
    warnings = [m for m in captured_logs.messages("WARNING") if "cannot be reached" in m]
    assert len(warnings) == 1 and code in warnings[0], captured_logs.records
    assert recording_proxy.metrics(run_id) == []
    assert (spool_dir / run_id).is_dir()

    # and once the credentials work again, recover sends every value once
    recording_proxy.refuse_log_batch(None)
    with mlflow_globals_restored():
        (report,) = service.recover()
    assert (report.waiting, report.refused, report.sent) == (None, None, 300), report.summary()
    received = [(m[1], m[4]) for m in recording_proxy.metrics(run_id)]
    assert sorted(received, key=lambda r: r[1]) == [("loss", s) for s in range(300)]
    assert not (spool_dir / run_id).exists()
