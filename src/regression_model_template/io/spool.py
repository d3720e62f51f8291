"""The local spool: every logged value on disk before ``log_metrics`` returns.

One folder per run, readable by the user only::

    <spool_dir>/<run_id>/
        run.json      the run, its store (the URI with credentials masked, and what the URI
                      names: :func:`.stores.store_identity`) and the host that logged it
        values.jsonl  one JSON record per line, appended: {"m": [[key, value, ms, step], ...]},
                      {"p": [[key, text], ...]}, and {"end": status} when the run ended
        sent          how many bytes of values.jsonl the store has acknowledged
        lock          locked (``fcntl.flock``) by the process that owns the run

A record is written with one ``os.write`` on a file opened with ``O_APPEND``: once the call
returns the data is the kernel's, and killing the process cannot lose it. A write is not atomic
against SIGKILL, though: the kernel copies page by page and stops at a page boundary, so the kill
can leave the record in progress cut (its call had not returned). Reading stops there, and
recovery drops those bytes and says so. A write the disk cannot hold whole is taken back and
raises: a cut record is never followed by another. The kernel's copy survives the process,
not a power cut: :meth:`RunSpool.sync`, called by the background writer before it reads the
spool, puts it on the disk (never the caller: ``append`` stays one write). The kernel drops the
lock when the process dies, however it dies: a spool whose lock can be taken belongs to nobody
and can be recovered (:func:`.recovery.recover`); a locked one is never touched.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> spool = RunSpool.create(folder, "run1", store="sqlite:///m.db")
    >>> spool.append({"m": [["loss", 0.5, 1700000000000, 1]]})
    37
    >>> [record for _, record in read_records(spool.folder, 0)]
    [{'m': [['loss', 0.5, 1700000000000, 1]]}]
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import time
import typing as T
from pathlib import Path

from loguru import logger

from regression_model_template.io.stores import store_identity

__all__ = [
    "Batch",
    "RunSpool",
    "default_spool_dir",
    "orphan",
    "read_batch",
    "read_records",
    "read_sent",
    "run_info",
    "set_aside",
    "spooled_runs",
    "write_sent",
]

VALUES = "values.jsonl"
SENT = "sent"
RUN = "run.json"
LOCK = "lock"
REFUSED = "refused"  # beside the run folders: values the store refused for good


def default_spool_dir() -> Path:
    """The per-user cache folder's ``spool`` (``~/.cache/regression_model_template/spool``)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("regression_model_template")) / "spool"


