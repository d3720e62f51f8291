"""Whose spool it is: recovery takes a run for the store it was logged to, on the host it ran on.

Real dependencies only: MLflow on SQLite stores under ``tmp_path`` (a real ``mlflow server`` on
127.0.0.1 for credentials), child Python processes started in two project folders and killed
with SIGKILL, and the ``regression-model-template recover`` command run as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from regression_model_template.io import spool as spool_files
from regression_model_template.io.masking import mask_uri
from regression_model_template.testing import local_mlflow_server, mlflow_globals_restored
from tests.conftest import CHILD_TIMEOUT, LogCapture, recover_command
from tests.conftest import child_job as _child
from tests.conftest import wait_until as _wait_until
from tests.conftest import whole_lines as _lines
from tests.io.test_spool import (
    _LOGS_UNTIL_KILLED,
    RunConfig,
    _explain,
    _history,
    _orphan_spool,
    _service,
    _status,
)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

DEFAULT_STORE = "sqlite:///mlruns/mlflow.db"  # the local profile's, relative to each project
SECRET = "s3cret-Pa55"


def _project(root: Path, name: str, template: Path) -> Path:
    """A project folder with its own default store (the schema copied in, to save seconds)."""
    folder = root / name
    (folder / "mlruns").mkdir(parents=True)
    shutil.copyfile(template, folder / "mlruns" / "mlflow.db")
    return folder


def _client(project: Path) -> MlflowClient:
    """A client of the project's default store, named by its absolute path (one per file)."""
    return MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")


_STARTS = """
service.start()
service.stop()
"""


# %% two projects, each on the default relative store, one spool folder


def test_a_job_killed_in_one_project_is_recovered_only_in_that_project(
    tmp_path: Path, _mlflow_template_store: Path
) -> None:
    # given projects A and B, each on `sqlite:///mlruns/mlflow.db` in its own folder, sharing
    # the per-user spool folder; a job in A logging, killed with SIGKILL
    project_a = _project(tmp_path, "a", _mlflow_template_store)
    project_b = _project(tmp_path, "b", _mlflow_template_store)
    spool_dir = tmp_path / "spool"
    with _child(project_a, "killed", _LOGS_UNTIL_KILLED, DEFAULT_STORE, spool_dir) as (
        process,
        progress,
    ):
        log = project_a / "killed.log"
        _wait_until(lambda: len(_lines(progress)) > 500, process, "500 values", log)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(CHILD_TIMEOUT) == -signal.SIGKILL
    run_id = _lines(progress)[0]
    returned = int(_lines(progress)[-1])
    folder = spool_dir / run_id
    assert folder.is_dir()

    # when a job starts in B, then `recover` runs in B
    with _child(project_b, "starts", _STARTS, DEFAULT_STORE, spool_dir) as (process, _):
        assert process.wait(CHILD_TIMEOUT) == 0
    started_b = (project_b / "starts.log").read_text(errors="replace")
    recover_b = recover_command(project_b, DEFAULT_STORE, spool_dir)

    # then B recovered nothing and warned nothing; A's spool is untouched
    assert "spool" not in started_b and "WARNING" not in started_b, started_b
    assert recover_b.returncode == 0, _explain(recover_b)
    assert recover_b.stdout == "nothing to recover for this store\n", _explain(recover_b)
    assert folder.is_dir()
    assert _client(project_b).search_runs(["0", "1"]) == []

    # and `recover` in A sends the run's values and ends it KILLED
    recover_a = recover_command(project_a, DEFAULT_STORE, spool_dir)
    assert recover_a.returncode == 0, _explain(recover_a)
    assert recover_a.stdout.startswith(f"run {run_id}: "), _explain(recover_a)
    client_a = _client(project_a)
    assert _status(client_a, run_id) == "KILLED"
    assert len(_history(client_a, run_id, "loss")) >= returned
    assert not folder.exists()


def _make_legacy(folder: Path) -> None:
    """Rewrite ``run.json`` as the previous version wrote it: the URI's text, no host."""
    info = spool_files.run_info(folder)
    legacy = {key: info[key] for key in ("run_id", "store", "pid")}
    (folder / spool_files.RUN).write_text(json.dumps(legacy))


def test_a_spool_of_the_previous_version_on_a_relative_store_goes_where_its_run_is(
    tmp_path: Path, _mlflow_template_store: Path
) -> None:
    # given a spool left by the previous version (the URI's text only) for a run of project A,
    # both projects on the relative default store
    project_a = _project(tmp_path, "a", _mlflow_template_store)
    project_b = _project(tmp_path, "b", _mlflow_template_store)
    client_a = _client(project_a)
    run_id = client_a.create_run("0").info.run_id
    spool_dir = tmp_path / "spool"
    folder = _orphan_spool(spool_dir, run_id, DEFAULT_STORE, range(5))
    _make_legacy(folder)

    # when `recover` runs in B, then in A
    recover_b = recover_command(project_b, DEFAULT_STORE, spool_dir)
    left_after_b = folder.is_dir()
    recover_a = recover_command(project_a, DEFAULT_STORE, spool_dir)

    # then B, whose store has no such run, leaves it quietly; A, whose store has it, takes it
    assert recover_b.stdout == "nothing to recover for this store\n", _explain(recover_b)
    assert left_after_b
    assert recover_a.returncode == 0, _explain(recover_a)
    assert recover_a.stdout == f"run {run_id}: 6 value(s) sent, ended KILLED\n"
    assert len(_history(client_a, run_id, "loss")) == 5


