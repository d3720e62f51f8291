"""``make server`` as root from a folder the ``postgres`` user cannot reach (a closed home).

As root, PostgreSQL's cluster belongs to the ``postgres`` user. Under ``/root`` (0700, the usual
place in a container) that user cannot reach the folder, so the cluster lives under PostgreSQL's
own data root; the test removes what it made there.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from regression_model_template.server.postgres import cluster_folder, cluster_name, postgres_bin
from regression_model_template.server.tracking_server import running
from regression_model_template.testing import clean_environ, free_port
from tests.integration.conftest import (
    lines_until,
    postgres_folder,
    require_postgres,
    server_command,
)
from tests.integration.test_server import client_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

CLUSTER_LINE = re.compile(
    r"^  PostgreSQL cluster in (?P<path>/\S+)/ \(the postgres user could not reach \.server/\)$",
    re.MULTILINE,
)


def start(project: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    """Run `regression-model-template server --folder .server` in ``project``; its ready text."""
    command = server_command(".server", port, cwd=project, merged=True)
    return command, "".join(lines_until(command, "Ctrl-C stops it"))


def stop(command: subprocess.Popen[str], how: signal.Signals) -> str:
    """Stop the command with ``how`` (Ctrl-C or a supervisor's SIGTERM); the rest of its output."""
    if command.poll() is None:
        command.send_signal(how)
    try:
        rest, _ = command.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # pragma: no cover -- the test fails: stop it for good
        command.send_signal(signal.SIGINT)
        rest, _ = command.communicate(timeout=120)
        pytest.fail(f"not stopped within 120 s by {how.name}: {rest}")
    return rest


@pytest.fixture
def data_root() -> Iterator[Path]:
    """PostgreSQL's data root; what the test adds to it is stopped and removed afterwards."""
    require_postgres()
    if os.geteuid() != 0:
        pytest.skip("only root's cluster runs as another user (postgres)")
    root = Path(pwd.getpwnam("postgres").pw_dir)
    before = set(root.iterdir())
    yield root
    for made in set(root.iterdir()) - before:
        if (made / "data" / "postmaster.pid").exists():  # a failed test may leave it running
            subprocess.run(
                ["runuser", "-u", "postgres", "--", str(postgres_bin() / "pg_ctl"),
                 "-D", str(made / "data"), "-m", "immediate", "-w", "stop"],
                capture_output=True, check=False,
            )  # fmt: skip
        shutil.rmtree(made)


def test_the_server_from_a_closed_home_keeps_its_cluster_under_postgres_data_root(
    data_root: Path, tmp_path: Path
) -> None:
    # given a project in a home closed to other users, as /root is in a container
    home = tmp_path / "home"
    project = home / "project"
    project.mkdir(parents=True)
    home.chmod(0o700)
    port = free_port()

    # when the server command starts there
    first, ready = start(project, port)
    try:
        # then it serves, and says where its cluster is: under PostgreSQL's data root
        assert f"tracking server ready: http://127.0.0.1:{port}" in ready, ready
        where = CLUSTER_LINE.search(ready)
        assert where, ready
        cluster = Path(where["path"])
        assert cluster.parent == data_root
        assert (cluster / "data" / "PG_VERSION").exists()
        url = f"http://127.0.0.1:{port}"
        assert running(url)
        client = client_for(url)
        experiment = client.create_experiment("closed-home")
        run = client.create_run(experiment).info.run_id
        client.log_metric(run, "rmse", 53.78)
        client.set_terminated(run)

        # and a second stack on the same folder is refused, the first one left alone
        second = subprocess.run(
            [sys.executable, "-m", "regression_model_template", "server",
             "--folder", ".server", "--port", str(free_port())],
            cwd=project, env=clean_environ(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"process {first.pid} runs the PostgreSQL cluster in {cluster}" in second.stderr
        assert running(url)
    finally:
        rest = stop(first, signal.SIGINT)  # Ctrl-C

    assert first.returncode == 0, ready + rest
    assert "stopped: mlflow server and PostgreSQL" in rest
    assert not (project / ".server" / "postgres").exists()  # the server's own files stay here
    assert (project / ".server" / "server.log").exists()

    # when it starts again, then it uses the same cluster: the run is still there
    again, ready_again = start(project, port)
    try:
        where_again = CLUSTER_LINE.search(ready_again)
        assert where_again and where_again["path"] == str(cluster), ready_again
        stored = client_for(url).get_run(run)
        assert stored.data.metrics == {"rmse": 53.78}
        assert stored.info.status == "FINISHED"
    finally:
        rest = stop(again, signal.SIGTERM)  # a supervisor's stop

    assert again.returncode == 0, ready_again + rest
    assert "stopped: mlflow server and PostgreSQL" in rest
    for place in (cluster, project):
        left = subprocess.run(["pgrep", "-af", str(place)], capture_output=True, text=True)
        assert left.stdout == "", left.stdout
    assert home.stat().st_mode & 0o777 == 0o700  # nobody opened the user's home


def test_a_cluster_already_in_a_closed_folder_is_not_replaced_by_an_empty_one(
    data_root: Path, tmp_path: Path
) -> None:
    # given a cluster made in the folder while the postgres user could reach it, since closed
    folder = tmp_path / "project" / ".server"
    (folder / "postgres" / "data").mkdir(parents=True)
    (folder / "postgres" / "data" / "PG_VERSION").write_text("15\n")

    # when the stack looks for its cluster, then it says how to move it, and makes nothing
    with pytest.raises(RuntimeError, match=r"cannot reach the PostgreSQL cluster in .*: move it"):
        cluster_folder(folder)
    assert not (data_root / cluster_name(folder)).exists()


def test_a_cluster_under_the_data_root_is_used_again_once_the_folder_is_reachable(
    data_root: Path,
) -> None:
    # given a cluster made under the data root while the folder was closed, since opened
    folder = postgres_folder("rmt-reopened-") / ".server"
    try:
        outside = data_root / cluster_name(folder)
        (outside / "data").mkdir(parents=True)
        (outside / "data" / "PG_VERSION").write_text("15\n")

        # when the stack looks for its cluster, then it finds that one, not a new one in the folder
        assert cluster_folder(folder) == outside
        assert cluster_folder(folder.parent / "other") == folder.parent / "other" / "postgres"
    finally:
        shutil.rmtree(folder.parent)