class RunSpool:
    """The spool of one run, owned (locked) by this process until :meth:`close`.

    Thread-safe: records from several threads are appended whole, one line each.
    """

    def __init__(self, folder: Path, lock_fd: int, values_fd: int) -> None:
        self.folder = folder
        self.run_id = folder.name
        self._lock_fd = lock_fd
        self._values_fd = values_fd
        self._guard = threading.Lock()
        self._closed_at: int | None = None  # the size when closed
        self._synced = 0  # bytes on the disk itself (``sync``); 0: the folder is not yet either
        self._sync_failed = False
        self._synced_at = -float("inf")  # time.monotonic() of the last sync
        self.sent = read_sent(folder)  # bytes the store has acknowledged
        self._sent_saved = self.sent  # ...as the ``sent`` file says

    @property
    def written(self) -> int:
        """Bytes appended so far: the file's size, so no signal can put it out of step."""
        if self._closed_at is not None:
            return self._closed_at
        return os.fstat(self._values_fd).st_size

    @classmethod
    def create(
        cls, spool_dir: Path, run_id: str, store: str, identity: str | None = None
    ) -> RunSpool:
        """Create (or take over) the spool of ``run_id``; ``store`` is the masked store URI.

        ``identity`` is the store's :func:`.stores.store_identity`, computed where the store
        was opened (a relative SQLite path depends on the working directory); None: that of
        ``store``, now. ``run.json`` records both, and this host's name.

        Raises:
            OSError: the folder cannot be created or written, or another process owns it.
        """
        folder = spool_dir / run_id
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # yours only, when created
        lock_fd = _open(folder / LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not (folder / RUN).exists():
                info = {
                    "run_id": run_id,
                    "store": store,
                    "store_id": identity if identity is not None else store_identity(store),
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                }
                _write_atomically(folder / RUN, json.dumps(info))
            values_fd = _open(folder / VALUES, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(folder, lock_fd, values_fd)

    def append(self, record: T.Mapping[str, T.Any]) -> int:
        """Append one record; return its size in bytes once it is the kernel's.

        Raises:
            OSError: the record could not be written whole (a full disk: ``ENOSPC``); the
                spool is as it was before the call.
        """
        line = (_encode(record) + "\n").encode()
        with self._guard:
            done = os.write(self._values_fd, line)
            if done < len(line):  # the disk took part of it: take that back
                size = os.fstat(self._values_fd).st_size
                os.ftruncate(self._values_fd, size - done)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.folder / VALUES))
            return done

    def sync(self, every: float = 0.0) -> None:
        """Put what was appended so far on the disk itself (``fdatasync``), to survive a power cut.

        For the background writer, before it reads the spool: never on the caller's path.
        Costs nothing when nothing was appended since the last call, or when the last sync is
        less than ``every`` seconds old (an append to a page on its way to the disk waits for
        it: syncing each batch of a backlog would slow the training loop). The first call makes
        ``run.json`` and the run's folder durable. A disk that fails it is warned once; the
        values are still sent from the kernel's copy.
        """
        if self._closed_at is not None:
            return  # released: its descriptor's number may be another file's by now
        if time.monotonic() - self._synced_at < every:
            return
        try:
            size = os.fstat(self._values_fd).st_size
            if size == self._synced:
                return
            self._synced_at = time.monotonic()
            os.fdatasync(self._values_fd)
            if not self._synced:  # once: the run's folder and run.json, then the folder itself
                _fsync(self.folder / RUN, os.O_RDONLY)
                _fsync(self.folder, os.O_RDONLY | os.O_DIRECTORY)
                _fsync(self.folder.parent, os.O_RDONLY | os.O_DIRECTORY)
            self._synced = size
        except OSError as exc:
            if exc.errno == errno.EBADF or self._sync_failed:
                return  # closed meanwhile by the run's end; or said already
            self._sync_failed = True
            logger.warning(
                "Cannot put the spool {} on the disk ({}): a power cut could lose its unsent "
                "values (a killed process cannot)",
                self.folder,
                exc,
            )

    def mark_sent(self, offset: int) -> None:
        """Record that the store has acknowledged the first ``offset`` bytes.

        Kept here first. A disk that cannot take the ``sent`` file now (full) gets it with a
        later call or at :meth:`close`; until then, a recovery after a kill sends again what
        was acknowledged since (MLflow's SQL stores ignore an exact duplicate). Never raises.
        """
        self.sent = offset
        self._save_sent()

    def _save_sent(self) -> None:
        if self._sent_saved == self.sent:
            return
        try:
            write_sent(self.folder, self.sent)
        except OSError:
            return  # a full disk, or the folder released and removed meanwhile: later, or never
        self._sent_saved = self.sent

    def close(self, remove: bool) -> None:
        """Release the run (``remove``: everything was sent and the run ended; delete it)."""
        if self._closed_at is not None:
            return  # closed already: its descriptors' numbers may be another file's by now
        try:
            self._closed_at = os.fstat(self._values_fd).st_size
        except OSError:
            self._closed_at = 0
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            self._save_sent()  # kept for `recover`: a mark the full disk refused, once more
        with contextlib.suppress(OSError):
            os.close(self._values_fd)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)  # the lock goes with the descriptor


_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: not one per record


def read_sent(folder: Path) -> int:
    """How many bytes of the folder's values the store has acknowledged (0 if unknown)."""
    try:
        return int((folder / SENT).read_text() or 0)
    except (OSError, ValueError):
        return 0


def write_sent(folder: Path, offset: int) -> None:
    """Record that the store has acknowledged the first ``offset`` bytes of the folder's values."""
    _write_atomically(folder / SENT, str(offset))


