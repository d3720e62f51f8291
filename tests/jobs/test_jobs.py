"""The bundled jobs through the plugin's fixtures: real MLflow on SQLite under tmp_path."""

from __future__ import annotations

import logging
import typing as T
from pathlib import Path

import pytest
from dependency_injector import providers
from dependency_injector.wiring import Provide
from loguru import logger

from regression_model_template import jobs
from regression_model_template.containers import Container, inject
from regression_model_template.io.services import MlflowService
from regression_model_template.jobs import JobsConfig
from regression_model_template.testing import Alert
from tests.conftest import run_log

if T.TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

METRICS = {"rmse", "mae", "r2"}


def _runs(client: MlflowClient, experiment_name: str) -> list[Run]:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no experiment {experiment_name!r}"
    return list(client.search_runs([experiment.experiment_id], order_by=["start_time ASC"]))


def _inside(uri: str, folder: Path) -> bool:
    return Path(uri.removeprefix("file://")).resolve().is_relative_to(folder.resolve())


def _kind(handler: logging.Handler) -> str:
    return type(handler).__name__


def test_training_logs_registers_the_champion_and_alerts(
    service_container: Container, alerts_outbox: list[Alert], tmp_path: Path
) -> None:
    import mlflow

    result = jobs.run("training", service_container)

    service = service_container.mlflow_service()
    client = service.client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "training"
    assert [r.info.run_id for r in _runs(client, "tests")] == [result.run_id]
    # Params are the job's settings; metrics are the test metrics the job returned.
    assert run.data.params["alpha"] == "1.0"
    assert run.data.params["random_state"] == "42"
    assert set(result.metrics) == METRICS
    assert {k: run.data.metrics[k] for k in METRICS} == pytest.approx(result.metrics)
    assert 0 < result.metrics["r2"] < 1
    assert result.metrics["rmse"] > result.metrics["mae"] > 0
    # The plot is an artifact of the run; the model (MLflow 3: a logged model) is its output.
    assert "predicted_vs_actual.png" in {a.path for a in client.list_artifacts(result.run_id)}
    assert run.outputs is not None
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert (model.name, model.source_run_id) == ("model", result.run_id)
    assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    # The registered model's champion is the version this run produced, with its signature.
    version = client.get_model_version_by_alias(service.registry_name, "champion")
    assert str(version.version) == result.model_version == "1"
    assert version.run_id == result.run_id
    model_uri = f"models:/{service.registry_name}@champion"
    mlflow.set_tracking_uri(service.tracking_uri)  # the stopped service gave MLflow its own
    mlflow.set_registry_uri(service.registry)
    signature = mlflow.models.get_model_info(model_uri).signature
    assert signature is not None
    assert "bmi" in signature.inputs.input_names()
    # Everything stays in tmp_path: nothing is written to the project's own mlruns/.
    assert _inside(run.info.artifact_uri, tmp_path)
    assert _inside(model.artifact_location, tmp_path)
    # One alert, with the headline metric and where to find the run.
    [alert] = alerts_outbox
    assert alert.title == "training finished"
    assert f"rmse={result.metrics['rmse']:.2f}" in alert.message
    assert result.run_id in alert.message
    # The run's own log tells its story: the settings, the data and its split, the metrics,
    # the model logged, and the version registered, MLflow's printed lines included.
    text = run_log(client, result.run_id, tmp_path)
    assert text is not None
    assert "Settings: alpha=1.0 model_alias=champion model_version=None random_state=42 " in text
    data = "Data: diabetes data (scikit-learn): 442 rows x 10 columns, split 353 train / 89 test"
    assert f"{data}\n" in text
    assert "Training a ridge regression (alpha=1.0) on 353 rows\n" in text
    metrics = run.data.metrics
    assert f"rmse={metrics['rmse']:.4g} mae={metrics['mae']:.4g} r2={metrics['r2']:.4g}\n" in text
    assert f"Logged the model 'model': model id {model.model_id}, models:/{model.model_id}" in text
    name = service.registry_name
    printed = f"Successfully registered model '{name}'.\nCreated version '1' of model '{name}'.\n"
    assert printed in text
    assert text.rstrip().endswith(f"Registered {name} version 1 as @champion")


