"""A spool on a full disk: the job goes on, its values go to the store from memory, none lost.

Real dependencies only: MLflow on a SQLite store under ``tmp_path`` (a disk with room), the
spool on a small tmpfs filled up by a file (a real full disk, as root), a child Python process.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import typing as T
from collections.abc import Callable, Iterator
from pathlib import Path

from mlflow.tracking import MlflowClient

from regression_model_template.io.services import MlflowService
from tests.conftest import CHILD_TIMEOUT, LogCapture, child_job, fill_disk, whole_lines

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

RunConfig = MlflowService.RunConfig
FULL = "No space left on device"
STEPS = 3000
KEYS = ("loss", "accuracy", "lr")


def _service(store: str, spool_dir: Path, **settings: T.Any) -> MlflowService:
    return MlflowService(
        tracking_uri=store,
        spool_dir=str(spool_dir),
        experiment_name="disk-full",
        autolog_disable=True,
        flush_interval=0.05,
        **settings,
    )


def _log_step(service: MlflowService, step: int) -> None:
    service.log_metrics({key: step / (i + 1) for i, key in enumerate(KEYS)}, step=step)
    if step % 500 == 0:
        service.log_params({f"p{step}": step})


def _assert_every_value_stored(client: MlflowClient, run_id: str, steps: int = STEPS) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for i, key in enumerate(KEYS):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(step, step / (i + 1)) for step in range(steps)], key
    assert run.data.params == {f"p{step}": str(step) for step in range(0, steps, 500)}


def _disk_warnings(logs: LogCapture) -> list[str]:
    return [message for message in logs.messages("WARNING") if FULL in message]


def _values_size(folder: Path) -> int:
    path = folder / "values.jsonl"
    return path.stat().st_size if path.exists() else 0


def test_a_disk_full_mid_run_costs_the_job_nothing(
    small_tmpfs: Callable[[str], Path], mlflow_store: str, captured_logs: LogCapture
) -> None:
    # given a job whose spool is on a 2 MB disk, which fills up once the run has begun
    disk = small_tmpfs("2m")
    spool_dir = disk / "spool"
    service = _service(mlflow_store, spool_dir)

    # when it logs a few thousand steps of metrics and some parameters
    with service, service.run_context(RunConfig(name="full", log_system_metrics=False)) as run:
        for step in range(STEPS):
            if step == 100:
                fill_disk(disk)
            _log_step(service, step)

    # then nothing was raised, every value is stored, the run FINISHED
    _assert_every_value_stored(service.client(), run.info.run_id)
    # and one warning named the folder, the cause, and what a kill would lose
    [warning] = _disk_warnings(captured_logs)
    assert str(spool_dir / run.info.run_id) in warning
    assert "A kill now would lose the values held in memory (at most 100,000)" in warning


def test_a_run_started_on_a_full_disk_runs_through_memory(
    small_tmpfs: Callable[[str], Path], mlflow_store: str, captured_logs: LogCapture
) -> None:
    # given a spool disk that is full before the run starts (its spool cannot be created)
    disk = small_tmpfs("2m")
    spool_dir = disk / "spool"
    service = _service(mlflow_store, spool_dir)
    with service:
        fill_disk(disk)

        # when a run logs its values
        with service.run_context(RunConfig(name="no spool", log_system_metrics=False)) as run:
            for step in range(STEPS):
                _log_step(service, step)

    # then the run started, and ended FINISHED with every value; one warning said why
    _assert_every_value_stored(service.client(), run.info.run_id)
    [warning] = _disk_warnings(captured_logs)
    assert str(spool_dir / run.info.run_id) in warning


def test_values_go_back_to_the_spool_when_the_disk_has_room_again(
    small_tmpfs: Callable[[str], Path], mlflow_store: str, captured_logs: LogCapture
) -> None:
    # given a run logging on a spool disk that is full
    disk = small_tmpfs("2m")
    spool_dir = disk / "spool"
    service = _service(mlflow_store, spool_dir)
    with service, service.run_context(RunConfig(name="room", log_system_metrics=False)) as run:
        folder = spool_dir / run.info.run_id
        filler = fill_disk(disk)
        step = 0
        while not _disk_warnings(captured_logs):
            _log_step(service, step)
            step += 1
        size_when_full = _values_size(folder)

        # when the disk has room again, and the job goes on logging (as a loop does, with work
        # between its steps)
        filler.unlink()
        while _values_size(folder) <= size_when_full:
            assert step < 100 * STEPS, "the values never went back to the spool"
            _log_step(service, step)
            step += 1
            time.sleep(0.001)

    # then the spool grew again, an info line said so, and every value is stored
    back = [m for m in captured_logs.messages("INFO") if "can be written again" in m]
    assert back == [f"The spool {folder} can be written again: values go to it again"]
    assert len(_disk_warnings(captured_logs)) == 1
    _assert_every_value_stored(service.client(), run.info.run_id, step)


@contextlib.contextmanager
def _store_busy(store: str) -> Iterator[None]:
    """Hold the SQLite store's write lock (the writer cannot write) until the block ends."""
    busy = sqlite3.connect(store.removeprefix("sqlite:///"), isolation_level=None)
    try:
        busy.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        busy.close()  # rolls back: the store is free again


