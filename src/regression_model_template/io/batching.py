"""Fast, lossless metric logging: an in-memory buffer written by a background thread.

``mlflow.log_metric`` costs one round trip per value (~5 ms on SQLite, ~57 ms over HTTP);
``MlflowClient.log_batch`` writes up to 1,000 values per call. :class:`BatchWriter` lets the
caller append values in microseconds and writes them in batches, and it never loses a value
silently: a write that keeps failing is reported by the next call (and by ``flush``).

``MlflowService`` owns one writer between ``start()`` and ``stop()``; use it through
``MlflowService.log_metrics`` / ``log_params``.
"""

from __future__ import annotations

import atexit
import threading
import time
import typing as T
import weakref

from regression_model_template.io.errors import ServiceError
from regression_model_template.io.masking import RedactedError

if T.TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["BatchWriter", "WriteError"]

# MLflow's limits for one log_batch call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100

_Metric = tuple[str, str, float, int, int]  # run_id, key, value, timestamp (ms), step
_Param = tuple[str, str, str]  # run_id, key, value


class WriteError(ServiceError):
    """Values could not be written to the tracking store after every retry.

    Example:
        >>> str(WriteError("3 values not written"))
        'MlflowService.tracking_uri: 3 values not written'
    """

    def __init__(self, cause: str) -> None:
        super().__init__("MlflowService", "tracking_uri", cause)


