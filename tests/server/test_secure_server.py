"""``mlflow server`` with TLS and basic auth, on loopback: what a team's jobs meet on a network.

The address is 127.0.0.1 here; tests/integration (the "netns" tests) do the same from another
host. The README's example of adding a user runs against this server as written.
"""

from __future__ import annotations

import base64
import re
import ssl
import subprocess
import sys
import textwrap
import typing as T
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from regression_model_template.server.auth import Admin, auth_environment
from regression_model_template.server.tls import tls_pair
from regression_model_template.server.tracking_server import GUNICORN, MlflowServer
from regression_model_template.testing import clean_environ

pytestmark = [pytest.mark.server, pytest.mark.slow]

README = Path(__file__).resolve().parents[2] / "README.md"
ADMIN = Admin("admin-alice", "alice-s3cret-password")


def _status(url: str, certificate: Path, credentials: str | None = None) -> int:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=5")
    if credentials is not None:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    context = ssl.create_default_context(cafile=certificate)
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def _server(folder: Path, admin: Admin) -> T.Any:
    pair = tls_pair(folder, "127.0.0.1")
    return MlflowServer(
        f"sqlite:///{folder}/mlflow.db",
        folder / "artifacts",
        env=clean_environ(),
        output=folder / "server.log",
        options=GUNICORN,
        host="127.0.0.1",
        tls=pair,
        auth_env=auth_environment(folder, admin),
    )


def _python(code: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new Python with ``environ``, as a user's script on another shell."""
    return subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120
    )


def test_only_a_known_user_with_the_certificate_gets_in(tmp_path: Path) -> None:
    certificate = tmp_path / "tls" / "server.crt"
    with _server(tmp_path, ADMIN) as url:
        # then the URL is HTTPS, and MLflow's API answers only the right password
        assert url.startswith("https://127.0.0.1:")
        assert _status(url, certificate) == 401
        assert _status(url, certificate, f"{ADMIN.username}:not-the-password") == 401
        assert _status(url, certificate, f"{ADMIN.username}:{ADMIN.password}") == 200
        # and plain HTTP on the port gets no answer
        with pytest.raises(OSError):
            urllib.request.urlopen(url.replace("https://", "http://") + "/health", timeout=10)

        # when the README's example adds a user and grants it an experiment, as the admin
        example = re.search(r"```python\n( *# add_user\.py\n.*?)```", README.read_text(), re.S)
        assert example is not None, "README: the add_user.py example is missing"
        code = textwrap.dedent(example.group(1))
        environ = clean_environ(
            MLFLOW_TRACKING_URI=url,
            MLFLOW_TRACKING_SERVER_CERT_PATH=str(certificate),
            MLFLOW_TRACKING_USERNAME=ADMIN.username,
            MLFLOW_TRACKING_PASSWORD=ADMIN.password,
        )
        added = _python(code, environ)
        assert added.returncode == 0, added.stderr

        # then the new user logs values into the experiment, trusting the certificate
        environ.update(
            MLFLOW_TRACKING_USERNAME="bob", MLFLOW_TRACKING_PASSWORD="bob-s3cret-password"
        )
        logged = _python(_BOB_LOGS, environ)
        assert logged.returncode == 0, logged.stderr
        assert logged.stdout.strip().splitlines()[-1] == "FINISHED 0.5"

    log = (tmp_path / "server.log").read_text()
    for secret in (ADMIN.password, (tmp_path / "auth" / "secret_key").read_text()):
        assert secret not in log


_BOB_LOGS = """
import mlflow
mlflow.set_experiment("regression_model_template")
with mlflow.start_run() as run:
    mlflow.log_metric("rmse", 0.5)
run = mlflow.get_run(run.info.run_id)
print(run.info.status, run.data.metrics["rmse"])
"""


def test_an_admin_whose_stored_password_differs_is_one_clear_error(tmp_path: Path) -> None:
    # given a users' database made by a start with another password
    with _server(tmp_path, Admin(ADMIN.username, "the-first-password")):
        pass

    # when the server starts with the admin's new password, then it says what to do
    with pytest.raises(RuntimeError) as error, _server(tmp_path, ADMIN):
        pass  # pragma: no cover -- never reached

    message = str(error.value)
    assert (
        f"holds the user {ADMIN.username!r} with another password than MLFLOW_TRACKING_PASSWORD"
        in message
    )
    assert "update_user_password" in message
    key = (tmp_path / "auth" / "secret_key").read_text()
    for secret in (ADMIN.password, "the-first-password", key):
        assert secret not in message
        assert secret not in (tmp_path / "server.log").read_text()
