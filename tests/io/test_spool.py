"""The spool: nothing logged is lost when the process dies, and recovery sends it exactly once.

Real dependencies only: MLflow on SQLite stores under ``tmp_path`` (one real ``mlflow server``
on 127.0.0.1 for the credentials test), child Python processes killed with SIGKILL, and the
``regression-model-template recover`` command run as a user would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time
import typing as T
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from regression_model_template.io import spool as spool_files
from regression_model_template.io.services import MlflowService, ServiceError
from regression_model_template.testing import (
    local_mlflow_server,
    mlflow_globals_restored,
)
from tests.conftest import CHILD_TIMEOUT, recover_command
from tests.conftest import child_job as _child
from tests.conftest import wait_until as _wait_until
from tests.conftest import whole_lines as _lines

# These machines have no internet: keep MLflow's telemetry quiet in this process too.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

RunConfig = MlflowService.RunConfig
SECRET = "s3cret-Pa55"


# %% helpers


def _service(store: str, spool_dir: Path, **settings: T.Any) -> MlflowService:
    return MlflowService(
        tracking_uri=store,
        spool_dir=str(spool_dir),
        experiment_name=settings.pop("experiment_name", "spool"),
        autolog_disable=True,
        **settings,
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _status(client: MlflowClient, run_id: str) -> str:
    return str(client.get_run(run_id).info.status)


def _entries(folder: Path) -> list[str]:
    """What is inside ``folder`` (nothing when it does not exist)."""
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# %% a process killed in the middle of a run


_LOGS_UNTIL_KILLED = """
fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
service.start()
with service.run_context(RunConfig(name="killed", log_system_metrics=False)) as run:
    os.write(fd, f"{run.info.run_id}\\n".encode())
    service.log_params({"alpha": 0.5})
    step = 0
    while True:
        service.log_metrics({"loss": step / 7}, step=step)
        step += 1
        os.write(fd, f"{step}\\n".encode())  # this many log_metrics calls have returned
        if step % 100 == 0:
            time.sleep(0.002)  # a training loop does some work between its values