class BatchWriter:
    """Buffer metrics and params per run; write them with ``log_batch`` in the background.

    Values are written when ``batch_size`` of them are waiting, when ``interval`` seconds have
    passed, or on ``flush()``. When ``max_pending`` values are waiting, callers block until the
    writer catches up: memory stays bounded. A failed write is retried ``retries`` times with
    growing pauses; then the writer stops and every later call raises :class:`WriteError`
    saying how many values were not written.

    Args:
        client: the client that writes.
        interval: seconds a value may wait before it is written.
        max_pending: values held in memory at most before callers wait.
        retries: retries of a failed write before giving up.
        backoff: pause before the first retry, in seconds (doubled for each next one).
        redact: masks secrets in error messages (``MlflowService.redact``).

    Example:
        >>> import tempfile
        >>> from mlflow.tracking import MlflowClient
        >>> client = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/m.db")
        >>> run_id = client.create_run("0").info.run_id
        >>> writer = BatchWriter(client)
        >>> for step in range(3):
        ...     writer.log_metrics(run_id, {"loss": 1.0 / (step + 1)}, step=step)
        >>> writer.close()
        >>> [m.value for m in client.get_metric_history(run_id, "loss")]
        [1.0, 0.5, 0.3333333333333333]
    """

    def __init__(
        self,
        client: MlflowClient,
        *,
        interval: float = 1.0,
        max_pending: int = 100_000,
        retries: int = 3,
        backoff: float = 0.5,
        redact: T.Callable[[str], str] = str,
    ) -> None:
        self._client = client
        self._interval = interval
        self._max_pending = max(max_pending, MAX_METRICS_PER_BATCH)
        self._retries = retries
        self._backoff = backoff
        self._redact = redact
        self._lock = threading.Condition()
        self._metrics: list[_Metric] = []
        self._params: list[_Param] = []
        self._queued = 0  # values accepted so far
        self._written = 0  # values written so far
        self._urgent = False  # a flush is waiting: write now
        self._closed = False
        self._error: WriteError | None = None
        self._reported = False  # the error has reached a caller: close() need not repeat it
        self._thread = threading.Thread(target=self._run, name="mlflow-batch-writer", daemon=True)
        self._thread.start()
        _open_writers.add(self)

    # -- caller side

    def log_metrics(
        self, run_id: str, metrics: T.Mapping[str, float], step: int | None = None
    ) -> None:
        """Queue metric values for ``run_id`` (timestamped now, at ``step`` or 0)."""
        timestamp = int(time.time() * 1000)
        step = step or 0
        rows = [(run_id, key, float(value), timestamp, step) for key, value in metrics.items()]
        with self._lock:
            self._admit()
            self._metrics.extend(rows)
            self._queued += len(rows)
            if len(self._metrics) >= MAX_METRICS_PER_BATCH:
                self._lock.notify_all()

    def log_params(self, run_id: str, params: T.Mapping[str, T.Any]) -> None:
        """Queue parameters for ``run_id`` (values are written as text, like MLflow does)."""
        rows = [(run_id, key, str(value)) for key, value in params.items()]
        with self._lock:
            self._admit()
            self._params.extend(rows)
            self._queued += len(rows)

    def flush(self, timeout: float | None = None) -> None:
        """Write everything queued so far; return when it is stored.

        Raises:
            WriteError: some values could not be written, or ``timeout`` passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._queued
            self._urgent = True
            self._lock.notify_all()
            while self._written < target:
                if self._error is not None:
                    raise self._failure()
                if not self._thread.is_alive():
                    raise WriteError(f"{target - self._written} values not written: writer stopped")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WriteError(
                        f"{target - self._written} values not written within {timeout:g} s"
                    )
                self._lock.wait(remaining if remaining is not None else 1.0)
            if self._error is not None:
                raise self._failure()

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the background thread. Closing twice is harmless.

        Raises:
            WriteError: values could not be written, unless a caller was already told.
        """
        try:
            if not self._closed and not self._reported:
                self.flush(timeout)
        finally:
            with self._lock:
                self._closed = True
                self._lock.notify_all()
            self._thread.join(timeout)
            _open_writers.discard(self)

    @property
    def pending(self) -> int:
        """Values accepted but not written yet."""
        with self._lock:
            return self._queued - self._written

    @property
    def buffered(self) -> int:
        """Values waiting in memory for the writer (bounded by ``max_pending``)."""
        with self._lock:
            return len(self._metrics) + len(self._params)

    def _admit(self) -> None:
        """Raise a stored failure; wait while the buffer is full (called with the lock)."""
        if self._closed:
            raise WriteError("the metric writer is closed: log inside a started MlflowService")
        while self._error is None and len(self._metrics) + len(self._params) >= self._max_pending:
            self._urgent = True
            self._lock.notify_all()
            self._lock.wait(1.0)
        if self._error is not None:
            raise self._failure()

    def _failure(self) -> WriteError:
        assert self._error is not None
        self._reported = True
        return self._error

    # -- writer side

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._metrics or self._params or self._closed):
                    self._lock.wait()
                if self._closed and not (self._metrics or self._params):
                    return
                deadline = time.monotonic() + self._interval
                while (
                    len(self._metrics) < MAX_METRICS_PER_BATCH
                    and not self._urgent
                    and not self._closed
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    self._lock.wait(remaining)
                metrics, self._metrics = self._metrics, []
                params, self._params = self._params, []
                self._urgent = False
            try:
                self._write(metrics, params)
            except WriteError as error:
                with self._lock:
                    self._error = error
                    self._lock.notify_all()
                return
            with self._lock:
                self._written += len(metrics) + len(params)
                self._lock.notify_all()

    def _write(self, metrics: list[_Metric], params: list[_Param]) -> None:
        from mlflow.entities import Metric, Param

        by_run: dict[str, tuple[list[Metric], list[Param]]] = {}
        for run_id, key, value, timestamp, step in metrics:
            by_run.setdefault(run_id, ([], []))[0].append(Metric(key, value, timestamp, step))
        for run_id, key, text in params:
            by_run.setdefault(run_id, ([], []))[1].append(Param(key, text))
        for run_id, (run_metrics, run_params) in by_run.items():
            for start in range(0, len(run_params), MAX_PARAMS_PER_BATCH):
                self._send(run_id, [], run_params[start : start + MAX_PARAMS_PER_BATCH])
            for start in range(0, len(run_metrics), MAX_METRICS_PER_BATCH):
                self._send(run_id, run_metrics[start : start + MAX_METRICS_PER_BATCH], [])

    def _send(self, run_id: str, metrics: list[T.Any], params: list[T.Any]) -> None:
        pause = self._backoff
        for attempt in range(self._retries + 1):
            try:
                self._client.log_batch(run_id, metrics=metrics, params=params, synchronous=True)
                return
            except Exception as exc:
                if attempt == self._retries:
                    count = len(metrics) + len(params)
                    cause = self._redact(f"{type(exc).__name__}: {exc}")
                    raise WriteError(
                        f"{count} values could not be written to run {run_id} after "
                        f"{self._retries + 1} attempts: {cause}"
                    ) from RedactedError(cause)
                time.sleep(pause)
                pause *= 2


_open_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """At interpreter exit, write what is still buffered (MLflow's exit hook ends runs later)."""
    for writer in list(_open_writers):
        try:
            writer.close(timeout=60)
        except WriteError as error:
            print(f"regression_model_template: {error}", flush=True)