def test_a_full_memory_makes_log_metrics_wait_for_the_store(
    small_tmpfs: Callable[[str], Path], mlflow_store: str
) -> None:
    # given a full spool disk, room in memory for 50 values, and a store that cannot be written
    disk = small_tmpfs("2m")
    limit, steps = 50, 400
    service = _service(mlflow_store, disk / "spool", full_disk_memory=limit)
    returned = [0]
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            for step in range(steps):
                service.log_metrics({"loss": step / 7}, step=step)
                returned[0] += 1
        except BaseException as error:
            errors.append(error)

    with service, service.run_context(RunConfig(name="bounded", log_system_metrics=False)) as run:
        fill_disk(disk)
        with _store_busy(mlflow_store):
            # when the job logs more values than memory holds
            logging = threading.Thread(target=loop)
            logging.start()
            deadline = time.monotonic() + CHILD_TIMEOUT
            while returned[0] < limit and logging.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # the loop's chance to run past the limit, if it could

            # then the call waits (no error, nothing dropped), with at most the limit held
            assert logging.is_alive(), errors
            assert limit <= returned[0] <= limit + 1
        # and once the store takes values again, the loop goes on to its end
        logging.join(CHILD_TIMEOUT)
        assert not logging.is_alive() and not errors

    history = service.client().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(steps))


_LOGS_ON_A_FULL_DISK = f"""
import pathlib
with service:
    with service.run_context(RunConfig(name="child", log_system_metrics=False)) as run:
        pathlib.Path(progress).write_text(run.info.run_id + "\\n")
        for step in range({STEPS}):
            values = {{"loss": step / 1, "accuracy": step / 2, "lr": step / 3}}
            service.log_metrics(values, step=step)
            if step % 500 == 0:
                service.log_params({{f"p{{step}}": step}})
print("job done")
"""


def test_a_job_on_a_full_spool_disk_exits_0_with_its_run_finished(
    tmp_path: Path, small_tmpfs: Callable[[str], Path], mlflow_store: str
) -> None:
    # given a job in its own process, whose spool disk is full
    disk = small_tmpfs("2m")
    fill_disk(disk)
    with child_job(tmp_path, "job", _LOGS_ON_A_FULL_DISK, mlflow_store, disk / "spool") as (
        process,
        progress,
    ):
        # when it runs to its end
        process.wait(CHILD_TIMEOUT)

    # then it exits 0, its run FINISHED with every value
    output = (tmp_path / "job.log").read_text()
    assert process.returncode == 0, output
    assert "job done" in output and "Traceback" not in output
    assert [line for line in output.splitlines() if "WARNING" in line and FULL in line], output
    assert output.count("Cannot write the spool") == 1, output
    [run_id] = whole_lines(progress)
    _assert_every_value_stored(MlflowClient(mlflow_store), run_id)