"""


@pytest.mark.parametrize("recover_with", ["service", "command"])
def test_sigkill_loses_no_value_whose_call_returned(
    tmp_path: Path, mlflow_store: str, recover_with: str
) -> None:
    # given a child logging in a loop, killed with SIGKILL once the store has taken some values
    spool_dir = tmp_path / "spool"
    with _child(tmp_path, "killed", _LOGS_UNTIL_KILLED, mlflow_store, spool_dir) as (
        process,
        progress,
    ):
        log = tmp_path / "killed.log"
        _wait_until(lambda: len(_lines(progress)) > 1, process, "its first value", log)
        run_id = _lines(progress)[0]
        folder = spool_dir / run_id
        _wait_until(
            lambda: spool_files.read_sent(folder) > 0 and len(_lines(progress)) > 3000,
            process,
            "3,000 values with some of them written to the store",
            log,
        )
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(CHILD_TIMEOUT) == -signal.SIGKILL
    returned = int(_lines(progress)[-1])  # log_metrics calls that had returned
    client = MlflowClient(mlflow_store)
    assert _status(client, run_id) == "RUNNING"  # what SIGKILL leaves without recovery
    assert folder.is_dir()

    # when its spool is recovered
    if recover_with == "service":
        reports = _service(mlflow_store, spool_dir).recover()
        assert [(r.run_id, r.status, r.waiting, r.damage) for r in reports] == [
            (run_id, "KILLED", None, ())
        ]
        assert reports[0].summary().startswith(f"run {run_id}: ")
        assert _service(mlflow_store, spool_dir).recover() == []
    else:
        result = recover_command(tmp_path, mlflow_store, spool_dir)
        assert result.returncode == 0, _explain(result)
        # The kernel copies a write page by page and SIGKILL can stop it at a page boundary
        # (seen in CI: 15 bytes up to offset 39 * 4096): the record in progress is then cut.
        cut = (
            r"; the record being written when the process died was cut "
            r"\(\d+ bytes, its call had not returned\): dropped"
        )
        assert re.fullmatch(
            rf"run {run_id}: \d+ value\(s\) sent, ended KILLED({cut})?\n", result.stdout
        ), _explain(result)
        again = recover_command(tmp_path, mlflow_store, spool_dir)
        assert again.returncode == 0, _explain(again)
        assert again.stdout == "nothing to recover for this store\n", _explain(again)

    # then every value whose call returned is in the store exactly once, and the run is KILLED
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    duplicates = [value for value, count in Counter(history).items() if count > 1]
    assert duplicates == []
    assert set(history) >= {(step, step / 7) for step in range(returned)}
    # at most the one call in progress at the kill went further than the progress file
    assert returned <= len(history) <= returned + 1
    assert client.get_run(run_id).data.params == {"alpha": "0.5"}
    assert _status(client, run_id) == "KILLED"
    assert not folder.exists()


# %% what a run leaves in the spool when it ends


def test_a_run_that_returns_leaves_no_spool_folder(tmp_path: Path, mlflow_store: str) -> None:
    # given a started service spooling into tmp_path
    spool_dir = tmp_path / "spool"
    service = _service(mlflow_store, spool_dir, flush_interval=0.1)
    with service:
        # when a run logs and returns
        with service.run_context(RunConfig(name="returns", log_system_metrics=False)) as run:
            for step in range(1500):
                service.log_metrics({"loss": float(step)}, step=step)
            service.log_params({"alpha": 1})
            assert _entries(spool_dir) == [run.info.run_id]  # the spool exists while it runs

        # then its spool folder is gone as soon as the run has ended
        assert _entries(spool_dir) == []
    client = service.client()
    assert len(_history(client, run.info.run_id, "loss")) == 1500
    assert _status(client, run.info.run_id) == "FINISHED"
    assert _entries(spool_dir) == []


@pytest.mark.parametrize(
    ("error", "status"), [(ValueError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_a_run_ended_by_an_exception_leaves_no_spool_folder(
    tmp_path: Path, mlflow_store: str, error: BaseException, status: str
) -> None:
    # given a started service spooling into tmp_path
    spool_dir = tmp_path / "spool"
    service = _service(mlflow_store, spool_dir, flush_interval=0.1)
    with service:
        # when a run logs, then raises
        with (
            pytest.raises(type(error)),
            service.run_context(RunConfig(name="raises", log_system_metrics=False)) as run,
        ):
            for step in range(1500):
                service.log_metrics({"loss": float(step)}, step=step)
            raise error
        left_in_the_run = _entries(spool_dir)
    left_after_stop = _entries(spool_dir)

    # then every value is stored, the run has its status, and the spool folder is gone
    client = service.client()
    assert len(_history(client, run.info.run_id, "loss")) == 1500
    assert _status(client, run.info.run_id) == status
    assert (left_in_the_run, left_after_stop) == ([], [])


def test_stop_with_everything_sent_leaves_no_spool_folder(
    tmp_path: Path, mlflow_store: str
) -> None:
    import mlflow

    # given a job that started its own run and logged through a service with a long interval
    spool_dir = tmp_path / "spool"
    service = _service(mlflow_store, spool_dir, flush_interval=60)
    with mlflow_globals_restored():
        service.start()
        run_id = mlflow.start_run(run_name="own").info.run_id
        for step in range(10):
            service.log_metrics({"loss": float(step)}, step=step)
        assert _entries(spool_dir) == [run_id]  # spooled, not written yet

        # when the service stops with the run still open
        service.stop()

    # then stop() wrote the values, ended the run, and removed its spool
    client = service.client()
    assert len(_history(client, run_id, "loss")) == 10
    assert _status(client, run_id) == "KILLED"
    assert _entries(spool_dir) == []


# %% two processes sharing one spool folder


_HOLDS_ITS_RUN = """
fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
with service:
    with service.run_context(RunConfig(name="child", log_system_metrics=False)) as run:
        for step in range(100):
            service.log_metrics({"loss": float(step)}, step=step)
        os.write(fd, f"{run.info.run_id}\\n".encode())
        sys.stdin.readline()  # held open until the test says so
