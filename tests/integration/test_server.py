"""The jobs against a real MLflow tracking server, through ``containers/server.yaml``.

One ``mlflow server`` serves the whole module (the session fixture ``mlflow_server``). Each test
writes to its own experiment; the training tests share the registered model
``regression_model_template`` and each checks the version it created itself.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import typing as T
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from regression_model_template import jobs
from regression_model_template.containers import Container
from regression_model_template.testing import clean_environ, mlflow_globals_restored

if T.TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.server, pytest.mark.slow]

REGISTRY_NAME = "regression_model_template"  # containers/server.yaml
DEFAULT_EXPERIMENT = "regression_model_template"  # containers/server.yaml
SECRET = "s3cret"
JOB_TIMEOUT = 240.0  # seconds for one command-line job (measured: 5-10 s)

RUN_LINE = re.compile(r"^run (?P<run_id>[0-9a-f]{32}): (?P<metrics>.+)$", re.MULTILINE)
MODEL_LINE = re.compile(rf"^model {REGISTRY_NAME} version (?P<version>\d+)$", re.MULTILINE)


def run_cli(
    *args: str, tracking_uri: str, cwd: Path, **environ: str
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m regression_model_template ARGS`` as a user would, against the server."""
    return subprocess.run(
        [sys.executable, "-m", "regression_model_template", *args],
        cwd=cwd,
        env=clean_environ(MLFLOW_TRACKING_URI=tracking_uri, **environ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
        check=False,
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    """The command's output, for assertion messages."""
    return f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def printed_metrics(text: str) -> dict[str, float]:
    """``rmse=53.78 mae=42.81 r2=0.4541`` -> ``{"rmse": 53.78, ...}``."""
    pairs = (item.split("=", 1) for item in text.split())
    return {name: float(value) for name, value in pairs}


def client_for(url: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def check_training_run(
    client: MlflowClient,
    run_id: str,
    version: str,
    experiment: str,
    metrics: T.Mapping[str, float],
) -> None:
    """The training run, its artifacts, its logged model and the registry, as stored."""
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "training"
    assert run.data.tags["job"] == "training"
    assert client.get_experiment(run.info.experiment_id).name == experiment
    for name in ("rmse", "mae", "r2"):
        assert run.data.metrics[name] == pytest.approx(metrics[name], rel=1e-3)
    assert 0 < run.data.metrics["rmse"] < 100 and 0 < run.data.metrics["r2"] < 1
    params = run.data.params
    assert params["alpha"] == "1.0"
    assert params["test_size"] == "0.2"
    assert params["random_state"] == "42"
    assert params["model_alias"] == "champion"

    # The plot is a run artifact, uploaded through the server's artifact proxy.
    artifacts = {artifact.path for artifact in client.list_artifacts(run_id)}
    assert "predicted_vs_actual.png" in artifacts
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")

    # MLflow 3 stores the model as a LoggedModel of the run (models/<model_id>/artifacts), not
    # in the run's own artifact folder: list the model's folder where MLflow puts it.
    assert run.outputs is not None
    model_ids = [output.model_id for output in run.outputs.model_outputs]
    assert len(model_ids) == 1
    logged_model = client.get_logged_model(model_ids[0])
    assert logged_model.source_run_id == run_id
    assert logged_model.name == "model"
    model_files = {artifact.path for artifact in client.list_logged_model_artifacts(model_ids[0])}
    assert {"MLmodel", "requirements.txt"} <= model_files
    assert any(path.startswith("model.") for path in model_files)  # the serialised pipeline

    # The registered model, its new version from this run, and the champion alias on it.
    registered = client.get_registered_model(REGISTRY_NAME)
    assert registered.aliases["champion"] == version
    model_version = client.get_model_version_by_alias(REGISTRY_NAME, "champion")
    assert model_version.version == version
    assert model_version.run_id == run_id
    assert model_version.source == f"models:/{model_ids[0]}"
    assert model_version.status == "READY"


def only_run(client: MlflowClient, experiment: str) -> T.Any:
    """The single run of an experiment."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} on the server"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [(run.info.run_name, run.info.status) for run in runs]
    return runs[0]


@pytest.fixture
def restore_mlflow() -> Iterator[None]:
    """Undo what an in-process job leaves in MLflow's globals and in ``os.environ``."""
    with mlflow_globals_restored():
        yield


def run_in_process(name: str, tracking_uri: str, experiment: str) -> T.Any:
    """Run a job in this process through ``containers/server.yaml``, as a notebook would."""
    container = Container(
        config={"mlflow": {"experiment_name": experiment}},
        profile="server",
        environ={"MLFLOW_TRACKING_URI": tracking_uri},
    )
    try:
        return jobs.run(name, container)
    finally:
        container.unwire()


# %% TESTS


def test_training_then_evaluation_from_the_command_line(mlflow_server: str, tmp_path: Path) -> None:
    client = client_for(mlflow_server)

    training = run_cli(
        "run", "training", "--profile", "server", tracking_uri=mlflow_server, cwd=tmp_path
    )

    assert training.returncode == 0, explain(training)
    run_line = RUN_LINE.search(training.stdout)
    model_line = MODEL_LINE.search(training.stdout)
    assert run_line and model_line, explain(training)
    run_id, version = run_line["run_id"], model_line["version"]
    assert f"open the results: {mlflow_server}" in training.stdout
    assert "training finished: rmse=" in training.stdout  # the alert, on the console
    assert not (tmp_path / "mlruns").exists()  # nothing fell back to a local store
    check_training_run(
        client, run_id, version, DEFAULT_EXPERIMENT, printed_metrics(run_line["metrics"])
    )

    evaluation = run_cli(
        "run", "evaluation", "--profile", "server", tracking_uri=mlflow_server, cwd=tmp_path
    )

    assert evaluation.returncode == 0, explain(evaluation)
    eval_line = RUN_LINE.search(evaluation.stdout)
    assert eval_line, explain(evaluation)
    eval_run = client.get_run(eval_line["run_id"])
    assert eval_run.info.status == "FINISHED"
    assert eval_run.info.run_name == "evaluation"
    assert eval_run.data.params["model_uri"] == f"models:/{REGISTRY_NAME}@champion"
    printed = printed_metrics(eval_line["metrics"])
    for name in ("rmse", "mae", "r2"):
        assert eval_run.data.metrics[name] == pytest.approx(printed[name], rel=1e-3)
    # Same split, same model: evaluation reproduces the training run's test metrics.
    trained = client.get_run(run_id).data.metrics
    for name in ("rmse", "mae", "r2"):
        assert eval_run.data.metrics[name] == pytest.approx(trained[name], rel=1e-9)


def test_training_in_process(
    mlflow_server: str, restore_mlflow: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    experiment = "server-in-process"

    result = run_in_process("training", mlflow_server, experiment)

    assert mlflow.active_run() is None
    check_training_run(
        client_for(mlflow_server), result.run_id, result.model_version, experiment, result.metrics
    )
    assert f"training finished: rmse={result.metrics['rmse']:.2f}" in capsys.readouterr().out


def test_failing_job_ends_its_run_failed(mlflow_server: str, tmp_path: Path) -> None:
    experiment = "server-failing"

    result = run_cli(
        "run",
        "evaluation",
        "--profile",
        "server",
        "--set",
        "mlflow.registry_name=missing_model",
        "--set",
        f"mlflow.experiment_name={experiment}",
        tracking_uri=mlflow_server,
        cwd=tmp_path,
    )

    assert result.returncode == 1, explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, explain(result)
    assert lines[0].startswith("error: job evaluation failed: "), explain(result)
    assert "missing_model" in lines[0]
    assert "FAILURE evaluation failed: " in result.stdout  # the alert, on the console
    # the traceback, in the JSON log as masked text (MLflow's own messages carry credentials)
    assert "Traceback (most recent call last)" in result.stdout
    run = only_run(client_for(mlflow_server), experiment)
    assert run.info.status == "FAILED"
    # the alert links to the failed run in the server's UI
    link = f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert link in result.stdout, explain(result)
    assert run.info.run_name == "evaluation"
    assert run.data.params["model_uri"] == "models:/missing_model@champion"
    assert not {"rmse", "mae", "r2"} & run.data.metrics.keys()


def secret_forms(secret: str, user: str = "user") -> list[str]:
    """The secret as it could leak: plain, URL-quoted, and inside a basic-auth header."""
    basic = base64.b64encode(f"{user}:{secret}".encode()).decode()
    return [secret, urllib.parse.quote(secret, safe=""), basic.rstrip("=")]


def test_credentials_in_the_tracking_uri_are_never_printed(
    mlflow_server: str, tmp_path: Path
) -> None:
    # The server runs without authentication: it accepts and ignores basic-auth credentials.
    with_credentials = mlflow_server.replace("http://", f"http://user:{SECRET}@")
    masked = mlflow_server.replace("http://", "http://user:***@")
    experiment = "server-credentials"

    show = run_cli(
        "config", "show", "--profile", "server", tracking_uri=with_credentials, cwd=tmp_path
    )
    training = run_cli(
        "run",
        "training",
        "--profile",
        "server",
        "--set",
        f"mlflow.experiment_name={experiment}",
        "--set",
        "logger.level=DEBUG",  # the most verbose log a user can ask for
        tracking_uri=with_credentials,
        cwd=tmp_path,
    )
    check = run_cli("check", "--profile", "server", tracking_uri=with_credentials, cwd=tmp_path)

    assert show.returncode == 0, explain(show)
    assert re.search(rf'^mlflow\.tracking_uri +"{re.escape(masked)}"', show.stdout, re.MULTILINE)
    assert training.returncode == 0, explain(training)
    assert f"open the results: {masked}" in training.stdout
    assert check.returncode == 0, explain(check)
    assert f"tracking store {masked} is reachable and writable" in check.stdout
    for result in (show, training, check):
        for form in secret_forms(SECRET):
            assert form not in result.stdout, f"{form!r} printed:\n{explain(result)}"
            assert form not in result.stderr, f"{form!r} printed:\n{explain(result)}"
    assert only_run(client_for(mlflow_server), experiment).info.status == "FINISHED"


def test_credentials_are_not_printed_by_an_in_process_job(
    mlflow_server: str,
    restore_mlflow: None,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    with_credentials = mlflow_server.replace("http://", f"http://user:{SECRET}@")

    result = run_in_process("training", with_credentials, "server-in-process-credentials")

    assert result.run_id
    output = capfd.readouterr()
    for form in secret_forms(SECRET):
        assert form not in output.out + output.err