def read_records(
    folder: Path, offset: int, damage: list[str] | None = None, cut: list[int] | None = None
) -> T.Iterator[tuple[int, dict[str, T.Any]]]:
    """Yield ``(end offset, record)`` for each whole record after ``offset``.

    A line that is not a record stops the reading there; its description goes to ``damage``
    when given. So does a last line without its end (a write in progress, or cut by a kill):
    its size goes to ``cut`` when given.
    """
    path = folder / VALUES
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        handle.seek(offset)
        position = offset
        for line in handle:
            if not line.endswith(b"\n"):  # only ever the last line
                if cut is not None:
                    cut.append(len(line))
                return
            try:
                record = json.loads(line)
                if not _well_formed(record):
                    raise ValueError("not a record")
            except ValueError:
                if damage is not None:
                    damage.append(f"unreadable line at offset {position} of {path}")
                return
            position += len(line)
            yield position, record


def _well_formed(record: object) -> bool:
    """Whether ``record`` is one this module writes (metrics, params or the run's end)."""
    if not isinstance(record, dict):
        return False
    metrics, params, end = record.get("m", []), record.get("p", []), record.get("end", "")
    return (
        isinstance(metrics, list)
        and all(
            isinstance(row, list)
            and len(row) == 4
            and isinstance(row[0], str)
            and isinstance(row[1], int | float)
            and all(isinstance(n, int) for n in row[2:])
            for row in metrics
        )
        and isinstance(params, list)
        and all(
            isinstance(row, list) and len(row) == 2 and all(isinstance(x, str) for x in row)
            for row in params
        )
        and isinstance(end, str)
    )


class Batch(T.NamedTuple):
    """Records read from a spool: their values, where they end, and a recorded end status."""

    metrics: list[list[T.Any]]  # [key, value, timestamp ms, step]
    params: list[list[str]]  # [key, text]
    end: int  # the spool offset after the last record read
    status: str | None  # the run's end status, when its record was among them

    @property
    def values(self) -> int:
        """How many values the batch holds."""
        return len(self.metrics) + len(self.params)


def read_batch(
    folder: Path,
    offset: int,
    until: int | None = None,
    damage: list[str] | None = None,
    limit: int = 1000,
    cut: list[int] | None = None,
) -> Batch:
    """Read whole records after ``offset`` (up to ``until``) until ``limit`` metrics or params.

    Example:
        >>> import tempfile
        >>> spool = RunSpool.create(Path(tempfile.mkdtemp()), "run1", store="sqlite:///m.db")
        >>> _ = spool.append({"m": [["loss", 0.5, 1, 0]]}), spool.append({"end": "FINISHED"})
        >>> read_batch(spool.folder, 0).status, read_batch(spool.folder, 0).values
        ('FINISHED', 1)
    """
    metrics: list[list[T.Any]] = []
    params: list[list[str]] = []
    end, status = offset, None
    for position, record in read_records(folder, offset, damage, cut):
        if until is not None and position > until:
            break
        metrics.extend(record.get("m", ()))
        params.extend(record.get("p", ()))
        status = record.get("end", status)
        end = position
        if len(metrics) >= limit or len(params) >= limit:
            break
    return Batch(metrics, params, end, status)


def spooled_runs(spool_dir: Path) -> list[Path]:
    """The run folders in ``spool_dir``, oldest first."""
    if not spool_dir.is_dir():
        return []
    folders = [path for path in spool_dir.iterdir() if (path / VALUES).exists()]
    return sorted(folders, key=lambda path: path.stat().st_mtime)


@contextlib.contextmanager
def orphan(folder: Path) -> T.Iterator[bool]:
    """Lock a run folder for recovery; yield False when a live process owns it."""
    try:
        fd = _open(folder / LOCK, os.O_RDWR | os.O_CREAT)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)


def run_info(folder: Path) -> dict[str, T.Any]:
    """The run's ``run.json`` (empty when unreadable)."""
    try:
        info = json.loads((folder / RUN).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def set_aside(spool_dir: Path, run_id: str, rows: T.Iterable[T.Mapping[str, T.Any]]) -> Path:
    """Append values the store refused for good to ``<spool_dir>/refused/<run_id>.jsonl``.

    Out of the run's folder: recovery never sends them again, and they outlive the run's spool
    for the person who reads the error (one JSON object a line, the row and the reason).
    """
    folder = spool_dir / REFUSED
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{run_id}.jsonl"
    fd = _open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b"".join(json.dumps(row).encode() + b"\n" for row in rows))
    finally:
        os.close(fd)
    return path


def _open(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        fd = _open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            data = text.encode()
            if os.write(fd, data) < len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temporary))
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):  # a full disk: leave no empty file behind
            temporary.unlink()
        raise