"""


def test_a_live_run_of_another_process_is_never_recovered(
    tmp_path: Path, mlflow_store: str
) -> None:
    # given a child holding its run open on a spool folder this process shares
    spool_dir = tmp_path / "spool"
    client = MlflowClient(mlflow_store)
    with _child(tmp_path, "child", _HOLDS_ITS_RUN, mlflow_store, spool_dir) as (process, progress):
        log = tmp_path / "child.log"
        _wait_until(lambda: bool(_lines(progress)), process, "its run", log)
        child_run = _lines(progress)[0]

        # when this process recovers, then starts a service and opens a run of its own
        reports = _service(mlflow_store, spool_dir).recover()
        service = _service(mlflow_store, spool_dir, flush_interval=0.05)
        with (
            service,
            service.run_context(RunConfig(name="parent", log_system_metrics=False)) as parent,
        ):
            service.log_metrics({"loss": 1.0}, step=0)
            # and another process recovers while both runs are open
            command = recover_command(tmp_path, mlflow_store, spool_dir)

            # then no recovery touched a live run
            assert reports == []
            assert command.returncode == 0, _explain(command)
            assert command.stdout == "nothing to recover for this store\n", _explain(command)
            assert _entries(spool_dir) == sorted([parent.info.run_id, child_run])
            assert _status(client, child_run) == "RUNNING"
            assert _status(client, parent.info.run_id) == "RUNNING"

            # and when the child's run returns, it is FINISHED with every value
            assert process.stdin is not None
            process.stdin.write(b"go on\n")
            process.stdin.close()
            assert process.wait(CHILD_TIMEOUT) == 0, log.read_text(errors="replace")
            assert _status(client, child_run) == "FINISHED"
            assert len(_history(client, child_run, "loss")) == 100
            assert _entries(spool_dir) == [parent.info.run_id]
            assert _status(client, parent.info.run_id) == "RUNNING"
    assert _status(client, parent.info.run_id) == "FINISHED"
    assert _history(client, parent.info.run_id, "loss") == [(0, 1.0)]
    assert _entries(spool_dir) == []


# %% the store the spool belongs to


def _orphan_spool(spool_dir: Path, run_id: str, store: str, steps: range) -> Path:
    """A run's spool as a process that died mid-run leaves it (through the spool's own API)."""
    spool = spool_files.RunSpool.create(spool_dir, run_id, store)
    spool.append({"p": [["alpha", "0.5"]]})
    for step in steps:
        spool.append({"m": [["loss", step / 7, 1_700_000_000_000 + step, step]]})
    spool.close(remove=False)
    return spool.folder


def test_a_spool_is_only_sent_to_the_store_it_was_logged_for(
    tmp_path: Path, mlflow_store: str, logger_caplog: pytest.LogCaptureFixture
) -> None:
    # given a run in store A, a copy of A as store B (the same run ID exists in both),
    # and the spool A's dead process left for that run
    client_a = MlflowClient(mlflow_store)
    run_id = client_a.create_run(client_a.create_experiment("a")).info.run_id
    other = tmp_path / "other" / "mlflow.db"
    other.parent.mkdir()
    shutil.copyfile(mlflow_store.removeprefix("sqlite:///"), other)
    store_b = f"sqlite:///{other}"
    client_b = MlflowClient(store_b)
    spool_dir = tmp_path / "spool"
    folder = _orphan_spool(spool_dir, run_id, mlflow_store, range(5))

    # when store B's service recovers and starts on the same spool folder
    reports = _service(store_b, spool_dir).recover()
    with _service(store_b, spool_dir):
        pass

    # then B got nothing and A's spool is untouched
    assert reports == []
    assert folder.is_dir()
    assert _history(client_b, run_id, "loss") == []
    assert client_b.get_run(run_id).data.params == {}
    assert _status(client_b, run_id) == "RUNNING"

    # and A's own service sends it when it starts, with the values' own steps and timestamps
    with _service(mlflow_store, spool_dir):
        pass
    stored = client_a.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value, m.timestamp) for m in stored) == [
        (step, step / 7, 1_700_000_000_000 + step) for step in range(5)
    ]
    assert client_a.get_run(run_id).data.params == {"alpha": "0.5"}
    assert _status(client_a, run_id) == "KILLED"
    assert not folder.exists()
    assert f"Recovered from the spool: run {run_id}: 6 value(s) sent, ended KILLED" in (
        logger_caplog.messages
    )


# %% a damaged spool


def _cut_last_line(folder: Path) -> None:
    with (folder / spool_files.VALUES).open("ab") as values:
        values.write(b'{"m":[["loss",0.5,17000')


def _garbage_in_the_middle(folder: Path) -> None:
    with (folder / spool_files.VALUES).open("ab") as values:
        values.write(b"\x00\x00\xff garbage\n")
        values.write(b'{"m":[["loss",9.0,1700000000099,99]]}\n{"end":"FINISHED"}\n')


def _a_record_of_the_wrong_shape(folder: Path) -> None:
    with (folder / spool_files.VALUES).open("ab") as values:
        values.write(b'{"m":[["loss",9.0]]}\n')
        values.write(b'{"m":[["loss",9.0,1700000000099,99]]}\n{"end":"FINISHED"}\n')


@pytest.mark.parametrize(
    ("damage", "described"),
    [
        (_garbage_in_the_middle, "unreadable line at offset"),
        (_a_record_of_the_wrong_shape, "unreadable line at offset"),
    ],
)
def test_a_damaged_spool_is_recovered_up_to_the_damage(
    tmp_path: Path,
    mlflow_store: str,
    damage: Callable[[Path], None],
    described: str,
) -> None:
    # given a dead process's spool with 10 whole values, then damage
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("damaged")).info.run_id
    spool_dir = tmp_path / "spool"
    folder = _orphan_spool(spool_dir, run_id, mlflow_store, range(10))
    damage(folder)

    # when it is recovered
    (report,) = _service(mlflow_store, spool_dir).recover()

    # then everything before the damage is sent, the damage is reported, the run is KILLED
    assert report.waiting is None, report.summary()
    assert len(report.damage) == 1 and described in report.damage[0], report.summary()
    assert f"damaged spool, {report.damage[0]}" in report.summary()
    assert report.sent == 11  # the parameter and 10 values
    assert _history(client, run_id, "loss") == [(step, step / 7) for step in range(10)]
    assert client.get_run(run_id).data.params == {"alpha": "0.5"}
    assert _status(client, run_id) == "KILLED"
    assert not folder.exists()


def test_a_record_cut_by_the_kill_is_dropped_and_said_plainly(
    tmp_path: Path, mlflow_store: str
) -> None:
    # given a dead process's spool with 10 whole values, then a record cut mid-write
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("cut")).info.run_id
    spool_dir = tmp_path / "spool"
    folder = _orphan_spool(spool_dir, run_id, mlflow_store, range(10))
    _cut_last_line(folder)

    # when it is recovered
    (report,) = _service(mlflow_store, spool_dir).recover()

    # then the whole values are sent, the cut record is dropped and said to be, not "damage"
    assert (report.waiting, report.damage, report.cut, report.sent) == (None, (), 23, 11)
    assert report.summary() == (
        f"run {run_id}: 11 value(s) sent, ended KILLED; the record being written when the "
        "process died was cut (23 bytes, its call had not returned): dropped"
    )
    assert _history(client, run_id, "loss") == [(step, step / 7) for step in range(10)]
    assert _status(client, run_id) == "KILLED"
    assert not folder.exists()


def test_the_recover_command_reports_damage_without_a_traceback(
    tmp_path: Path, mlflow_store: str
) -> None:
    # given a dead process's spool with garbage after 3 values
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("damaged")).info.run_id
    spool_dir = tmp_path / "spool"
    _garbage_in_the_middle(_orphan_spool(spool_dir, run_id, mlflow_store, range(3)))

    # when the command recovers it
    result = recover_command(tmp_path, mlflow_store, spool_dir)

    # then one line says what was sent and what was damaged
    assert result.returncode == 0, _explain(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, _explain(result)
    assert lines[0].startswith(f"run {run_id}: 4 value(s) sent, ended KILLED; damaged spool, ")
    assert "unreadable line at offset" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert len(_history(client, run_id, "loss")) == 3


def test_a_lost_acknowledgement_only_resends(tmp_path: Path, mlflow_store: str) -> None:
    # given a spool whose values were all sent, but whose 'sent' mark is garbage
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("resent")).info.run_id
    spool_dir = tmp_path / "spool"
    folder = _orphan_spool(spool_dir, run_id, mlflow_store, range(20))
    (report,) = _service(mlflow_store, spool_dir).recover()
    assert report.sent == 21
    folder = _orphan_spool(spool_dir, run_id, mlflow_store, range(20))
    (folder / spool_files.SENT).write_text("not a number")

    # when it is recovered again from the start
    (again,) = _service(mlflow_store, spool_dir).recover()

    # then every value is still stored once: the store ignores exact duplicates
    assert again.waiting is None, again.summary()
    assert _history(client, run_id, "loss") == [(step, step / 7) for step in range(20)]
    assert again.status == "KILLED"


# %% a spool folder that cannot be written


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unwritable_spool_dir_fails_start(tmp_path: Path, mlflow_store: str, where: str) -> None:
    # given a spool_dir that is a regular file, or lies under one (root ignores chmod)
    regular = tmp_path / "not-a-folder"
    regular.write_text("a file")
    spool_dir = regular if where == "a file" else regular / "spool"
    service = _service(mlflow_store, spool_dir)

    # when the service starts or recovers, then the error names the setting and the folder
    with pytest.raises(ServiceError, match=r"MlflowService\.spool_dir") as started:
        service.start()
    assert str(spool_dir) in str(started.value)
    with pytest.raises(ServiceError, match=r"MlflowService\.spool_dir"):
        service.recover()
    service.stop()  # harmless: it never started
    assert "MLFLOW_TRACKING_URI" not in os.environ or os.environ["MLFLOW_TRACKING_URI"] != (
        mlflow_store
    )


def test_the_recover_command_names_an_unwritable_spool_dir(
    tmp_path: Path, mlflow_store: str
) -> None:
    regular = tmp_path / "not-a-folder"
    regular.write_text("a file")

    result = recover_command(tmp_path, mlflow_store, regular / "spool")

    assert result.returncode == 1, _explain(result)
    assert result.stderr.startswith("error: MlflowService.spool_dir: "), _explain(result)
    assert "Traceback" not in result.stdout + result.stderr


# %% no credentials on disk


@pytest.mark.server
@pytest.mark.slow
def test_the_spool_holds_no_credentials_and_only_its_user_can_read_it(tmp_path: Path) -> None:
    # given a tracking server reached with a password (it accepts and ignores basic auth)
    root = tmp_path / "server"
    root.mkdir()
    spool_dir = tmp_path / "spool"
    with local_mlflow_server(root) as url, mlflow_globals_restored():
        uri = url.replace("http://", f"http://user:{SECRET}@")
        service = _service(uri, spool_dir, flush_interval=0.05)

        # when a run logs values, and the spool is read while the run is open
        with service, service.run_context(RunConfig(name="secret", log_system_metrics=False)):
            service.log_params({"alpha": 0.5})
            for step in range(50):
                service.log_metrics({"loss": float(step)}, step=step)
            time.sleep(0.3)  # some values sent: the 'sent' mark exists too
            files = {path: path.read_bytes() for path in spool_dir.rglob("*") if path.is_file()}
            modes = {
                path: (path.is_dir(), stat.S_IMODE(path.stat().st_mode))
                for path in [spool_dir, *spool_dir.rglob("*")]
            }
            (run_folder,) = spool_dir.iterdir()
            info = spool_files.run_info(run_folder)

    # then no file holds the password, the store is recorded masked, only the user can read
    assert {path.name for path in files} >= {"run.json", "values.jsonl", "lock", "sent"}
    for path, content in files.items():
        assert SECRET.encode() not in content, path
    assert info["store"] == url.replace("http://", "http://user:***@")
    for path, (is_dir, mode) in modes.items():
        assert mode == (0o700 if is_dir else 0o600), (path, oct(mode))


# %% the spool's own bookkeeping


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real disk that fills up (root only), unmounted even on failure."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_record_the_full_disk_cannot_hold_is_taken_back(small_disk: Path) -> None:
    # given a spool on a disk that fills up, and records that straddle its pages
    spool = spool_files.RunSpool.create(small_disk, "run1", store="sqlite:///m.db")
    record = {"m": [["loss", 0.5, 1700000000000, step] for step in range(40)]}  # ~1.3 kB

    # when records are appended until the disk is full
    appended = 0
    with pytest.raises(OSError) as full:
        while True:
            spool.append(record)
            appended += 1

    # then the call raised ENOSPC, and the spool holds every whole record and nothing else
    assert full.value.errno == 28
    data = (spool.folder / spool_files.VALUES).read_bytes()
    assert spool.written == len(data) and data.endswith(b"\n")
    assert len(list(spool_files.read_records(spool.folder, 0))) == appended
    spool.close(remove=False)


def test_a_signal_during_appends_cannot_put_the_size_out_of_step(tmp_path: Path) -> None:
    # given a spool, and a signal whose handler raises every 50 us (like SIGTERM in a job)
    spool = spool_files.RunSpool.create(tmp_path, "run1", store="sqlite:///m.db")

    class Interrupted(Exception):
        pass

    armed = [False]  # raise inside append only, like a handler would in the job's call

    def interrupt(signum: int, frame: object) -> None:
        if armed[0]:
            armed[0] = False
            raise Interrupted()

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.00005, 0.00005)
    interruptions = 0
    try:
        # when records are appended while the handler keeps raising
        for step in range(20_000):
            try:
                armed[0] = True
                spool.append({"m": [["loss", 0.5, 1700000000000, step]]})
                armed[0] = False
            except Interrupted:
                interruptions += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)

    # then what the spool says it holds is what the file holds, all of it whole records
    assert interruptions > 100
    size = (spool.folder / spool_files.VALUES).stat().st_size
    assert spool.written == size
    assert list(spool_files.read_records(spool.folder, 0))[-1][0] == size
    spool.close(remove=False)