def test_evaluation_scores_the_champion_then_a_version(
    service_container: Container, alerts_outbox: list[Alert], tmp_path: Path
) -> None:
    trained = jobs.run("training", service_container)

    evaluated = jobs.run("evaluation", service_container)

    client = service_container.mlflow_service().client()
    name = service_container.mlflow_service().registry_name
    assert evaluated.model_uri == f"models:/{name}@champion"
    run = client.get_run(evaluated.run_id)
    assert (run.info.run_name, run.info.status) == ("evaluation", "FINISHED")
    assert run.data.params["model_uri"] == evaluated.model_uri
    # Same model, same held-out split: the scores the training run measured.
    assert {k: run.data.metrics[k] for k in METRICS} == pytest.approx(trained.metrics)
    assert alerts_outbox[-1].title == "evaluation finished"
    assert evaluated.run_id in alerts_outbox[-1].message
    # Its run's log says what it loaded (the champion's version, trained by which run) and
    # what it measured.
    text = run_log(client, evaluated.run_id, tmp_path)
    assert text is not None
    assert "Data: diabetes data (scikit-learn): 442 rows x 10 columns" in text
    assert f"Loading {evaluated.model_uri}\n" in text
    assert f"Loaded {name} version 1: model id m-" in text
    assert f"trained in run {trained.run_id}\n" in text
    metrics = run.data.metrics
    assert f"rmse={metrics['rmse']:.4g} mae={metrics['mae']:.4g} r2={metrics['r2']:.4g}\n" in text

    # By version: jobs.model_version wins over the alias.
    with service_container.jobs_config.override(providers.Object(JobsConfig(model_version=1))):
        by_version = jobs.run("evaluation", service_container)
    assert by_version.model_uri == f"models:/{name}/1"
    assert client.get_run(by_version.run_id).info.status == "FINISHED"
    assert by_version.metrics == pytest.approx(trained.metrics)

    # A version that does not exist fails: the version really is the one loaded.
    with (
        service_container.jobs_config.override(providers.Object(JobsConfig(model_version=2))),
        pytest.raises(Exception, match="2"),
    ):
        jobs.run("evaluation", service_container)
    statuses = [r.info.status for r in _runs(client, "tests")]
    assert statuses == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]


def test_a_failing_job_ends_its_run_failed_alerts_logs_and_stops_everything(
    service_container: Container, alerts_outbox: list[Alert], tmp_path: Path
) -> None:
    import mlflow

    with pytest.raises(Exception, match="regression_model_template") as raised:
        jobs.run("evaluation", service_container)  # nothing is registered yet
    error_name = type(raised.value).__name__

    # The run ended FAILED in the store.
    runs = _runs(service_container.mlflow_service().client(), "tests")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("evaluation", "FAILED")]
    # One alert naming the job and the error, on one line.
    [alert] = alerts_outbox
    assert alert.title == "evaluation failed"
    assert alert.message.startswith(f"{error_name}: ")
    assert "\n" not in alert.message
    # The traceback is in the job's log.
    log_file = tmp_path / "logs" / "job.log"
    log = log_file.read_text()
    assert f"Job evaluation failed: {error_name}" in log
    assert "Traceback (most recent call last)" in log
    assert "jobs/evaluation.py" in log
    # Every service is stopped: no open run, the log file's sink is gone, logging is unhooked.
    assert mlflow.active_run() is None
    logger.info("a line after the job")
    assert "a line after the job" not in log_file.read_text()
    hooked = {
        name or "root": logging.getLogger(name).handlers
        for name in ("", "mlflow", "alembic", "sqlalchemy.engine")
    }
    assert not [n for n, hs in hooked.items() if "_InterceptHandler" in map(_kind, hs)], hooked


def test_a_job_with_one_provider_overridden(
    service_container: Container, alerts_outbox: list[Alert], tmp_path: Path
) -> None:
    with service_container.mlflow_service.override(
        MlflowService(
            tracking_uri=service_container.mlflow_service().tracking_uri,
            experiment_name="my-exp",
            registry_name="my-model",
        )
    ):
        result = jobs.run("training", service_container)

    client = service_container.mlflow_service().client()
    assert [r.info.run_id for r in _runs(client, "my-exp")] == [result.run_id]
    assert client.get_model_version_by_alias("my-model", "champion").run_id == result.run_id
    assert "model my-model v1" in alerts_outbox[-1].message
    # Out of the block the container's own service is back; its registry name got nothing.
    assert service_container.mlflow_service().registry_name == "regression_model_template"
    assert [m.name for m in client.search_registered_models()] == ["my-model"]
    assert client.get_experiment_by_name("tests") is None
    # The new experiment's artifacts stay in tmp_path too.
    assert _inside(client.get_run(result.run_id).info.artifact_uri, tmp_path)


