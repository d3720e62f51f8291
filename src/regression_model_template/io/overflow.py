"""Values held in memory while a run's spool cannot be written (a full disk, a read-only one).

:class:`.batching.BatchWriter` appends each record to the run's spool. When the disk refuses
(``ENOSPC``, ``EIO``, ``EROFS``...), the record goes to the run's :class:`Overflow` queue instead,
and the background writer sends it straight to the store, after what the spool holds: a run's
values reach the store in the order they were logged. While a run has records in memory, its
new records queue behind them; once the queue is empty, the next record tries the spool again.

Memory is bounded by a number of values (:data:`MEMORY_LIMIT` by default): a call that would
pass it waits until the writer has sent some. Nothing is dropped, but what is in memory is lost
if the process is killed.

Example:
    >>> memory = Overflow(limit=10)
    >>> memory.hold("run1", {"m": [["loss", 0.5, 1, 0]]}, 1)
    >>> batch, records = memory.batch("run1", limit=1000)
    >>> batch.metrics, records
    ([['loss', 0.5, 1, 0]], 1)
    >>> memory.release("run1", records, batch.values)
    >>> memory.values, memory.holds("run1")
    (0, False)
"""

from __future__ import annotations

import collections
import errno
import shutil
import typing as T
from pathlib import Path

from regression_model_template.io.spool import VALUES, Batch, RunSpool

__all__ = ["MEMORY_LIMIT", "NoSpool", "Overflow", "cause"]

#: Values held in memory at most while spools cannot be written (~200 bytes each with a few
#: metrics per call, ~500 with one: 20-50 MB).
MEMORY_LIMIT = 100_000

Record = tuple[dict[str, T.Any], int]  # (spool record, its number of values)


class Overflow:
    """The records of each run that its spool could not take, in order, until the store has them.

    Not thread-safe by itself: :class:`.batching.BatchWriter` calls it under its lock.
    """

    def __init__(self, limit: int = MEMORY_LIMIT) -> None:
        self.limit = limit
        self.values = 0  # values held, all runs
        self.cause: str | None = None  # why the spool cannot be written, while it cannot
        self._runs: dict[str, collections.deque[Record]] = {}
        self._added: collections.Counter[str] = collections.Counter()  # records ever held
        self._done: collections.Counter[str] = collections.Counter()  # ...and sent or moved
        self._moved_end: collections.Counter[str] = collections.Counter()  # spool offset

    def holds(self, run_id: str) -> bool:
        """Whether ``run_id`` has records in memory (its next ones queue behind them)."""
        return bool(self._runs.get(run_id))

    def full(self, count: int) -> bool:
        """Whether ``count`` more values would pass the limit (never when nothing is held)."""
        return self.values > 0 and self.values + count > self.limit

    def hold(self, run_id: str, record: dict[str, T.Any], count: int) -> None:
        """Keep ``record`` (of ``count`` values) at the end of the run's queue."""
        self._runs.setdefault(run_id, collections.deque()).append((record, count))
        self._added[run_id] += 1
        self.values += count

    def mark(self, run_id: str) -> int:
        """Where the run's queue ends now: :meth:`reached` tells when the store has it all."""
        return self._added[run_id]

    def reached(self, run_id: str, mark: int) -> bool:
        """Whether the run's records up to ``mark`` are in the store, or back in its spool.

        Those moved back are in the store once its sent mark passes :meth:`moved_end`.
        """
        return self._done[run_id] >= mark

    def moved_end(self, run_id: str) -> int:
        """Where, in the run's spool, the records last moved back to it end (0: none moved)."""
        return self._moved_end[run_id]

    def move(self, spool: RunSpool) -> int:
        """Append the run's records to ``spool``, oldest first, while it takes them; how many.

        The run's new records go to its spool again once none is left here: in order.
        """
        queue = self._runs.get(spool.run_id)
        moved = 0
        while queue:
            record, count = queue[0]
            try:
                spool.append(record)
            except OSError:
                break
            queue.popleft()
            self.values -= count
            moved += 1
        if moved:
            self._done[spool.run_id] += moved
            self._moved_end[spool.run_id] = spool.written
        if queue is not None and not queue:
            del self._runs[spool.run_id]
        return moved

    def batch(self, run_id: str, limit: int) -> tuple[Batch, int]:
        """The oldest records of the run, up to ``limit`` metrics or params, and how many.

        They stay held until :meth:`release`: a record is in memory until the store has it.
        """
        metrics: list[list[T.Any]] = []
        params: list[list[str]] = []
        status, records = None, 0
        for record, _ in self._runs.get(run_id, ()):
            metrics.extend(record.get("m", ()))
            params.extend(record.get("p", ()))
            status = record.get("end", status)
            records += 1
            if len(metrics) >= limit or len(params) >= limit:
                break
        return Batch(metrics, params, 0, status), records

    def release(self, run_id: str, records: int, values: int) -> None:
        """The store has the run's ``records`` oldest records (``values`` values): forget them."""
        queue = self._runs.get(run_id)
        if queue is None:
            return  # dropped meanwhile (the run's spool was released): counted then
        for _ in range(records):
            queue.popleft()
        self._done[run_id] += records
        self.values -= values
        if not queue:
            del self._runs[run_id]

    def drop(self, run_id: str) -> list[Record]:
        """Take the run's records out of memory (its spool is released); the caller keeps them."""
        queue = self._runs.pop(run_id, collections.deque())
        self._done[run_id] += len(queue)
        self.values -= sum(count for _, count in queue)
        return list(queue)


def cause(error: OSError) -> str:
    """The reason of a disk error in words (``No space left on device``).

    Example:
        >>> cause(OSError(28, "No space left on device", "/spool/values.jsonl"))
        'No space left on device'
    """
    return error.strerror or str(error) or type(error).__name__


class NoSpool(RunSpool):
    """Stands for the spool of a run that could not be created: every append fails.

    The writer tries to create the real spool again whenever the run's memory queue is empty.
    """

    def __init__(self, folder: Path, error: OSError) -> None:  # no descriptors: nothing open
        self.folder = folder
        self.run_id = folder.name
        self.sent = 0
        self.error = error

    @property
    def written(self) -> int:
        """Nothing was ever written."""
        return 0

    def append(self, record: T.Mapping[str, T.Any]) -> int:
        """Refuse, with the error that kept the spool from being created."""
        raise OSError(self.error.errno or errno.EIO, cause(self.error), str(self.folder))

    def sync(self, every: float = 0.0) -> None:
        """Nothing to put on the disk."""

    def mark_sent(self, offset: int) -> None:
        """Nothing is sent from here."""

    def close(self, remove: bool) -> None:
        """Remove what the failed creation left (a folder without values, never recovered)."""
        if remove and not (self.folder / VALUES).exists():
            shutil.rmtree(self.folder, ignore_errors=True)
