"""The credentials MLflow's client sends (MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN) stay
secret: never in a log line, run.log, an alert, an error, ``config show`` or ``check``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from dependency_injector.wiring import Provide

from regression_model_template import cli, jobs
from regression_model_template.containers import Container, inject
from regression_model_template.io.services import LoggerService, MlflowService
from regression_model_template.testing import Alert
from tests.conftest import run_log
from tests.io.test_probe_tls import answering_server
from tests.test_cli import _cli

PASSWORD = "Cl1ent-pa55w0rd"
# Not "t0ken": the alert channels' doctests mask that word in urllib3's records for good.
TOKEN = "cl1ent-bearer-XYZ"


@inject
def _telling(
    logger_service: LoggerService = Provide[Container.logger_service],
    mlflow_service: MlflowService = Provide[Container.mlflow_service],
) -> None:
    with mlflow_service.run_context(MlflowService.RunConfig(name="telling")):
        logger_service.logger().info("logging in with {} and {}", PASSWORD, TOKEN)
        logging.getLogger("urllib3.connectionpool").warning("Authorization: Bearer %s", TOKEN)
        raise RuntimeError(f"the server refused {PASSWORD} (token {TOKEN})")


def test_a_job_telling_the_credentials_never_writes_them(
    service_container: Container,
    alerts_outbox: list[Alert],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # given the job's credentials in MLflow's variables, and a job logging and raising them
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    monkeypatch.setitem(jobs.JOBS, "telling", f"{__name__}:_telling")

    # when the command line runs it
    code = cli._run("telling", service_container)

    # then the job failed, and its log, its run's log, its alert and the error show *** instead
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: job telling failed: RuntimeError: the server refused *** ")
    log = (tmp_path / "logs" / "job.log").read_text()
    assert "logging in with *** and ***" in log
    assert "Authorization: Bearer ***" in log  # a library's record (stdlib logging)
    client = service_container.mlflow_service().client()
    experiment = client.get_experiment_by_name("tests")
    assert experiment is not None
    [run] = client.search_runs([experiment.experiment_id])
    text = run_log(client, run.info.run_id, tmp_path)
    assert text is not None and "logging in with *** and ***" in text
    [alert] = alerts_outbox
    assert alert.message.startswith("RuntimeError: the server refused *** (token ***)")
    for written in (error, log, text, alert.message):
        assert PASSWORD not in written and TOKEN not in written


def test_config_show_and_check_never_show_the_password(tmp_path: Path) -> None:
    # given a tracking server refusing the job's password
    environ = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    with answering_server(tmp_path, tls=False, users={"alice": "another"}) as server:
        environ["MLFLOW_TRACKING_URI"] = server.url

        # when the user looks at the configuration and checks the services
        shown = _cli(tmp_path, "config", "show", **environ)
        checked = _cli(tmp_path, "check", **environ)

    # then check says the credentials were refused, naming the variables; no password anywhere
    assert shown.returncode == 0, shown.stderr
    assert checked.returncode == 1
    [mlflow_line] = [line for line in checked.stdout.splitlines() if line.startswith("mlflow")]
    assert mlflow_line == (
        f"mlflow  FAILED MlflowService.tracking_uri: the tracking server {server.url} refused "
        "the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
        "to a user of the server (sent: the user 'alice' and a password)"
    )
    for result in (shown, checked):
        assert PASSWORD not in result.stdout + result.stderr


def test_an_alert_telling_the_password_shows_it_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # given the job's password in MLflow's variable and the container's own alerts service
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    container = Container(config={"alerts": {"enable": False}})

    # when a job puts the password in an alert of its own
    container.alerts_service().notify("Login", f"the server refused {PASSWORD}")

    # then the alert (here, its console line) shows *** in its place
    assert capsys.readouterr().out == "[regression_model_template] Login: the server refused ***\n"
