"""Writing spooled values to the store: ``log_batch`` calls within MLflow's limits, in parallel.

A batch read from a run's spool becomes one ``log_batch`` call per 1,000 metrics (100 params).
The calls can run in any order or at once (a SQL store ignores a value it already has), which
is what lets a tracking server with several workers take a backlog faster: :class:`Uploaders`
runs them ``size`` at a time.
"""

from __future__ import annotations

import functools
import queue
import threading
import typing as T

if T.TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from regression_model_template.io.spool import Batch

__all__ = [
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "Uploaders",
    "batch_calls",
    "is_refusal",
    "write_batch",
]

# MLflow's limits for one log_batch call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100

# Errors by which a store refuses the values themselves: sending them again cannot help.
_REFUSALS = frozenset(
    {
        "BAD_REQUEST",
        "INVALID_PARAMETER_VALUE",
        "INVALID_STATE",
        "PERMISSION_DENIED",
        "RESOURCE_DOES_NOT_EXIST",
        "UNAUTHENTICATED",
    }
)


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is the store refusing the values (not the store being unreachable)."""
    return getattr(error, "error_code", None) in _REFUSALS


def write_batch(client: MlflowClient, run_id: str, batch: Batch) -> None:
    """Write a spool batch with ``log_batch``, within MLflow's limits per call."""
    for call in batch_calls(client, run_id, batch):
        call()


def batch_calls(
    client: MlflowClient, run_id: str, batch: Batch
) -> T.Sequence[T.Callable[[], T.Any]]:
    """The ``log_batch`` calls that write ``batch``, each within MLflow's limits per call.

    They can run in any order, or at once: a SQL store ignores a value it already has.
    """
    from mlflow.entities import Metric, Param

    params = [Param(key, text) for key, text in batch.params]
    metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in batch.metrics]
    write = functools.partial(client.log_batch, run_id, synchronous=True)
    return [
        functools.partial(write, params=params[start : start + MAX_PARAMS_PER_BATCH])
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH)
    ] + [
        functools.partial(write, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH)
    ]


class Uploaders:
    """Run calls ``size`` at a time: the caller's thread and ``size - 1`` started up front.

    Started with the writer, not per batch: Python 3.12 refuses to start a thread once the
    interpreter exits, which is when the exit hook writes the last values.

    Example:
        >>> uploaders = Uploaders(3)
        >>> done = []
        >>> uploaders.run([functools.partial(done.append, i) for i in range(5)])
        >>> sorted(done)
        [0, 1, 2, 3, 4]
        >>> uploaders.close()
    """

    def __init__(self, size: int) -> None:
        self._jobs: queue.SimpleQueue[T.Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"mlflow-upload-{i}", daemon=True)
            for i in range(1, size)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, calls: T.Sequence[T.Callable[[], T.Any]]) -> None:
        """Run every call; once all have returned, raise the first error, if any."""
        errors: list[Exception] = []
        done = threading.Semaphore(0)

        def job(call: T.Callable[[], T.Any]) -> None:
            try:
                call()
            except Exception as exc:
                errors.append(exc)
            finally:
                done.release()

        own, helped = (calls[:1], calls[1:]) if self._threads else (calls, [])
        for call in helped:
            self._jobs.put(functools.partial(job, call))
        for call in own:
            job(call)
        for _ in calls:  # every call releases once, the caller's own included
            done.acquire()
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Let the helper threads end."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
