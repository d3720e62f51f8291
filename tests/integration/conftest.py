"""Fixtures of the integration suite: one real ``mlflow server`` per session, on 127.0.0.1."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from regression_model_template.testing import local_mlflow_server

# These machines have no internet: keep MLflow's telemetry quiet in the test process too.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1, shared by the session; yields its URL."""
    with local_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        sys.stderr.write(f"\nmlflow server ready at {url}\n")
        yield url
