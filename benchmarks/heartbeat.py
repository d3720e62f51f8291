"""The heartbeat's cost on the training loop (group ``heartbeat``).

A training loop, on SQLite: each step computes (~0.25 ms of Python) and logs 5 metrics. Timed
with a heartbeat every 0.05 s (600 times the default rate) and with none due during the loop
(``heartbeat_interval`` of a day). The beats run in the background writer, so all they can
cost the loop is the interpreter's time. Repeats alternate the two, so that a slower moment
of the machine falls on both.
"""

from __future__ import annotations

import math
import time
import typing as T

from benchmarks.common import METRICS, Context, Row, count_values, median, note, row

FAST = 0.05  # seconds between two heartbeats, measured
NEVER = 86_400.0  # a day: no heartbeat during the loop but the run's first, with its start


def step_work(step: int) -> float:
    """A training step's Python work: ~0.25 ms here, holding the interpreter like real code."""
    return math.fsum(math.sin(step + i) for i in range(1200))


def run(context: Context) -> list[Row]:
    from mlflow.tracking import MlflowClient

    from regression_model_template.io.services import MlflowService

    uri = f"sqlite:///{context.folder}/heartbeat.db"
    steps = context.sizes.steps  # ~0.5 s per loop at full size: ~10 heartbeats
    repeats = context.sizes.repeats * 3  # loops of each kind, in pairs
    client = MlflowClient(uri)
    times: dict[float, list[float]] = {FAST: [], NEVER: []}
    beats: list[int] = []
    for repeat in range(repeats):
        for interval in (FAST, NEVER) if repeat % 2 else (NEVER, FAST):
            service = MlflowService(
                tracking_uri=uri,
                experiment_name="bench-heartbeat",
                autolog_disable=True,
                heartbeat_interval=interval,
            )
            run_config = MlflowService.RunConfig(name="bench", log_system_metrics=False)
            with service, service.run_context(run_config) as run:
                first = _heard(client, run.info.run_id)
                start = time.perf_counter()
                for step in range(steps):
                    loss = step_work(step)
                    service.log_metrics({k: loss for k in METRICS}, step=step)
                times[interval].append(time.perf_counter() - start)
                if interval == FAST:
                    beats.append(_heard(client, run.info.run_id) - first)
            stored = count_values(client, run.info.run_id)
            if stored != steps * len(METRICS):
                raise AssertionError(f"heartbeat: {stored} of {steps * len(METRICS)} stored")
    if not context.quick and not any(beats):
        raise AssertionError("heartbeat: no heartbeat during the measured loops")
    with_beats, without = median(times[FAST]), median(times[NEVER])
    paired = median([a / b for a, b in zip(times[FAST], times[NEVER], strict=True)])
    note(
        f"heartbeat: the median of the {repeats} paired ratios (loop with heartbeats / the loop "
        f"next to it without) is {paired:.3f}; the writer's set_tag on SQLite costs ~4 ms of CPU "
        "in the job's process (a server does that work in its own)"
    )
    return [
        row(
            f"heartbeat: training loop ({steps:,} steps of ~0.25 ms, 5 values each) with a "
            f"heartbeat every {FAST:g} s vs none",
            with_beats, "s", without, 1.01, "<= 1.01x",
        )
    ]  # fmt: skip


def _heard(client: T.Any, run_id: str) -> int:
    from regression_model_template.io.reaper import HEARTBEAT

    return int(client.get_run(run_id).data.tags[HEARTBEAT])