# %% one store, named two ways


@pytest.mark.parametrize("written", ["relative", "through a link"])
def test_one_store_named_two_ways_is_one_store_for_recovery(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    # given a run in a store, and the spool its dead job left with the store's URI written
    # another way than this configuration writes it
    client = MlflowClient(mlflow_store)
    run_id = client.create_run("0").info.run_id
    database = Path(mlflow_store.removeprefix("sqlite:///"))
    if written == "relative":
        monkeypatch.chdir(database.parent.parent)  # the job ran from the store's project folder
        uri = f"sqlite:///../{database.parent.parent.name}/mlruns/mlflow.db"
    else:
        (tmp_path / "link").symlink_to(database.parent)
        uri = f"sqlite:///{tmp_path}/link/mlflow.db"
    spool_dir = tmp_path / "spool"
    folder = _orphan_spool(spool_dir, run_id, uri, range(5))
    monkeypatch.chdir(tmp_path.parent)  # this process runs from elsewhere

    # when a service configured with the absolute URI recovers
    reports = _service(mlflow_store, spool_dir).recover()

    # then it took the run: one store
    assert [(r.run_id, r.sent, r.status) for r in reports] == [(run_id, 6, "KILLED")]
    assert _status(client, run_id) == "KILLED"
    assert not folder.exists()


@pytest.mark.server
@pytest.mark.slow
def test_a_server_reached_with_other_credentials_is_the_same_store(tmp_path: Path) -> None:
    # given a tracking server (it accepts and ignores basic auth), a run that alice's job
    # logged to before it died, its spool left behind
    root = tmp_path / "server"
    root.mkdir()
    spool_dir = tmp_path / "spool"
    with local_mlflow_server(root) as url, mlflow_globals_restored():
        alice = url.replace("http://", f"http://alice:{SECRET}@")
        bob = url.replace("http://", f"http://bob:{SECRET}x@") + "/"
        client = MlflowClient(url)
        run_id = client.create_run("0").info.run_id
        folder = _orphan_spool(spool_dir, run_id, mask_uri(alice), range(5))
        recorded = (folder / spool_files.RUN).read_text()

        # when bob's configuration (other user, other password, a trailing "/") recovers
        reports = _service(bob, spool_dir).recover()

        # then it took the run; the spool never held a password
        assert [(r.run_id, r.sent, r.status) for r in reports] == [(run_id, 6, "KILLED")]
        assert _status(client, run_id) == "KILLED"
    assert SECRET not in recorded


# %% runs of another host


def _from_host(folder: Path, host: str) -> None:
    """Rewrite ``run.json`` as a job on ``host`` writes it (a home folder several share)."""
    info = spool_files.run_info(folder)
    (folder / spool_files.RUN).write_text(json.dumps({**info, "host": host}))


def test_a_run_of_another_host_is_left_alone_until_recover_is_told_to_take_it(
    tmp_path: Path, mlflow_store: str, captured_logs: LogCapture
) -> None:
    # given a run of this store whose spool another machine wrote (its job may still live)
    client = MlflowClient(mlflow_store)
    run_id = client.create_run("0").info.run_id
    spool_dir = tmp_path / "spool"
    folder = _orphan_spool(spool_dir, run_id, mlflow_store, range(5))
    _from_host(folder, "gpu-node-7")

    # when a job starts here, and `recover` runs here without naming the host
    with _service(mlflow_store, spool_dir):
        pass
    plain = recover_command(tmp_path, mlflow_store, spool_dir)

    # then neither touched it, and `recover` said, in one line, that it was left and how to take it
    assert not [m for m in captured_logs.messages("INFO") if "Recovered" in m]
    assert captured_logs.messages("WARNING") == []
    assert folder.is_dir()
    assert _status(client, run_id) == "RUNNING"
    assert plain.returncode == 0, _explain(plain)
    assert plain.stdout == (
        "left 1 run(s) of other hosts in the spool (1 of gpu-node-7): "
        "`recover --host NAME` takes a host's runs once its jobs are dead\n"
    ), _explain(plain)

    # and `recover --host gpu-node-7` takes it
    taken = recover_command(tmp_path, mlflow_store, spool_dir, "--host", "gpu-node-7")
    assert taken.returncode == 0, _explain(taken)
    assert taken.stdout == f"run {run_id}: 6 value(s) sent, ended KILLED\n", _explain(taken)
    assert _status(client, run_id) == "KILLED"
    assert not folder.exists()


# %% durability


def test_the_writer_puts_the_spool_on_the_disk_before_sending_never_the_caller(
    tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given fdatasync watched at the operating-system boundary
    synced: list[tuple[str, str]] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append((threading.current_thread().name, os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    # when a run logs values
    spool_dir = tmp_path / "spool"
    service = _service(mlflow_store, spool_dir, flush_interval=0.05)
    with service, service.run_context(RunConfig(name="sync", log_system_metrics=False)) as run:
        for step in range(2500):
            service.log_metrics({"loss": float(step)}, step=step)

    # then the run's values file was synced, only ever by the background writer
    values = str(spool_dir / run.info.run_id / spool_files.VALUES)
    assert ("mlflow-batch-writer", values) in synced
    assert {thread for thread, _ in synced} == {"mlflow-batch-writer"}
    assert len(_history(service.client(), run.info.run_id, "loss")) == 2500
