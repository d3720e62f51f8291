"""Run the main job: ``python -m regression_model_template``."""

from regression_model_template.io.services import AlertsService, LoggerService, MlflowService


def main() -> None:
    """Start the services, log a line, record one run, stop."""
    with LoggerService() as logger_service, AlertsService() as alerts, MlflowService() as mlflow:
        logger = logger_service.logger()
        with mlflow.run_context(MlflowService.RunConfig(name="hello")) as run:
            logger.info("Services started; run {}", run.info.run_id)
        alerts.notify("regression_model_template", f"run {run.info.run_id} finished")


if __name__ == "__main__":
    main()
