"""Lifecycle: ``lifespan`` with an empty run vs the same with raw MLflow and loguru."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import Context, Row, Sizes, median, row, timed


def run(context: Context) -> list[Row]:
    return bench_lifecycle(context.folder, context.sizes)


def bench_lifecycle(folder: Path, sizes: Sizes) -> list[Row]:
    import mlflow
    from loguru import logger

    from regression_model_template.containers import Container, lifespan
    from regression_model_template.io.services import MlflowService

    uri = f"sqlite:///{folder}/lifecycle.db"
    config = {
        "logger": {"sink": str(folder / "lifecycle.log")},
        "alerts": {"enable": False},
        "mlflow": {"tracking_uri": uri, "experiment_name": "lifecycle"},
    }
    run_config = MlflowService.RunConfig(name="empty", log_system_metrics=False)

    def ours(container: Container) -> None:
        with lifespan(container), container.mlflow_service().run_context(run_config):
            pass

    def fresh() -> Container:
        return Container(config=config, profile=False, environ={})

    def raw() -> None:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        mlflow.set_experiment("lifecycle")
        mlflow.autolog(log_models=False, log_datasets=False)
        with mlflow.start_run(run_name="empty", log_system_metrics=False):
            pass

    def service_only() -> None:
        service = MlflowService(tracking_uri=uri, experiment_name="lifecycle")
        with service, service.run_context(run_config):
            pass

    def loguru_add_remove() -> None:
        handler = logger.add(str(folder / "lifecycle-raw.log"))
        logger.remove(handler)

    ours(fresh())  # creates the store and warms imports: both sides use an existing store
    raw()
    times: dict[str, list[float]] = {"ours": [], "raw": [], "service": [], "loguru": []}
    for _ in range(max(sizes.repeats * 4, 3)):  # interleaved: drift hits every side alike
        container = fresh()  # built outside the timing
        times["ours"].append(timed(lambda c=container: ours(c)))  # type: ignore[misc]
        times["raw"].append(timed(raw))
        times["service"].append(timed(service_only))
        times["loguru"].append(timed(loguru_add_remove))
    ours_time, raw_time = median(times["ours"]), median(times["raw"])
    service, add = median(times["service"]), median(times["loguru"])
    return [
        row(
            "lifecycle: lifespan + empty run vs raw MLflow",
            ours_time,
            "s",
            raw_time,
            1.2,
            "<= 1.2x",
        ),
        row("lifecycle: MlflowService alone vs raw MLflow", service, "s", raw_time, None, "(part)"),
        row("lifecycle: one loguru logger.add + remove", add, "s", None, None, "(part)"),
    ]
