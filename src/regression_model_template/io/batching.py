"""Fast, crash-proof metric logging: values spooled to disk, shipped by a background thread.

``mlflow.log_metric`` costs one round trip per value (~5 ms on SQLite, ~57 ms over HTTP);
``MlflowClient.log_batch`` writes up to 1,000 values per call. :class:`BatchWriter` appends
each call's values to the run's spool (:mod:`.spool`) in microseconds and returns; a background
thread reads the spool and writes it with ``log_batch``, then records what the store
acknowledged. Memory holds at most ``uploads`` batches, however long the backlog.

- A killed process loses nothing: the values are the kernel's, and the next start (or
  ``regression-model-template recover``) sends them.
- An unreachable store stalls nobody: the backlog grows on disk, the writer retries with capped
  backoff for as long as it takes, and says once that the store is unreachable, and again when
  it is back.
- A tracking server with several workers takes ``uploads`` batches at once (calls in
  parallel); a database store is written by one call at a time.
- Values the store *refuses* (a changed parameter, a deleted run) cost only themselves: they are
  found (:func:`.uploads.deliver`), tried again ``retries`` times, then set aside in
  ``<spool_dir>/refused/<run>.jsonl`` and warned about; every other value is written. The run's
  owner reports them when the run ends (:meth:`BatchWriter.refusals`).

``MlflowService`` owns one writer between ``start()`` and ``stop()``; use it through
``MlflowService.log_metrics`` / ``log_params``.
"""

from __future__ import annotations

import atexit
import functools
import threading
import time
import typing as T
import weakref
from pathlib import Path

from loguru import logger

from regression_model_template.io import values
from regression_model_template.io.errors import ServiceError
from regression_model_template.io.overflow import MEMORY_LIMIT, NoSpool, Overflow, cause
from regression_model_template.io.reaper import HEARTBEAT
from regression_model_template.io.spool import Batch, RunSpool, read_batch, set_aside
from regression_model_template.io.uploads import (
    MAX_METRICS_PER_BATCH,
    Refusal,
    Refused,
    Uploaders,
    deliver,
    describe_refusals,
    failure,
)

if T.TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["BatchWriter", "StoreUnreachable", "WriteError"]


class WriteError(ServiceError):
    """Values could not be written to the tracking store; they are kept in the spool.

    Example:
        >>> str(WriteError("3 values not written"))
        'MlflowService.tracking_uri: 3 values not written'
    """

    def __init__(self, cause: str) -> None:
        super().__init__("MlflowService", "tracking_uri", cause)


class StoreUnreachable(WriteError):
    """The store did not take the values in time; they are safe in the spool, to be sent later.

    Example:
        >>> isinstance(StoreUnreachable("12 values not written within 60 s"), WriteError)
        True
    """


