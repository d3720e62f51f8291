"""Metric logging: the service (buffered) vs per-call ``log_metric`` vs one bulk ``log_batch``.

Also what checking each value at the call costs (MLflow's rules, ``io/values.py``): against
building the rows unchecked, and with every name new against names seen before.
"""

from __future__ import annotations

import time
import typing as T

from benchmarks.common import METRICS, Context, Row, Sizes, count_values, median, row, timed
from regression_model_template.testing import local_mlflow_server


def run(context: Context) -> list[Row]:
    """On SQLite, then (full mode) on a local ``mlflow server``."""
    folder, sizes = context.folder, context.sizes
    rows = bench_metrics(f"sqlite:///{folder}/metrics.db", "sqlite", sizes)
    rows += bench_checks(sizes)
    if not context.quick:
        with local_mlflow_server(folder) as url:
            rows += bench_metrics(url, "http", sizes)
    return rows


def bench_metrics(uri: str, label: str, sizes: Sizes) -> list[Row]:
    """Service (buffered) vs per-call ``mlflow.log_metric`` vs one bulk ``log_batch``."""
    import mlflow
    import numpy as np
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from regression_model_template.io.services import MlflowService

    total = sizes.steps * len(METRICS)
    service = MlflowService(
        tracking_uri=uri, experiment_name=f"bench-{label}", autolog_disable=True
    )
    client = MlflowClient(tracking_uri=uri)
    run_config = MlflowService.RunConfig(name="bench", log_system_metrics=False)
    service_totals, caller_costs = [], []
    with service:
        for _ in range(sizes.repeats):
            steps = [{k: step * 0.5 for k in METRICS} for step in range(sizes.steps)]
            with service.run_context(run_config) as run:
                start = time.perf_counter()
                for step, step_values in enumerate(steps):
                    service.log_metrics(step_values, step=step)
                caller_costs.append((time.perf_counter() - start) / total)
            service_totals.append(time.perf_counter() - start)  # + the flush at the run's end
            stored = count_values(client, run.info.run_id)
            if stored != total:
                raise AssertionError(f"{label}: {stored} of {total} values stored (service)")

        # the same loop as a numpy training loop writes it: float32 values, int64 steps
        numpy_costs = []
        for _ in range(sizes.repeats):
            numpy_steps = [
                {k: np.float32(step * 0.5) for k in METRICS} for step in range(sizes.steps)
            ]
            with service.run_context(run_config) as run:
                start = time.perf_counter()
                for np_step, np_values in zip(np.arange(sizes.steps), numpy_steps, strict=True):
                    service.log_metrics(np_values, step=np_step)
                numpy_costs.append((time.perf_counter() - start) / total)
            stored = count_values(client, run.info.run_id)
            if stored != total:
                raise AssertionError(f"{label}: {stored} of {total} values stored (numpy)")

        # (b) one bulk log_batch of the same values, 1,000 per call (MLflow's limit)
        bulk_times = []
        for _ in range(sizes.repeats):
            with mlflow.start_run(log_system_metrics=False) as run:
                now = int(time.time() * 1000)
                values = [
                    Metric(k, step * 0.5, now, step) for step in range(sizes.steps) for k in METRICS
                ]
                start = time.perf_counter()
                for i in range(0, len(values), 1000):
                    client.log_batch(run.info.run_id, metrics=values[i : i + 1000])
                bulk_times.append(time.perf_counter() - start)
            if count_values(client, run.info.run_id) != total:
                raise AssertionError(f"{label}: bulk baseline lost values")

        # (a) per-call log_metric: timed on a sample, scaled to the same number of values
        sample = min(sizes.per_call_sample, total)
        with mlflow.start_run(log_system_metrics=False) as run:
            start = time.perf_counter()
            for i in range(sample):
                mlflow.log_metric(METRICS[i % len(METRICS)], i * 0.5, step=i // len(METRICS))
            per_call = (time.perf_counter() - start) / sample * total
        if count_values(client, run.info.run_id) != sample:
            raise AssertionError(f"{label}: per-call baseline lost values")

    ours, bulk, cost = median(service_totals), median(bulk_times), median(caller_costs)
    goal_speedup = 20 if label == "sqlite" else 100
    return [
        row(f"metrics {label}: caller cost per value", cost * 1e6, "us", None, 10, "<= 10 us"),
        row(
            f"metrics {label}: caller cost per value, numpy float32 values and int64 steps",
            median(numpy_costs) * 1e6, "us", None, 10, "<= 10 us",
        ),
        row(f"metrics {label}: total incl. flush vs bulk", ours, "s", bulk, 1.5, "<= 1.5x"),
        row(
            f"metrics {label}: per-call log_metric / total (speed-up)",
            per_call, "s", ours, None, f">= {goal_speedup}x",
            speedup_goal=goal_speedup,
        ),
    ]  # fmt: skip


def bench_checks(sizes: Sizes) -> list[Row]:
    """A call's rows checked by MLflow's rules vs built unchecked; every name new vs seen."""
    from regression_model_template.io.values import metric_rows

    total = sizes.steps * len(METRICS)
    seen = [{k: step * 0.5 for k in METRICS} for step in range(sizes.steps)]
    new = [{f"{k}_{step}": step * 0.5 for k in METRICS} for step in range(sizes.steps)]

    def unchecked() -> None:  # what log_metrics did before values were checked
        for step, values in enumerate(seen):
            _ = [[key, float(value), 0, step] for key, value in values.items()]

    def checked(steps: list[dict[str, float]]) -> T.Callable[[], None]:
        def build() -> None:
            known: set[str] = set()  # the writer's names: new for each run
            for step, values in enumerate(steps):
                metric_rows(values, step, 0, known)

        return build

    repeats = max(sizes.repeats, 5)  # microseconds: cheap to repeat, noisy otherwise
    plain = median([timed(unchecked) for _ in range(repeats)]) / total
    names_seen = median([timed(checked(seen)) for _ in range(repeats)]) / total
    names_new = median([timed(checked(new)) for _ in range(repeats)]) / total
    return [
        row(
            "metrics: checking a call's values at the call (names seen) vs unchecked float()",
            names_seen * 1e6, "us", plain * 1e6, None, "(information)",
        ),
        row(
            "metrics: checking at the call, every name new vs names seen (per value)",
            names_new * 1e6, "us", names_seen * 1e6, None, "(information)",
        ),
    ]  # fmt: skip
