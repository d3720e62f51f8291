"""Evaluation job: score the registered model on the held-out split."""

from __future__ import annotations

import typing as T

from dependency_injector.wiring import Provide

from regression_model_template.containers import Container, inject
from regression_model_template.jobs import JobsConfig
from regression_model_template.jobs.data import (
    describe_metrics,
    describe_settings,
    describe_split,
    load_split,
    regression_metrics,
)

if T.TYPE_CHECKING:  # annotations only: wiring inspects every class a job module holds (slow)
    from regression_model_template.io.services import AlertsService, LoggerService, MlflowService


class EvaluationResult(T.NamedTuple):
    """What an evaluation run measured, and on which model.

    Example:
        >>> EvaluationResult("abc", {"r2": 0.4}, "models:/m@champion").model_uri
        'models:/m@champion'
    """

    run_id: str
    metrics: dict[str, float]
    model_uri: str


@inject
def evaluation(
    config: JobsConfig = Provide[Container.jobs_config],
    logger_service: LoggerService = Provide[Container.logger_service],
    alerts: AlertsService = Provide[Container.alerts_service],
    mlflow_service: MlflowService = Provide[Container.mlflow_service],
) -> EvaluationResult:
    """Load the model by ``jobs.model_version`` (or ``jobs.model_alias``) and score it.

    Fails (run FAILED) when the registry has no such model, alias or version.
    """
    import mlflow

    name = mlflow_service.registry_name
    if config.model_version is not None:
        model_uri = f"models:/{name}/{config.model_version}"
    else:
        model_uri = f"models:/{name}@{config.model_alias}"
    logger = logger_service.logger()
    run_config = mlflow_service.RunConfig(name="evaluation", tags={"job": "evaluation"})
    # Everything the run is about happens inside it: its run.log tells the whole story.
    with mlflow_service.run_context(run_config) as run:
        logger.info("Settings: {}", describe_settings(config))
        mlflow_service.log_params({"model_uri": model_uri, "test_size": config.test_size})
        x_train, x_test, _, y_test = load_split(config)
        logger.info("Data: {}", describe_split(x_train, x_test))
        logger.info("Loading {}", model_uri)
        model = mlflow.pyfunc.load_model(model_uri)
        if config.model_version is not None:
            version = str(config.model_version)
        else:
            alias = mlflow_service.client().get_model_version_by_alias(name, config.model_alias)
            version = str(alias.version)
        logger.info(
            "Loaded {} version {}: model id {}, trained in run {}",
            name,
            version,
            model.metadata.model_id,
            model.metadata.run_id,
        )
        metrics = regression_metrics(y_test, model.predict(x_test))
        logger.info("Test metrics ({} rows): {}", len(x_test), describe_metrics(metrics))
        mlflow_service.log_metrics(metrics)
        logger.info("Evaluated {}", model_uri)
    alerts.notify(
        "evaluation finished",
        f"rmse={metrics['rmse']:.2f} r2={metrics['r2']:.3f} {model_uri} run {run.info.run_id}",
        level="success",
    )
    return EvaluationResult(run.info.run_id, metrics, model_uri)