class BatchWriter:
    """Spool values per run; write them with ``log_batch`` in the background.

    Args:
        client: the client that writes.
        spool_dir: where each run's spool folder goes.
        store: the tracking store, credentials masked (recorded in each spool).
        store_id: what the store is (``stores.store_identity``), recorded in each spool for
            recovery to match (None: that of ``store``).
        interval: seconds a value may wait before it is written.
        retries: retries of a value the store refuses, before it is set aside.
        backoff: pause before the first retry, in seconds (doubled each time, up to
            ``max_backoff``).
        max_backoff: the longest pause between two attempts while the store is unreachable.
        redact: masks secrets in error messages (``MlflowService.redact``).
        exit_timeout: seconds the interpreter's exit waits for the store to take what is
            spooled (the rest stays in the spool).
        slow_after: seconds after which a write that has not returned counts as the store
            being unreachable (warned once, with the number of values waiting).
        uploads: ``log_batch`` calls in flight at once (1: one at a time). More than one
            helps a tracking server with several workers; a database store gets one.
        heartbeat: seconds between two heartbeats of each owned run not yet ended: the tag
            ``rmt.heartbeat`` (:mod:`.reaper`) set to the time (None: no heartbeat). A beat
            that fails is dropped: the next one comes ``heartbeat`` seconds later.
        memory_limit: values held in memory at most while spools cannot be written (a full
            disk: :mod:`.overflow`); a call that would pass it waits for the store.

    Raises:
        ServiceError: another process owns a run's spool folder (``mlflow.spool_dir``).

    Example:
        >>> import tempfile
        >>> from mlflow.tracking import MlflowClient
        >>> client = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/m.db")
        >>> run_id = client.create_run("0").info.run_id
        >>> writer = BatchWriter(client, Path(tempfile.mkdtemp()))
        >>> for step in range(3):
        ...     writer.log_metrics(run_id, {"loss": 1.0 / (step + 1)}, step=step)
        >>> writer.close()
        >>> [m.value for m in client.get_metric_history(run_id, "loss")]
        [1.0, 0.5, 0.3333333333333333]
    """

    def __init__(
        self,
        client: MlflowClient,
        spool_dir: Path,
        *,
        store: str = "",
        store_id: str | None = None,
        interval: float = 1.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        redact: T.Callable[[str], str] = str,
        exit_timeout: float = 60.0,
        slow_after: float = 10.0,
        uploads: int = 1,
        heartbeat: float | None = None,
        memory_limit: int = MEMORY_LIMIT,
    ) -> None:
        self._client = client
        self.spool_dir = Path(spool_dir)
        self._store = store
        self._store_id = store_id
        self._interval = interval
        self._retries = retries
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._redact = redact
        self.exit_timeout = exit_timeout
        self._slow_after = slow_after
        self._uploads = Uploaders(uploads)
        self._batch_limit = MAX_METRICS_PER_BATCH * uploads
        self._lock = threading.Condition()
        self._spools: dict[str, RunSpool] = {}
        self._owned: set[str] = set()  # runs released by finish_run, not by close
        self._metric_names: set[str] = set()  # names that passed MLflow's rules: checked once
        self._queued = 0  # values accepted so far
        self._written = 0  # values the store acknowledged so far
        self._held = 0  # values read from a spool, not yet acknowledged
        self._urgent = False  # a flush is waiting: write now
        self._kick = False  # a batch's worth is waiting: write now
        self._closed = False  # no more values
        self._abandoned = False  # closed with values the store did not take: leave them
        self._refused: dict[str, Refused] = {}  # per run: what the store refused for good
        self._unreachable: str | None = None  # why the store cannot be reached, while it cannot
        self._sending_since: float | None = None  # when the write in progress began
        self._heartbeat = heartbeat
        self._next_beat = time.monotonic() + (heartbeat or 0.0)  # the run's start set the first
        self._ended: set[str] = set()  # owned runs whose end is recorded: no more heartbeats
        self._memory = Overflow(memory_limit)  # records the spools could not take
        self._disk_tried_at = -float("inf")  # when memory last went back to a spool
        self._thread = threading.Thread(target=self._run, name="mlflow-batch-writer", daemon=True)
        self._thread.start()
        # Started now, not per write: Python 3.12 refuses new threads once the interpreter
        # exits, which is when the exit hook's last writes happen.
        self._watch = threading.Thread(
            target=self._watch_slow, name="mlflow-write-watch", daemon=True
        )
        self._watch.start()
        _open_writers.add(self)
        _register_exit_hook()

    # -- caller side

    def open_run(self, run_id: str, owned: bool = True) -> RunSpool:
        """Create the spool of ``run_id`` (done by the first value logged to it otherwise).

        ``owned``: the caller ends the run and releases its spool with :meth:`finish_run`;
        otherwise :meth:`close` releases it.
        """
        with self._lock:
            if owned:
                self._owned.add(run_id)
            spool = self._spools.get(run_id)
            if spool is None:
                try:
                    spool = RunSpool.create(self.spool_dir, run_id, self._store, self._store_id)
                except BlockingIOError as exc:  # locked: a live process owns the run
                    raise ServiceError(
                        "MlflowService",
                        "spool_dir",
                        f"cannot write the spool of run {run_id} in {self.spool_dir}: {exc}",
                    ) from exc
                except OSError as exc:  # a full disk: the run's values go through memory
                    spool = NoSpool(self.spool_dir / run_id, exc)
                self._spools[run_id] = spool
            return spool

    def log_metrics(
        self,
        run_id: str,
        metrics: T.Mapping[str, T.SupportsFloat],
        step: T.SupportsIndex | None = None,
    ) -> None:
        """Spool metric values for ``run_id`` (timestamped now, at ``step`` or 0).

        Checked and converted first (:func:`.values.metric_rows`): floats, integer steps.

        Raises:
            MlflowException: a name, value or step MLflow would refuse
                (``INVALID_PARAMETER_VALUE``); nothing of the call is spooled.
        """
        timestamp = int(time.time() * 1000)
        rows = values.metric_rows(metrics, step, timestamp, self._metric_names)
        self._append(run_id, {"m": rows}, len(rows))

    def log_params(self, run_id: str, params: T.Mapping[str, T.Any]) -> None:
        """Spool parameters for ``run_id`` (values are written as text, like MLflow does).

        Raises:
            MlflowException: a key MLflow would refuse, or a value over its length limit when
                MLflow does not cut it (:func:`.values.param_rows`); nothing of the call is
                spooled.
        """
        rows = values.param_rows(params)
        self._append(run_id, {"p": rows}, len(rows))

    def end_run(self, run_id: str, status: str) -> None:
        """Record the status the run ends with (``recover`` applies it if the process dies)."""
        with self._lock:
            self._ended.add(run_id)  # its heartbeat stops
        self._append(run_id, {"end": status}, 0)

    def flush(self, timeout: float | None = None) -> None:
        """Write everything spooled so far; return when the store has acknowledged it.

        Values the store refused are not waited for: see :meth:`refusals`.

        Raises:
            StoreUnreachable: ``timeout`` passed first (the values are still in the spool).
            WriteError: the writer stopped (the values are still in the spool).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            targets = {run_id: spool.written for run_id, spool in self._spools.items()}
            marks = {run_id: self._memory.mark(run_id) for run_id in self._spools}
            self._urgent = True
            self._lock.notify_all()
            while any(
                self._spools[r].sent < max(end, self._memory.moved_end(r))
                or not self._memory.reached(r, marks[r])
                for r, end in targets.items()
                if r in self._spools
            ):
                if not self._thread.is_alive():
                    raise WriteError(
                        f"{self._waiting()} values not written: writer stopped{self._disk()}"
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    why = f": {self._unreachable}" if self._unreachable else ""
                    raise StoreUnreachable(
                        f"{self._waiting()} values not written within {timeout:g} s{why}"
                        f"{self._disk()}"
                    )
                self._lock.wait(min(remaining, 1.0) if remaining is not None else 1.0)

    def refusals(self, run_id: str) -> str | None:
        """What the store refused of ``run_id``'s values so far, in a sentence (None: nothing).

        Those values are set aside; the run's other values are written.
        """
        with self._lock:
            refused = self._refused.get(run_id)
        return None if refused is None else self._redact(refused.describe())

    def finish_run(self, run_id: str, keep: bool = False, discard: bool = False) -> Path | None:
        """Release the run's spool: deleted when the store has it all, else kept for ``recover``.

        ``keep``: keep it all the same (the run's end did not reach the store); ``discard``:
        delete it all the same (the store refused its values, and the caller was told).
        Returns the folder kept, or None.
        """
        with self._lock:
            spool = self._spools.pop(run_id, None)
            self._owned.discard(run_id)
            self._ended.discard(run_id)
            self._refused.pop(run_id, None)  # its owner has reported them
            unsent = self._memory.drop(run_id)
            self._lock.notify_all()  # room in memory for callers waiting
        if spool is None:
            return None
        if unsent and not discard:
            self._save_unsent(spool, unsent)
        remove = discard or (spool.sent >= spool.written and not keep)
        spool.close(remove=remove)
        return None if remove else spool.folder

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the background thread, release the spools. Closing twice is harmless.

        ``timeout`` bounds the flush, then the writer thread gets a second to stop: one still
        inside a call to a store that does not answer is left behind (a daemon thread, which
        does not hold the process's exit).

        Raises:
            WriteError: values could not be written (they stay in the spool), or the store
                refused values of runs nobody else reports (they are set aside).
        """
        try:
            if not self._closed:
                self.flush(timeout)
                with self._lock:
                    unowned = [r for r in self._refused.items() if r[0] not in self._owned]
                if unowned:
                    described = (f"run {run}: {refused.describe()}" for run, refused in unowned)
                    raise WriteError(self._redact("; ".join(described)))
        finally:
            with self._lock:
                self._closed = self._abandoned = True  # what is left stays in the spool
                self._lock.notify_all()
            # A second for a call on its way to return and the thread to see it is abandoned
            # (a `recover` right after must not race it); one stuck in a hung call stays behind.
            self._thread.join(1.0)
            self._uploads.close()
            for run_id in [r for r in list(self._spools) if r not in self._owned]:
                self.finish_run(run_id)
            _open_writers.discard(self)

    @property
    def pending(self) -> int:
        """Values accepted but not acknowledged by the store yet (in the spool)."""
        with self._lock:
            return self._queued - self._written

    @property
    def buffered(self) -> int:
        """Values held in memory by the writer (at most ``uploads`` batches)."""
        with self._lock:
            return self._held

    def _append(self, run_id: str, record: dict[str, T.Any], count: int) -> None:
        spool = self._spools.get(run_id) or self.open_run(run_id, owned=False)
        if self._closed:
            raise WriteError("the metric writer is closed: log inside a started MlflowService")
        if self._memory.holds(run_id):  # after the records waiting in memory: in order
            self._hold(spool, record, count, None)
            return
        try:
            if isinstance(spool, NoSpool):
                spool = self._create_again(spool)
            spool.append(record)
        except OSError as exc:  # a full disk must not stop the job: memory, then the store
            self._hold(spool, record, count, exc)
            return
        with self._lock:
            self._queued += count
            if not self._kick and self._queued - self._written >= MAX_METRICS_PER_BATCH:
                self._kick = True
                self._lock.notify_all()
            back = self._memory.cause is not None
            self._memory.cause = None
        if back:
            logger.info("The spool {} can be written again: values go to it again", spool.folder)

    def _hold(
        self, spool: RunSpool, record: dict[str, T.Any], count: int, error: OSError | None
    ) -> None:
        """Keep a record the spool could not take in memory; wait while memory is full."""
        with self._lock:
            first = error is not None and self._memory.cause is None
            if error is not None:
                self._memory.cause = cause(error)
            while self._memory.full(count) and not self._closed:
                if not self._thread.is_alive():
                    raise WriteError(f"{self._waiting()} values not written: writer stopped")
                self._kick = True  # backpressure: the caller waits for the store to take some
                self._lock.notify_all()
                self._lock.wait(1.0)
            self._memory.hold(spool.run_id, record, count)
            self._queued += count
            self._kick = True
            self._lock.notify_all()
        if first:
            logger.warning(
                "Cannot write the spool {} ({}): values go straight to the tracking store from "
                "memory (up to {:,} values; log_metrics waits when that is full) until the disk "
                "takes them again. A kill now would lose the values held in memory (at most "
                "{:,}): `recover` cannot send them",
                spool.folder,
                self._memory.cause,
                self._memory.limit,
                self._memory.limit,
            )

    def _create_again(self, spool: NoSpool) -> RunSpool:
        """Try again to create the spool of a run that has none (it raised at ``open_run``)."""
        created = RunSpool.create(self.spool_dir, spool.run_id, self._store, self._store_id)
        with self._lock:
            if self._spools.get(spool.run_id) is spool:
                self._spools[spool.run_id] = created
                return created
        created.close(remove=False)  # released meanwhile
        raise OSError(spool.error.errno, cause(spool.error), str(spool.folder))

    def _save_unsent(self, spool: RunSpool, unsent: list[tuple[dict[str, T.Any], int]]) -> None:
        """Put a released run's records still in memory into its spool, for ``recover``."""
        lost = 0
        for record, count in unsent:
            try:
                spool.append(record)
            except OSError:
                lost += count
        if lost:
            logger.warning(
                "{} values of run {} were lost: the tracking store did not take them and the "
                "spool {} cannot be written ({})",
                lost,
                spool.run_id,
                spool.folder,
                self._memory.cause,
            )

    def _waiting(self) -> int:
        return self._queued - self._written

    def _disk(self) -> str:
        """What a message about values not written adds while spools cannot be written."""
        if self._memory.cause is None:
            return ""
        return (
            f"; the spool cannot be written ({self._memory.cause}) in {self.spool_dir}: "
            f"{self._memory.values} of them are only in memory"
        )

    # -- writer side

    def _run(self) -> None:
        while True:
            with self._lock:
                deadline = time.monotonic() + self._interval
                while not (self._closed or self._urgent or self._kick):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        if self._behind():
                            break
                        deadline, remaining = time.monotonic() + self._interval, self._interval
                    if (beat := self._until_beat()) <= 0:
                        break
                    self._lock.wait(min(remaining, beat))
                if self._abandoned or (self._closed and not self._behind()):
                    return
                self._urgent = self._kick = False
                spools = list(self._spools.values())
            try:
                self._beat()
                for spool in spools:
                    self._ship(spool)
            except _Abandoned:
                return

    def _behind(self) -> bool:
        return self._memory.values > 0 or any(
            spool.sent < spool.written for spool in self._spools.values()
        )

    def _ship(self, spool: RunSpool) -> None:
        """Send the run's values: what its spool holds beyond the sent mark, then its memory."""
        while True:
            self._ship_spool(spool)
            spool = self._back_to_disk(spool)
            if spool.sent < spool.written:
                continue  # records moved back from memory: the spool first
            if not self._ship_memory(spool):
                return

    def _back_to_disk(self, spool: RunSpool) -> RunSpool:
        """Move the run's records from memory back to its spool, if the disk takes them now.

        Tried at most once an interval. A training loop keeps logging: its memory queue would
        never be empty for its next record to try the spool itself.
        """
        now = time.monotonic()
        if not self._memory.holds(spool.run_id) or now - self._disk_tried_at < self._interval:
            return spool
        self._disk_tried_at = now
        if isinstance(spool, NoSpool):
            try:
                spool = self._create_again(spool)
            except OSError:
                return spool
        with self._lock:
            moved = self._memory.move(spool)
            back = moved and not self._memory.holds(spool.run_id) and self._memory.cause
            if back:
                self._memory.cause = None
        if back:
            logger.info("The spool {} can be written again: values go to it again", spool.folder)
        return spool

    def _ship_memory(self, spool: RunSpool) -> bool:
        """Send the oldest records the run holds in memory; False when it holds none."""
        with self._lock:
            batch, records = self._memory.batch(spool.run_id, self._batch_limit)
            if not records:
                return False
            self._held = batch.values
        refusals = self._send(spool, batch)
        if refusals:
            self._set_aside(spool.run_id, refusals)
        with self._lock:
            self._memory.release(spool.run_id, records, batch.values)
            self._held = 0
            self._written += batch.values
            self._lock.notify_all()
        return True

    def _ship_spool(self, spool: RunSpool) -> None:
        """Send what ``spool`` holds beyond what the store acknowledged, batch by batch."""
        while spool.sent < spool.written:
            if self._abandoned:
                raise _Abandoned()  # stopped: what is left is for `recover`
            spool.sync(self._interval)  # on the disk before it is sent, once an interval
            batch = read_batch(
                spool.folder, spool.sent, until=spool.written, limit=self._batch_limit
            )
            if batch.end <= spool.sent:
                return
            with self._lock:
                self._held = batch.values
            refusals = self._send(spool, batch)
            if refusals:
                self._set_aside(spool.run_id, refusals)
            spool.mark_sent(batch.end)  # a full disk gets the mark later: never raises
            with self._lock:
                self._held = 0
                self._written += batch.values
                self._lock.notify_all()

    def _send(self, spool: RunSpool, batch: Batch) -> list[Refusal]:
        """Write ``batch``, for as long as it takes; return what the store refused for good."""
        self._beat()  # a backlog that takes long to send must not silence the heartbeat
        pause = self._backoff

        def wait(error: Exception, refused: bool) -> None:
            nonlocal pause
            if not refused:
                self._note_unreachable(self._redact(failure(error)))
            with self._lock:
                spools = list(self._spools.values())
            for waiting in spools:  # an outage can last: what piles up meanwhile goes to disk
                waiting.sync(self._interval)
            with self._lock:
                if not self._abandoned:
                    self._lock.wait(pause)  # woken early by close()
                if self._abandoned:
                    raise _Abandoned()
            pause = min(pause * 2, self._max_backoff)

        refusals = deliver(self._client, spool.run_id, batch, wait, self._retries, self._attempt)
        with self._lock:
            was, self._unreachable = self._unreachable, None
        if was is not None:
            logger.info("The tracking store is reachable again: sending the spooled values")
        return refusals

    def _beating(self) -> list[str]:
        """The runs that have a heartbeat: owned, and their end not recorded yet (under lock)."""
        return [r for r in self._owned if r in self._spools and r not in self._ended]

    def _until_beat(self) -> float:
        """Seconds until the next heartbeat is due (under lock; infinite: none to send)."""
        if self._heartbeat is None or not self._beating():
            return float("inf")
        return self._next_beat - time.monotonic()

    def _beat(self) -> None:
        """Set the heartbeat tag of each beating run, when due; a failure is only logged.

        Timed like a write (a hanging store is warned about), skipped while the store is
        known to be unreachable (the values' retries say so already).
        """
        with self._lock:
            if self._until_beat() > 0:
                return
            self._next_beat = time.monotonic() + T.cast(float, self._heartbeat)
            runs = [] if self._unreachable is not None else self._beating()
        if not runs:
            return
        now = str(int(time.time() * 1000))
        calls = [functools.partial(self._client.set_tag, r, HEARTBEAT, now) for r in runs]
        for run_id, error in zip(runs, self._attempt(calls), strict=True):
            if error is not None:
                cause = self._redact(failure(error))
                logger.debug("The heartbeat of run {} was not recorded: {}", run_id, cause)

    def _set_aside(self, run_id: str, refusals: list[Refusal]) -> None:
        """Keep what the store refused out of the run's spool; warn now, report at the end."""
        try:
            where: object = set_aside(self.spool_dir, run_id, (r.record for r in refusals))
        except OSError as exc:
            where = f"nowhere ({exc})"
        with self._lock:
            refused = self._refused.setdefault(run_id, Refused())
            refused.add(refusals, where)
        logger.warning(
            "The tracking store refused values of run {}; its other values are written: {}",
            run_id,
            self._redact(describe_refusals(refusals, where)),
        )

    def _attempt(self, calls: T.Sequence[T.Callable[[], T.Any]]) -> list[Exception | None]:
        """Run one round of ``log_batch`` calls, timed by the watch thread; each one's error.

        Nothing is sent once the writer is abandoned: what is left belongs to ``recover``,
        which may be sending it already.
        """
        with self._lock:
            if self._abandoned:
                raise _Abandoned()
            self._sending_since = time.monotonic()
            self._lock.notify_all()
        try:
            return self._uploads.run(calls)
        finally:
            with self._lock:
                self._sending_since = None

    def _watch_slow(self) -> None:
        """Warn when a write does not return within ``slow_after``.

        MLflow retries inside one call for minutes against a server that is down: say so as
        soon as a call takes longer than any healthy store would.
        """
        while True:
            with self._lock:
                while True:
                    if self._abandoned or (self._closed and not self._thread.is_alive()):
                        return
                    since = self._sending_since
                    if since is not None and self._unreachable is None:
                        remaining = since + self._slow_after - time.monotonic()
                        if remaining <= 0:
                            break
                        self._lock.wait(remaining)
                    else:
                        self._lock.wait(self._slow_after)
            cause = f"no answer for {self._slow_after:g} s, MLflow is retrying"
            self._note_unreachable(cause, during=since)

    def _note_unreachable(self, cause: str, during: float | None = None) -> None:
        """Warn once that the store cannot be reached (``during``: only if that write goes on)."""
        with self._lock:
            if self._unreachable is not None:
                return
            if during is not None and self._sending_since != during:
                return  # the slow write returned meanwhile
            self._unreachable = cause
            waiting = self._waiting()
        logger.warning(
            "The tracking store cannot be reached ({}): {} values wait in the spool {}; "
            "retrying until it is back",
            cause,
            waiting,
            self.spool_dir,
        )


class _Abandoned(Exception):
    """The writer was closed while the store could not be reached: the spool keeps the rest."""


_open_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


@functools.cache
def _register_exit_hook() -> None:
    # Registered by the first writer, after mlflow is imported: exit hooks run last-registered
    # first, so the spool is flushed before MLflow's own hook ends the runs.
    atexit.register(_flush_at_exit)


def _flush_at_exit() -> None:
    """At interpreter exit, write what is spooled (MLflow's exit hook ends runs later)."""
    for writer in list(_open_writers):
        try:
            writer.close(timeout=writer.exit_timeout)
        except WriteError as error:
            where = f" (kept in {writer.spool_dir}: `regression-model-template recover` sends them)"
            print(f"regression_model_template: {error}{where}", flush=True)
