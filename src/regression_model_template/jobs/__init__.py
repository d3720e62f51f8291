"""Jobs: ``@inject`` functions that receive the services from the container.

- ``training``: fit a regression model on scikit-learn's diabetes data, log it, register it and
  point the ``champion`` alias at the new version.
- ``evaluation``: load the registered model (alias or version) and score the held-out split.

Their settings are the configuration section ``jobs`` (:class:`JobsConfig`). Run one with
``regression-model-template run training`` or :func:`run`.
"""

from __future__ import annotations

import importlib
import traceback
import typing as T

from regression_model_template.config import JobsConfig
from regression_model_template.containers import Container, lifespan

__all__ = ["JOBS", "JobsConfig", "run"]

#: Job name -> "module:function"; modules are imported only when the job runs.
JOBS: dict[str, str] = {
    "training": "regression_model_template.jobs.training:training",
    "evaluation": "regression_model_template.jobs.evaluation:evaluation",
}


def run(name: str, container: Container) -> T.Any:
    """Run the job ``name`` with the container's services, started and stopped around it.

    When the job raises, its run ends FAILED, the traceback goes to the log, a ``failure`` alert
    names the job and the error in one line (credentials masked) with, for a tracking server,
    the link to the run in the MLflow UI; the services are stopped, and the error propagates.

    Raises:
        KeyError: no job has that name.

    Example:
        >>> run("nope", None)  # type: ignore[arg-type]
        Traceback (most recent call last):
        ...
        KeyError: "unknown job 'nope' (known: training, evaluation)"
    """
    if name not in JOBS:
        raise KeyError(f"unknown job {name!r} (known: {', '.join(JOBS)})")
    module, function = JOBS[name].split(":")
    job = getattr(importlib.import_module(module), function)
    with lifespan(container):
        # Only the job's module: wire() adds the container's own packages unless told otherwise.
        container.wire(modules=[module], packages=[])
        try:
            return job()
        except BaseException as error:  # Ctrl-C and SIGTERM alert too; a clean exit does not
            if isinstance(error, SystemExit) and error.code in (0, None):
                raise
            mlflow_service = container.mlflow_service()
            cause = mlflow_service.redact(f"{type(error).__name__}: {error}".splitlines()[0])
            # The traceback as masked text: MLflow's messages carry the store's credentials.
            trace = mlflow_service.redact("".join(traceback.format_exception(error)))
            container.logger_service().logger().error("Job {} failed: {}\n{}", name, cause, trace)
            link = mlflow_service.run_link()
            message = f"{cause}\n{link}" if link else cause
            container.alerts_service().notify(f"{name} failed", message, level="failure")
            raise
