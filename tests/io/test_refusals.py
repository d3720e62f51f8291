"""What the store refuses costs only the values refused: found, set aside, reported by key.

MLflow's stores refuse a parameter changed within a run, a name they will not take, and any
value of a run that is deleted or has ended. Every other value of the same batch, the same run
and the same job is stored.
"""

from __future__ import annotations

import json
import threading
import time
import typing as T
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from regression_model_template.io import spool as spool_files
from regression_model_template.io.batching import BatchWriter, WriteError
from regression_model_template.io.services import MlflowService, ServiceError
from tests.conftest import recover_command
from tests.io.test_spool import _entries, _explain, _history, _orphan_spool, _service, _status

RunConfig = MlflowService.RunConfig


def _set_aside(spool_dir: Path, run_id: str) -> list[dict[str, T.Any]]:
    path = spool_dir / spool_files.REFUSED / f"{run_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_changed_parameter_costs_only_itself(tmp_path: Path, mlflow_store: str) -> None:
    # given a 3,000-step loop that changes a parameter at step 1,500 (the store refuses that)
    spool_dir = tmp_path / "spool"
    service = _service(mlflow_store, spool_dir, flush_interval=0.1, write_retries=1)
    with (
        service,
        pytest.raises(ServiceError) as failed,
        service.run_context(RunConfig(name="changed", log_system_metrics=False)) as run,
    ):
        service.log_params({"alpha": 1})
        for step in range(3000):
            service.log_metrics({"loss": step / 7}, step=step)
            if step == 1500:
                service.log_params({"alpha": 2})  # accepted: only the store can tell

    # then every loss value and the first alpha are stored, the run FAILED
    client = service.client()
    run_id = run.info.run_id
    assert _history(client, run_id, "loss") == [(step, step / 7) for step in range(3000)]
    assert client.get_run(run_id).data.params == {"alpha": "1"}
    assert _status(client, run_id) == "FAILED"
    # and the job's error names the key, the store's reason and where the value was set aside
    message = str(failed.value)
    assert f"run {run_id} ended FAILED: 1 value(s) refused by the store" in message
    assert "param 'alpha'" in message and "Changing param values is not allowed" in message
    assert str(spool_dir / spool_files.REFUSED / f"{run_id}.jsonl") in message
    (aside,) = _set_aside(spool_dir, run_id)
    assert aside["row"] == ["alpha", "2"]
    # and nothing is left for recovery to retry for ever
    assert _entries(spool_dir) == [spool_files.REFUSED]


def test_values_of_a_run_the_store_no_longer_takes_are_set_aside_not_fatal(
    tmp_path: Path, mlflow_store: str
) -> None:
    # given a writer logging to a run that does not exist, and to one that does
    client = MlflowClient(mlflow_store)
    good = client.create_run(client.create_experiment("refusals")).info.run_id
    writer = BatchWriter(client, tmp_path, retries=2, backoff=0.01)

    # when both get values
    writer.log_metrics("no-such-run", {"loss": 1.0}, step=3)
    writer.flush()  # returns: a refused value is not waited for
    writer.log_metrics(good, {"loss": 2.0})  # later calls still work

    # then the refused value is named, set aside, and close() tells whoever closes
    refused = writer.refusals("no-such-run")
    assert refused is not None and "metric 'loss'" in refused and "no-such-run" in refused
    with pytest.raises(WriteError, match=r"run no-such-run: 1 value\(s\) refused by the store"):
        writer.close()
    assert _set_aside(tmp_path, "no-such-run")[0]["row"][::3] == ["loss", 3]
    # and the other run's value is stored
    assert _history(client, good, "loss") == [(0, 2.0)]


def test_a_run_deleted_for_a_moment_loses_nothing(tmp_path: Path, mlflow_store: str) -> None:
    # given a run deleted while values wait to be written (the store refuses them) ...
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("transient")).info.run_id
    client.delete_run(run_id)
    writer = BatchWriter(client, tmp_path, retries=3, backoff=2.0)
    writer.log_metrics(run_id, {"loss": 1.0})
    flushing = threading.Thread(target=writer.flush)  # first attempt now, retry after 2 s
    flushing.start()
    time.sleep(0.3)
    client.restore_run(run_id)  # ... and restored before the first retry
    flushing.join()

    writer.close()

    # then the retry stored the value, and nothing was set aside
    assert _history(client, run_id, "loss") == [(0, 1.0)]
    assert writer.refusals(run_id) is None


def _poison(folder: Path) -> None:
    """A record with a name the store refuses between good values, then a FINISHED end."""
    with (folder / spool_files.VALUES).open("ab") as values:
        rows = [["loss", step / 7, 1_700_000_000_000 + step, step] for step in range(10, 510)]
        rows.insert(250, ["acc@top1", 0.5, 1_700_000_000_000, 1])
        values.write(json.dumps({"m": rows}).encode() + b"\n")
        values.write(b'{"m":[["loss",9.0,1700000000999,999]]}\n{"end":"FINISHED"}\n')


def test_a_poison_record_in_the_spool_costs_only_its_value(
    tmp_path: Path, mlflow_store: str
) -> None:
    # given a dead process's spool: 10 values, a record of 501 with one the store refuses, more
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("poison")).info.run_id
    spool_dir = tmp_path / "spool"
    _poison(_orphan_spool(spool_dir, run_id, mlflow_store, range(10)))

    # when it is recovered
    (report,) = _service(mlflow_store, spool_dir).recover()

    # then every other value is stored, the refused one named and set aside, the run FAILED
    assert report.waiting is None, report.summary()
    assert report.sent == 1 + 10 + 500 + 1
    assert len(_history(client, run_id, "loss")) == 511
    assert client.get_run(run_id).data.metrics.keys() == {"loss"}
    assert report.refused is not None and "metric 'acc@top1'" in report.refused
    assert report.status == _status(client, run_id) == "FAILED"  # it had recorded FINISHED
    assert report.refused in report.summary()
    assert _set_aside(spool_dir, run_id)[0]["row"][0] == "acc@top1"


def test_the_recover_command_names_a_refused_value_and_exits_1(
    tmp_path: Path, mlflow_store: str
) -> None:
    # given a dead process's spool holding a value the store refuses
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("poison")).info.run_id
    spool_dir = tmp_path / "spool"
    _poison(_orphan_spool(spool_dir, run_id, mlflow_store, range(3)))

    # when the command recovers it
    result = recover_command(tmp_path, mlflow_store, spool_dir)

    # then its one line names the key and the reason, and the exit code says not all went in
    assert result.returncode == 1, _explain(result)
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"run {run_id}: 505 value(s) sent, ended FAILED; 1 value(s) refused")
    assert "metric 'acc@top1'" in line and "Names may only contain" in line, line
    assert "Traceback" not in result.stdout + result.stderr
