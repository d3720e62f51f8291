"""The team's stack: what can be checked without starting PostgreSQL (see tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from regression_model_template.server.processes import free_port
from regression_model_template.server.tracking_server import MlflowServer, running


def test_a_taken_port_fails_before_a_server_starts(tmp_path: Path, taken_port: int) -> None:
    # given something else listening on the port (taken_port)
    # when a server is started on it, then it fails at once, naming the port
    with (
        pytest.raises(RuntimeError, match=rf"port {taken_port} on 127.0.0.1 is in use"),
        MlflowServer(f"sqlite:///{tmp_path}/m.db", tmp_path / "artifacts", port=taken_port),
    ):
        pass  # pragma: no cover -- never reached

    assert not list(tmp_path.glob("server-*.log"))  # no server was started


def test_running_is_false_where_nothing_answers() -> None:
    assert running(f"http://127.0.0.1:{free_port()}", timeout=1) is False
