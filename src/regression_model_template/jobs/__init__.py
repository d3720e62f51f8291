"""Jobs: ``@inject`` functions that receive the services from the container.

- ``training``: fit a regression model on scikit-learn's diabetes data, log it, register it and
  point the ``champion`` alias at the new version.
- ``evaluation``: load the registered model (alias or version) and score the held-out split.

Their settings are the configuration section ``jobs`` (:class:`JobsConfig`). Run one with
``regression-model-template run training`` or :func:`run`.
"""

from __future__ import annotations

import importlib
import typing as T

import pydantic

if T.TYPE_CHECKING:
    from regression_model_template.containers import Container

__all__ = ["JOBS", "JobsConfig", "run"]

#: Job name -> "module:function"; modules are imported only when the job runs.
JOBS: dict[str, str] = {
    "training": "regression_model_template.jobs.training:training",
    "evaluation": "regression_model_template.jobs.evaluation:evaluation",
}


class JobsConfig(pydantic.BaseModel):
    """Settings of the bundled jobs: the configuration section ``jobs``.

    Attributes:
        test_size: share of the dataset held out for testing (same split for both jobs).
        random_state: seed of the train/test split.
        alpha: L2 regularisation strength of the ridge regression.
        model_alias: registry alias that ``training`` moves and ``evaluation`` loads.
        model_version: a registered version for ``evaluation`` to load instead of the alias.

    Example:
        >>> JobsConfig(alpha=0.5).alpha
        0.5
    """

    model_config = pydantic.ConfigDict(strict=True, frozen=True, extra="forbid")

    test_size: float = pydantic.Field(default=0.2, gt=0, lt=1)
    random_state: int = 42
    alpha: float = pydantic.Field(default=1.0, ge=0)
    model_alias: str = "champion"
    model_version: int | None = pydantic.Field(default=None, ge=1)


def run(name: str, container: Container) -> T.Any:
    """Run the job ``name`` with the container's services, started and stopped around it.

    When the job raises, its run ends FAILED, the traceback goes to the log, an alert names the
    job and the error in one line (credentials masked), the services are stopped, and the
    error propagates.

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
    from regression_model_template.containers import lifespan

    module, function = JOBS[name].split(":")
    job = getattr(importlib.import_module(module), function)
    with lifespan(container):
        container.wire(modules=[module])
        try:
            return job()
        except Exception as error:
            mlflow_service = container.mlflow_service()
            cause = mlflow_service.redact(f"{type(error).__name__}: {error}".splitlines()[0])
            container.logger_service().logger().opt(exception=error).error(
                "Job {} failed: {}", name, cause
            )
            container.alerts_service().notify(f"{name} failed", cause)
            raise
