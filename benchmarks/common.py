"""What the groups share: sizes, timing, the rows of the table and the notes under it."""

from __future__ import annotations

import statistics
import sys
import time
import typing as T
from pathlib import Path

Row = tuple[str, str, str, str, str]  # benchmark, measured, baseline, ratio, goal + verdict
NOTES: list[str] = []  # findings of this run, listed under the table
METRICS = ("loss", "rmse", "mae", "r2", "lr")


class Sizes(T.NamedTuple):
    steps: int  # metric steps (x 5 metrics)
    per_call_sample: int  # values timed for the per-call baseline (then scaled)
    log_calls: int
    repeats: int
    team_jobs: int = 8  # concurrent jobs against the team server
    team_values: int = 20_000  # values each job logs through MlflowService.log_metrics
    team_sample: int = 200  # values each job logs with per-call mlflow.log_metric (then scaled)


FULL = Sizes(steps=2000, per_call_sample=500, log_calls=100_000, repeats=5)
QUICK = Sizes(steps=40, per_call_sample=20, log_calls=2_000, repeats=1, team_jobs=2,
              team_values=500, team_sample=20)  # fmt: skip


class Context(T.NamedTuple):
    """What every group receives: a scratch folder (removed afterwards), the sizes, the mode."""

    folder: Path
    sizes: Sizes
    quick: bool  # --quick: no server, sizes too small for the goals


def median(times: list[float]) -> float:
    return statistics.median(times)


def timed(function: T.Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def count_values(client: T.Any, run_id: str) -> int:
    """How many values of :data:`METRICS` the store holds for the run."""
    return sum(len(client.get_metric_history(run_id, key)) for key in METRICS)


def note(text: str) -> None:
    """A finding of this run: printed now, listed under the table."""
    print(text, file=sys.stderr)
    NOTES.append(text)


def row(
    name: str,
    value: float,
    unit: str,
    baseline: float | None,
    limit: float | None,
    goal: str,
    speedup_goal: float | None = None,
) -> Row:
    """A measurement (lower is better), its baseline and the ratio against ``limit``.

    With ``speedup_goal``, the ratio is baseline / value and must reach the goal instead.
    """
    if speedup_goal is not None and baseline is not None:
        ratio = value / baseline
        verdict = "met" if ratio >= speedup_goal else "MISSED"
        return (
            name,
            f"{baseline:.3g} {unit}",
            f"{value:.3g} {unit}",
            f"{ratio:.1f}x",
            f"{goal} {verdict}",
        )
    ratio_text, verdict = "", ""
    if baseline is not None:
        ratio = value / baseline
        ratio_text = f"{ratio:.2f}x"
        if limit is not None:
            verdict = "met" if ratio <= limit else "MISSED"
    elif limit is not None:
        verdict = "met" if value <= limit else "MISSED"
    base_text = f"{baseline:.3g} {unit}" if baseline is not None else ""
    return (name, f"{value:.3g} {unit}", base_text, ratio_text, f"{goal} {verdict}".strip())


def rate_row(name: str, ours: float, baseline: float, goal: float) -> Row:
    """A rate (higher is better): ours, the baseline, ours / baseline against ``>= goal x``."""
    ratio = ours / baseline
    verdict = "met" if ratio >= goal else "MISSED"
    return (
        name,
        f"{ours:,.0f} /s",
        f"{baseline:,.0f} /s",
        f"{ratio:.1f}x",
        f">= {goal:g}x {verdict}",
    )