def test_an_unknown_job_name_lists_the_known_ones(service_container: Container) -> None:
    with pytest.raises(KeyError, match="known: training, evaluation"):
        jobs.run("trainign", service_container)


SECRET = "S3CRETREG"


@inject
def _interrupted(mlflow_service: MlflowService = Provide[Container.mlflow_service]) -> None:
    with mlflow_service.run_context(MlflowService.RunConfig(name="interrupted")):
        raise KeyboardInterrupt


@inject
def _leaky(mlflow_service: MlflowService = Provide[Container.mlflow_service]) -> None:
    with mlflow_service.run_context(MlflowService.RunConfig(name="leaky")):
        raise RuntimeError(f"cannot reach {mlflow_service.registry_uri}/api")


def test_an_interrupted_job_alerts_failure_and_ends_killed(
    service_container: Container, alerts_outbox: list[Alert], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(jobs.JOBS, "interrupted", f"{__name__}:_interrupted")

    with pytest.raises(KeyboardInterrupt):
        jobs.run("interrupted", service_container)

    [alert] = alerts_outbox
    assert (alert.title, alert.level) == ("interrupted failed", "failure")
    runs = _runs(service_container.mlflow_service().client(), "tests")
    assert [r.info.status for r in runs] == ["KILLED"]


def test_a_failing_job_logs_its_traceback_with_credentials_masked(
    service_container: Container,
    alerts_outbox: list[Alert],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setitem(jobs.JOBS, "leaky", f"{__name__}:_leaky")
    tracking_uri = service_container.mlflow_service().tracking_uri
    registry = f"https://user:{SECRET}@127.0.0.1:1"
    service_container.config.from_dict({"mlflow": {"registry_uri": registry}})
    service_container.mlflow_service.reset()

    with pytest.raises(RuntimeError):
        jobs.run("leaky", service_container)

    log = (tmp_path / "logs" / "job.log").read_text()
    assert "Traceback (most recent call last)" in log
    assert "RuntimeError: cannot reach https://user:***@127.0.0.1:1/api" in log
    assert SECRET not in log
    assert SECRET not in alerts_outbox[0].message
    assert service_container.mlflow_service().tracking_uri == tracking_uri


def test_a_job_run_wires_its_module_without_inspecting_again_what_the_container_did(
    service_container: Container,
) -> None:
    """Wiring inspects every function of a module (~25 ms for the jobs): once is enough.

    The container wired the bundled jobs when it was built; running a job re-wires its module
    (another container may have been wired since) from what was inspected then.
    """
    from dependency_injector import wiring

    # dependency-injector's record of the functions it inspected (their signatures)
    inspected = wiring._fetch_reference_injections.cache_info
    wired: T.Any = service_container  # wired_to_packages/_modules: not in the container's stubs
    packages = list(wired.wired_to_packages)
    before = inspected()

    result = jobs.run("training", service_container)

    after = inspected()
    assert result.model_version == "1"
    assert before.currsize > 0  # the container kept what it inspected when it wired the jobs
    assert (after.misses, after.currsize) == (before.misses, before.currsize)  # nothing new
    assert wired.wired_to_packages == packages  # the job's module, not the package
    assert wired.wired_to_modules[-1].__name__ == "regression_model_template.jobs.training"


def test_the_job_modules_hold_no_service_class() -> None:
    """Wiring a module inspects every method of every class it holds: none of the services'.

    Theirs are most of the methods the bundled jobs' wiring would inspect (~2/3 of its time,
    once per process); the jobs import them for their annotations only.
    """
    import importlib

    from regression_model_template.io.services import Service

    for target in jobs.JOBS.values():
        module = importlib.import_module(target.split(":")[0])
        held = [
            n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Service)
        ]

        assert held == [], f"{module.__name__} holds {held}"
