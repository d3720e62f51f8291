"""Writing spooled values to the store: within MLflow's limits, in parallel, refusals set aside.

A batch read from a run's spool becomes chunks of at most 1,000 metrics (100 params), one
``log_batch`` call each (:func:`chunks`). The calls of a batch hold different values and can
run in any order or at once, which is what lets a tracking server with several workers take a
backlog faster: :class:`Uploaders` runs them ``size`` at a time. Each value is sent once; only
a call that failed is sent again.

:func:`deliver` sends a batch so that a store's refusal costs only the values refused:

- a chunk the store cannot be reached for is sent again after a pause (only that chunk: the
  others were stored), for as long as the caller's ``wait`` lets it;
- a chunk refused for its values (a changed parameter, a name the store will not take) is split
  in halves, down to the single value the store refuses;
- a value, or a chunk of a run the store will not write to (deleted, or ended), is tried again
  ``retries`` times, then set aside: a :class:`Refusal` names it and the store's reason.

Credentials refused (HTTP 401/403) are not a refusal of the values: they are the store not
being reachable for now, and the values wait in the spool.

Example:
    >>> import tempfile
    >>> from mlflow.tracking import MlflowClient
    >>> from regression_model_template.io.spool import Batch
    >>> client = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/m.db")
    >>> run_id = client.create_run("0").info.run_id
    >>> _ = client.log_param(run_id, "alpha", "1")
    >>> batch = Batch([["loss", 0.5, 1, 0]], [["alpha", "2"], ["beta", "3"]], 0, None)
    >>> def stop(error: Exception, refused: bool) -> None:
    ...     raise error
    >>> [(r.key, r.code) for r in deliver(client, run_id, batch, wait=stop)]
    [('alpha', 'INVALID_PARAMETER_VALUE')]
    >>> sorted(client.get_run(run_id).data.params.items())
    [('alpha', '1'), ('beta', '3')]
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
    "Chunk",
    "Refusal",
    "Refused",
    "Uploaders",
    "chunks",
    "deliver",
    "describe_refusals",
    "failure",
    "is_refusal",
]

# MLflow's limits for one log_batch call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100

# Errors by which a store refuses some of the values themselves: split the call to find them.
_VALUES_REFUSED = frozenset({"BAD_REQUEST", "INVALID_PARAMETER_VALUE"})
# Errors by which it refuses the run (deleted, ended): every value of the call, as it stands.
_RUN_REFUSED = frozenset({"INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"})
# Errors by which a server refuses the caller: the values wait until the credentials work.
_CREDENTIALS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is the store refusing values (not unreachable, not credentials).

    Example:
        >>> from mlflow.exceptions import MlflowException
        >>> from mlflow.protos import databricks_pb2 as codes
        >>> is_refusal(MlflowException("no", error_code=codes.INVALID_PARAMETER_VALUE))
        True
        >>> is_refusal(MlflowException("who are you?", error_code=codes.UNAUTHENTICATED))
        False
    """
    return _code(error) in _VALUES_REFUSED | _RUN_REFUSED


def failure(error: BaseException) -> str:
    """``error`` in one line for a person; credentials refused say so first.

    Example:
        >>> from mlflow.exceptions import MlflowException
        >>> from mlflow.protos import databricks_pb2 as codes
        >>> failure(MlflowException("error code 401 != 200", error_code=codes.UNAUTHENTICATED))
        'the server refused the credentials (UNAUTHENTICATED, HTTP 401): error code 401 != 200'
        >>> failure(ConnectionError("Connection refused"))
        'ConnectionError: Connection refused'
    """
    line = (str(getattr(error, "message", error)).splitlines() or [""])[0]
    code = _code(error)
    if code in _CREDENTIALS:
        return f"the server refused the credentials ({code}, HTTP {_CREDENTIALS[code]}): {line}"
    return f"{type(error).__name__}: {line}"


class Chunk(T.NamedTuple):
    """Values for one ``log_batch`` call: metrics (``kind`` "m") or params ("p")."""

    kind: str
    rows: T.Sequence[T.Sequence[T.Any]]  # [key, value, timestamp ms, step] or [key, text]
    tries: int = 0  # refusals so far, once it cannot be split any more

    def send(self, client: MlflowClient, run_id: str) -> None:
        """Write the chunk with one synchronous ``log_batch`` call."""
        from mlflow.entities import Metric, Param

        if self.kind == "p":
            client.log_batch(run_id, params=[Param(k, v) for k, v in self.rows], synchronous=True)
        else:
            metrics = [Metric(key, value, ms, step) for key, value, ms, step in self.rows]
            client.log_batch(run_id, metrics=metrics, synchronous=True)


class Refusal(T.NamedTuple):
    """A value the store refused for good: its row as spooled, and the store's reason."""

    kind: str  # "m": a metric, "p": a parameter
    row: T.Sequence[T.Any]
    code: str  # MLflow's error code
    reason: str  # the store's message, first line

    @property
    def key(self) -> str:
        """The metric's or parameter's name."""
        return str(self.row[0])

    @property
    def record(self) -> dict[str, T.Any]:
        """What is set aside for a person to read: the row and the store's reason."""
        return {"row": self.row, "reason": self.reason}


