"""Job overhead: the training job against the same training in raw MLflow."""

from __future__ import annotations

import contextlib
import os
import typing as T
from pathlib import Path

from benchmarks.common import Context, Row, Sizes, median, row, timed


def run(context: Context) -> list[Row]:
    return bench_job(context.folder, context.sizes)


def bench_job(
    folder: Path,
    sizes: Sizes,
    uri: str | None = None,
    label: str = "sqlite",
    store: str = "SQLite",
) -> list[Row]:
    """``jobs.run("training")`` in-process (as the CLI runs it) vs raw MLflow, same store."""
    import mlflow
    from dependency_injector import wiring
    from loguru import logger
    from mlflow.tracking import MlflowClient

    from regression_model_template import jobs
    from regression_model_template.containers import Container
    from regression_model_template.jobs import JobsConfig
    from regression_model_template.jobs.data import load_split, regression_metrics
    from regression_model_template.jobs.training import _predicted_vs_actual

    uri = uri or f"sqlite:///{folder}/job.db"
    experiment, registered = f"bench-job-{label}", f"bench_job_{label}"
    config = {
        "logger": {"sink": str(folder / f"job-{label}.log")},
        "alerts": {"enable": False},
        "mlflow": {
            "tracking_uri": uri,
            "experiment_name": experiment,
            "registry_name": registered,
            "spool_dir": str(folder / f"spool-job-{label}"),
        },
    }

    def ours() -> None:
        # As in a fresh `run training` process: no function inspected for the wiring yet.
        wiring.clear_cache()
        container = Container(config=config, profile=False, environ={})
        jobs.run("training", container)

    def raw() -> None:
        """The training job's steps written with MLflow's and loguru's own calls."""
        import sklearn
        from mlflow.models import infer_signature
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        handler = logger.add(str(folder / f"job-raw-{label}.log"), diagnose=False)
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            mlflow.set_experiment(experiment)
            mlflow.autolog(log_models=False, log_datasets=False)
            settings = JobsConfig()
            x_train, x_test, y_train, y_test = load_split(settings)
            model = make_pipeline(StandardScaler(), Ridge(alpha=settings.alpha))
            with mlflow.start_run(run_name="training", tags={"job": "training"}) as run:
                logger.info("Training a ridge regression on {} rows", len(x_train))
                model.fit(x_train, y_train)
                predictions = model.predict(x_test)
                metrics = regression_metrics(y_test, predictions)
                mlflow.log_params(settings.model_dump())
                mlflow.log_metrics(metrics)
                info = mlflow.sklearn.log_model(
                    model,
                    name="model",
                    signature=infer_signature(x_test, predictions),
                    pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
                )
                mlflow.log_figure(
                    _predicted_vs_actual(y_test, predictions), "predicted_vs_actual.png"
                )
                version = mlflow.register_model(info.model_uri, registered).version
                MlflowClient().set_registered_model_alias(registered, settings.model_alias, version)
            logger.info("Registered {} version {}", registered, version)
            print(f"training finished: rmse={metrics['rmse']:.2f} run {run.info.run_id}")
        finally:
            logger.remove(handler)

    times: dict[str, list[float]] = {"ours": [], "raw": []}
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        ours()  # creates the store and warms imports: both sides use an existing store
        raw()
        for repeat in range(max(sizes.repeats, 3)):  # alternate which side goes first
            first, second = (ours, raw) if repeat % 2 == 0 else (raw, ours)
            spent = {first: timed(first), second: timed(second)}
            times["ours"].append(spent[ours])
            times["raw"].append(spent[raw])
    finished = MlflowClient(tracking_uri=uri).search_runs(
        [T.cast(T.Any, mlflow.get_experiment_by_name(experiment)).experiment_id]
    )
    if any(run.info.status != "FINISHED" for run in finished):
        raise AssertionError(f"job {label}: a training run did not finish")
    goal = ("<= 1.1x", 1.1) if label == "sqlite" else ("(information)", None)
    return [
        row(f"job overhead ({store}): run training vs the same training in raw MLflow",
            median(times["ours"]), "s", median(times["raw"]), goal[1], goal[0]),
    ]  # fmt: skip
