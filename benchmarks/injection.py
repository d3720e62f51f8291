"""Injection: the cost of ``@inject`` per call, against a plain call."""

from __future__ import annotations

import sys
import timeit

from benchmarks.common import FULL, Context, Row, Sizes, median, row


def run(context: Context) -> list[Row]:
    return bench_injection(context.sizes)


def bench_injection(sizes: Sizes) -> list[Row]:
    from dependency_injector.wiring import Provide

    from regression_model_template.containers import Container, inject
    from regression_model_template.io.services import AlertsService, MlflowService

    def plain(alerts: AlertsService, mlflow_service: MlflowService) -> int:
        return 1

    @inject
    def job(
        alerts: AlertsService = Provide[Container.alerts_service],
        mlflow_service: MlflowService = Provide[Container.mlflow_service],
    ) -> int:
        return 1

    container = Container(profile=False, environ={})
    globals()["_bench_job"] = job  # wiring patches module members: make the job one
    container.wire(modules=[sys.modules[__name__]])
    alerts, mlflow_service = container.alerts_service(), container.mlflow_service()
    number = 20_000 if sizes is FULL else 2_000
    wired = median(timeit.repeat(job, number=number, repeat=5)) / number
    direct = (
        median(timeit.repeat(lambda: plain(alerts, mlflow_service), number=number, repeat=5))
        / number
    )
    container.unwire()
    overhead = wired - direct
    return [row("injection: @inject overhead per call", overhead * 1e6, "us", None, 3, "<= 3 us")]
