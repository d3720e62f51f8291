"""Training job: fit, log, register, and point the ``champion`` alias at the new version."""

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


class TrainingResult(T.NamedTuple):
    """What a training run produced.

    Example:
        >>> TrainingResult("abc", {"rmse": 1.0}, "1").model_version
        '1'
    """

    run_id: str
    metrics: dict[str, float]
    model_version: str


@inject
def training(
    config: JobsConfig = Provide[Container.jobs_config],
    logger_service: LoggerService = Provide[Container.logger_service],
    alerts: AlertsService = Provide[Container.alerts_service],
    mlflow_service: MlflowService = Provide[Container.mlflow_service],
) -> TrainingResult:
    """Fit a ridge regression on the diabetes data and register it as the champion.

    Logs the parameters, the test metrics (rmse, mae, r2), the model with its signature and a
    predicted-vs-actual plot; registers the model under ``mlflow.registry_name``.
    """
    import mlflow
    import sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    logger = logger_service.logger()
    registry_name = mlflow_service.registry_name
    run_config = mlflow_service.RunConfig(name="training", tags={"job": "training"})
    # Everything the run is about happens inside it: its run.log tells the whole story.
    with mlflow_service.run_context(run_config) as run:
        logger.info("Settings: {}", describe_settings(config))
        x_train, x_test, y_train, y_test = load_split(config)
        logger.info("Data: {}", describe_split(x_train, x_test))
        model = make_pipeline(StandardScaler(), Ridge(alpha=config.alpha))
        logger.info("Training a ridge regression (alpha={}) on {} rows", config.alpha, len(x_train))
        model.fit(x_train, y_train)
        predictions = model.predict(x_test)
        metrics = regression_metrics(y_test, predictions)
        logger.info("Test metrics ({} rows): {}", len(x_test), describe_metrics(metrics))
        mlflow_service.log_params(config.model_dump())
        mlflow_service.log_metrics(metrics)
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(x_test, predictions),
            # Naming the requirement avoids MLflow's slow requirement inference.
            pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
        )
        logger.info(
            "Logged the model {!r}: model id {}, {}", info.name, info.model_id, info.model_uri
        )
        mlflow.log_figure(_predicted_vs_actual(y_test, predictions), "predicted_vs_actual.png")
        logger.info("Logged the plot predicted_vs_actual.png")
        version = mlflow.register_model(info.model_uri, registry_name).version
        mlflow_service.client().set_registered_model_alias(
            registry_name, config.model_alias, version
        )
        logger.info("Registered {} version {} as @{}", registry_name, version, config.model_alias)
    run_id = run.info.run_id
    alerts.notify(
        "training finished",
        f"rmse={metrics['rmse']:.2f} r2={metrics['r2']:.3f} run {run_id} "
        f"model {registry_name} v{version}",
        level="success",
    )
    return TrainingResult(run_id, metrics, str(version))


def _predicted_vs_actual(actual: T.Any, predicted: T.Any) -> T.Any:
    """A scatter plot of predictions against the truth, with the identity line."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5))
    axes.scatter(actual, predicted, alpha=0.6)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    axes.plot([low, high], [low, high], color="grey", linestyle="--")
    axes.set_xlabel("actual")
    axes.set_ylabel("predicted")
    axes.set_title("Predicted vs actual (test split)")
    plt.close(figure)
    return figure