class Refused:
    """What the store refused of one run: how many values, the first few, where they went.

    Example:
        >>> refused = Refused()
        >>> refused.add([Refusal("p", ["alpha", "2"], "INVALID_PARAMETER_VALUE", "changed")], "f")
        >>> refused.count, refused.describe()
        (1, "1 value(s) refused by the store, set aside in f: param 'alpha' (changed)")
    """

    KEPT = 100  # examples kept in memory: a run the store stopped taking refuses everything

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[Refusal] = []
        self.where: object = ""

    def add(self, refusals: T.Sequence[Refusal], where: object) -> None:
        """Count ``refusals``, set aside in ``where``."""
        self.count += len(refusals)
        self.examples += refusals[: self.KEPT - len(self.examples)]
        self.where = where

    def describe(self) -> str:
        """One sentence for a person (:func:`describe_refusals`)."""
        return describe_refusals(self.examples, self.where, total=self.count)


def chunks(batch: Batch) -> list[Chunk]:
    """The ``log_batch`` calls that write ``batch``, each within MLflow's limits per call."""
    params, metrics = batch.params, batch.metrics
    return [
        Chunk("p", params[start : start + MAX_PARAMS_PER_BATCH])
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH)
    ] + [
        Chunk("m", metrics[start : start + MAX_METRICS_PER_BATCH])
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH)
    ]


Wait = T.Callable[[Exception, bool], None]
Run = T.Callable[[T.Sequence[T.Callable[[], T.Any]]], list[Exception | None]]


def deliver(
    client: MlflowClient,
    run_id: str,
    batch: Batch,
    wait: Wait,
    retries: int = 0,
    run: Run | None = None,
) -> list[Refusal]:
    """Write ``batch``; return the values the store refused for good (the rest is stored).

    Args:
        client: the client that writes.
        run_id: the run the values belong to.
        batch: the values.
        wait: called with an error after a round in which some calls failed, before those are
            sent again: ``wait(error, refused)``, ``refused`` False when the store could not be
            reached. It pauses, or raises to give up (the values are then still in the spool).
        retries: how many times a value the store refuses is tried again before it is set
            aside (each time after ``wait``).
        run: runs the calls of a round, returning each one's error or None (default: one
            after the other, in this thread; :meth:`Uploaders.run` runs them at once).
    """
    run = run or Uploaders(1).run  # no helper thread: one call after the other, here
    pending, refused = chunks(batch), []
    while pending:
        errors = run([functools.partial(chunk.send, client, run_id) for chunk in pending])
        again: list[Chunk] = []
        waited: tuple[Exception, bool] | None = None
        for chunk, error in zip(pending, errors, strict=True):
            if error is None:
                continue
            if not is_refusal(error):
                again.append(chunk)
                waited = (error, False)
            elif _code(error) in _VALUES_REFUSED and len(chunk.rows) > 1:
                middle = len(chunk.rows) // 2
                again += [
                    chunk._replace(rows=chunk.rows[:middle]),
                    chunk._replace(rows=chunk.rows[middle:]),
                ]
            elif chunk.tries < retries:
                again.append(chunk._replace(tries=chunk.tries + 1))
                waited = waited or (error, True)
            else:
                reason = str(getattr(error, "message", error)).splitlines()[0]
                code = _code(error) or ""
                refused += [Refusal(chunk.kind, row, code, reason) for row in chunk.rows]
        pending = again
        if waited is not None:
            wait(*waited)
    return refused


def describe_refusals(
    refusals: T.Sequence[Refusal], where: object, most: int = 3, total: int | None = None
) -> str:
    """One sentence naming what the store refused, by key, with its reason.

    ``total``: how many values were refused, when ``refusals`` holds only the first ones.

    Example:
        >>> rows = [Refusal("p", ["alpha", "2"], "INVALID_PARAMETER_VALUE", "changed")]
        >>> describe_refusals(rows, "refused/r1.jsonl")
        "1 value(s) refused by the store, set aside in refused/r1.jsonl: param 'alpha' (changed)"
    """
    by_key: dict[tuple[str, str], list[Refusal]] = {}
    for refusal in refusals:
        by_key.setdefault((refusal.kind, refusal.key), []).append(refusal)
    named = [
        f"{'param' if kind == 'p' else 'metric'} {key!r}"
        + (f" x{len(rows)}" if len(rows) > 1 else "")
        + f" ({rows[0].reason})"
        for (kind, key), rows in list(by_key.items())[:most]
    ]
    more = f", and {len(by_key) - most} more key(s)" if len(by_key) > most else ""
    count = len(refusals) if total is None else total
    return f"{count} value(s) refused by the store, set aside in {where}: {'; '.join(named)}{more}"


def _code(error: BaseException) -> str | None:
    return getattr(error, "error_code", None)


class Uploaders:
    """Run calls ``size`` at a time: the caller's thread and ``size - 1`` started up front.

    Started with the writer, not per batch: Python 3.12 refuses to start a thread once the
    interpreter exits, which is when the exit hook writes the last values.

    Example:
        >>> uploaders = Uploaders(3)
        >>> done = []
        >>> uploaders.run([functools.partial(done.append, i) for i in range(5)])
        [None, None, None, None, None]
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

    def run(self, calls: T.Sequence[T.Callable[[], T.Any]]) -> list[Exception | None]:
        """Run every call; once all have returned, give each one's error, or None."""
        errors: list[Exception | None] = [None] * len(calls)
        done = threading.Semaphore(0)

        def job(index: int) -> None:
            try:
                calls[index]()
            except Exception as exc:
                errors[index] = exc
            finally:
                done.release()

        own = range(min(1, len(calls))) if self._threads else range(len(calls))
        for index in range(len(own), len(calls)):
            self._jobs.put(functools.partial(job, index))
        for index in own:
            job(index)
        for _ in calls:  # every call releases once, the caller's own included
            done.acquire()
        return errors

    def close(self) -> None:
        """Let the helper threads end."""
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
