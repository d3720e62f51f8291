r"""The run's own log: every line written while a run is open, stored as its ``run.log`` artifact.

While a run is open, each loguru record (the job's, ours, and the standard-library records the
LoggerService routes in, MLflow's included) is:

- tagged with the run's id in ``record["extra"]["mlflow_run_id"]``, so that JSON logs can be
  joined with the run by a log collector;
- appended, as a text line (secrets masked), to ``run.log`` in the run's spool folder, with
  one ``os.write`` per record: once the call returns the line is the kernel's, and a
  ``kill -9`` cannot lose it. ``recover`` uploads what a dead process left.

A record belongs to the innermost open run *of the process* (the calling thread's own run
first, when it has one): MLflow's and the job's worker threads log into the run too, which a
context variable (``logger.contextualize``) would miss.

What is printed while a captured run is open (``print``, MLflow's "Successfully registered
model ..." on ``sys.stderr``) goes to the console as before and, line by line, to the same
run's log: see :mod:`.console_capture` for how, and why.

The size is capped: the first half of the cap is kept whole (``run.log``), then the log rolls
through numbered tail segments of a quarter of the cap each, the two newest kept. The artifact
is the head, one line saying how much was cut, and the tail.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> log = RunLog(folder, max_bytes=100, secrets=["s3cret"])
    >>> for i in range(10):
    ...     log.write(f"line {i} s3cret\n")
    >>> log.close()
    >>> print(artifact(folder).read_text(), end="")
    line 0 ***
    line 1 ***
    line 2 ***
    line 3 ***
    [... 22 bytes (2 lines) cut: the run's log passed its size cap of 100 bytes ...]
    line 6 ***
    line 7 ***
    line 8 ***
    line 9 ***
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import traceback
import typing as T
from pathlib import Path

from loguru import logger

from regression_model_template.io.console_capture import ConsoleCapture
from regression_model_template.io.masking import secret_forms

if T.TYPE_CHECKING:
    import loguru
    from mlflow.tracking import MlflowClient

__all__ = [
    "RUN_ID_KEY",
    "RUN_LOG",
    "LogStyle",
    "RunLog",
    "artifact",
    "ending",
    "router",
    "upload",
]

RUN_LOG = "run.log"  # the artifact's name, and the head's file in the spool folder
RUN_ID_KEY = "mlflow_run_id"  # the key of the run id in a record's ``extra``
_TAIL = "run.log.tail."  # + a sequence number
_CUT = "run.log.cut"  # "<bytes> <lines>" dropped from the tail so far
_UPLOAD = "upload"  # the assembled artifact, when the log was cut
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LogStyle(T.NamedTuple):
    """How a run's log is written: the LoggerService's format and level, and extra secrets.

    Example:
        >>> LogStyle("{level} {message}", "INFO").level
        'INFO'
    """

    format: str
    level: str = "DEBUG"
    secrets: tuple[str, ...] = ()  # masked besides the MlflowService's own (alert URLs)


# %% one run's capture


class RunLog:
    """The capture of one run, appended to ``<folder>/run.log`` as it goes; thread-safe.

    Args:
        folder: the run's spool folder.
        max_bytes: the size cap (head + tail); past it the middle is cut.
        secrets: masked (``***``) in every line.
    """

    def __init__(self, folder: Path, max_bytes: int, secrets: T.Iterable[str] = ()) -> None:
        self.folder = folder
        self._forms = secret_forms(secrets)
        self._lock = threading.Lock()
        self._head_max = max_bytes // 2
        self._segment_max = max(max_bytes // 4, 1)
        self._max_bytes = max_bytes
        self._fd: int | None = _append(folder / RUN_LOG)
        self._size = 0  # bytes in the file being written
        self._segment = -1  # the tail segment being written (-1: still the head)
        self._segments: list[tuple[int, int]] = []  # (bytes, lines) of each tail segment kept
        self._cut = (0, 0)  # (bytes, lines) dropped
        self._failed: OSError | None = None  # why the capture stopped (a full disk)
        self._kept = 0  # bytes written before it stopped

    def write(self, text: str) -> None:
        """Append ``text`` (one or more whole lines); never raises."""
        for form in self._forms:
            text = text.replace(form, "***")
        data = text.encode(errors="replace")
        with self._lock:
            if self._fd is None:
                return
            try:
                in_head = self._segment < 0
                limit = self._head_max if in_head else self._segment_max
                if self._size + len(data) > limit and (in_head or self._size):
                    self._next_segment()
                os.write(self._fd, data)
            except OSError as exc:  # a full disk must not stop the job: the capture stops
                self._failed = exc  # said once, at close: a warning now would be a line here
                self._close_fd()
                return
            self._size += len(data)
            self._kept += len(data)
            if self._segment >= 0:
                size, lines = self._segments[-1]
                self._segments[-1] = (size + len(data), lines + text.count("\n"))

    def close(self, note: str | None = None) -> None:
        """Append ``note`` (how the run ended), then stop writing. Closing twice is harmless."""
        if note:
            self.write(note if note.endswith("\n") else note + "\n")
        with self._lock:
            self._close_fd()
            failed, self._failed = self._failed, None
        if failed is not None:  # info: the spool's own warning said the disk is full
            logger.info(
                "The log of run {} stopped after {:,} bytes: {} cannot be written ({}); its "
                "artifact run.log ends there",
                self.folder.name,
                self._kept,
                self.folder,
                failed.strerror or failed,
            )

    def _next_segment(self) -> None:
        """Start the next tail segment; drop the oldest one beyond the two kept."""
        self._close_fd()
        self._segment += 1
        self._segments.append((0, 0))
        if len(self._segments) > 2:
            size, lines = self._segments.pop(0)
            self._cut = (self._cut[0] + size, self._cut[1] + lines)
            _write_replace(self.folder / _CUT, f"{self._cut[0]} {self._cut[1]} {self._max_bytes}")
            with contextlib.suppress(OSError):
                (self.folder / f"{_TAIL}{self._segment - 2}").unlink()
        self._fd = _append(self.folder / f"{_TAIL}{self._segment}")
        self._size = 0

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def ending(status: str, error: BaseException | None) -> str | None:
    """The last lines of a run's log: the traceback of a failure, or why it was killed.

    Example:
        >>> ending("FINISHED", None) is None
        True
        >>> ending("KILLED", KeyboardInterrupt())
        'The run ended KILLED (KeyboardInterrupt)'
    """
    if status == "FINISHED":
        return None
    if status == "FAILED" and error is not None:
        trace = "".join(traceback.format_exception(error))  # never local values: secrets
        return f"The run ended FAILED:\n{trace}"
    cause = f" ({type(error).__name__})" if error is not None else ""
    return f"The run ended {status}{cause}"


# %% the artifact


def artifact(folder: Path) -> Path | None:
    """The run's log as the artifact to upload (assembled when cut), or None when there is none.

    Works on what a killed process left as well as on a closed :class:`RunLog`.
    """
    head = folder / RUN_LOG
    if not head.exists():
        return None
    tails = sorted(folder.glob(f"{_TAIL}*"), key=lambda p: int(p.name[len(_TAIL) :] or 0))
    if not tails:
        return head
    cut_bytes, cut_lines, max_bytes = _read_cut(folder)
    target = folder / _UPLOAD / RUN_LOG
    target.parent.mkdir(mode=0o700, exist_ok=True)
    with target.open("wb") as out:
        out.write(head.read_bytes())
        if cut_bytes:
            out.write(
                f"[... {cut_bytes:,} bytes ({cut_lines:,} lines) cut: the run's log passed its "
                f"size cap of {max_bytes:,} bytes ...]\n".encode()
            )
        for tail in tails:
            out.write(tail.read_bytes())
    return target


def upload(client: MlflowClient, run_id: str, folder: Path) -> int | None:
    """Upload the run's log as the artifact ``run.log``; return its size (None: no log).

    An empty log is not uploaded. The capture's files are then deleted: a kept spool folder
    does not upload it twice.

    Raises:
        Exception: whatever the artifact store raised (the files are kept).
    """
    path = artifact(folder)
    if path is None:
        return None
    size = path.stat().st_size
    if size:
        client.log_artifact(run_id, str(path))
    _discard(folder)
    return size or None


def _discard(folder: Path) -> None:
    """Delete the capture's files from a run's spool folder."""
    for path in [folder / RUN_LOG, folder / _CUT, *folder.glob(f"{_TAIL}*")]:
        with contextlib.suppress(OSError):
            path.unlink()
    shutil.rmtree(folder / _UPLOAD, ignore_errors=True)


def _read_cut(folder: Path) -> tuple[int, int, int]:
    try:
        cut_bytes, cut_lines, max_bytes = (folder / _CUT).read_text().split()
        return int(cut_bytes), int(cut_lines), int(max_bytes)
    except (OSError, ValueError):
        return 0, 0, 0


def _append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _write_replace(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(OSError):
        temporary.write_text(text)
        os.replace(temporary, path)


# %% the process's open runs


class _Open(T.NamedTuple):
    run_id: str
    thread: int | None  # the thread that opened it
    log: RunLog | None  # None: the run is tagged but not captured


class Router:
    """The process's open runs: tags records with the innermost one, sends lines to its log.

    A LoggerService writing plain text hands each formatted line over with :meth:`tee` (its
    text is the run's line already: nothing is formatted twice). Without such a sink (none
    started, or JSON), the router adds a loguru handler of its own while a run is captured.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: tuple[_Open, ...] = ()  # replaced whole: readers never lock
        self._tees: list[object] = []  # plain-text sinks feeding the router; the first is used
        self._handler_id: int | None = None
        self._patcher: T.Callable[[loguru.Record], None] | None = None
        self._console = ConsoleCapture(self._write_printed)

    def open(self, run_id: str, log: RunLog | None, style: LogStyle) -> None:
        """Tag records with ``run_id``; capture them, and prints, into ``log`` until closed."""
        with self._lock:
            self._open += (_Open(run_id, threading.get_ident(), log),)
            self._install_patcher()
            if log is not None:
                self._console.install()
            if log is not None and not self._tees and self._handler_id is None:
                # The record's text in the LoggerService's format, uncoloured; never variable
                # values in tracebacks (diagnose): the artifact is shared and kept.
                self._handler_id = logger.add(
                    self._write,
                    format=style.format,
                    level=style.level,
                    colorize=False,
                    diagnose=False,
                    catch=True,
                )

    def close(self, run_id: str, note: str | None = None) -> None:
        """Stop tagging and capturing for ``run_id``; end its log with ``note``."""
        # Lines printed without their newline yet belong to the closing run: this thread's, and
        # every thread's when no captured run remains.
        others = any(entry.log for entry in self._open if entry.run_id != run_id)
        self._console.flush(threading.get_ident() if others else None)
        with self._lock:
            closing = [entry for entry in self._open if entry.run_id == run_id]
            self._open = tuple(entry for entry in self._open if entry.run_id != run_id)
            handler_id = None
            if not any(entry.log for entry in self._open):
                handler_id, self._handler_id = self._handler_id, None
                self._console.uninstall()
        if handler_id is not None:
            with contextlib.suppress(ValueError):
                logger.remove(handler_id)
        for entry in closing:
            if entry.log is not None:
                entry.log.close(note)

    def innermost(self, thread: int | None) -> str | None:
        """The run a record of ``thread`` belongs to: that thread's newest, else the newest.

        Example:
            >>> Router().innermost(threading.get_ident()) is None
            True
        """
        entry = self._entry(thread)
        return entry.run_id if entry is not None else None

    def attach_tee(self, sink: object) -> None:
        """``sink`` (plain text) now hands its lines over with :meth:`tee`."""
        with self._lock:
            self._tees.append(sink)

    def detach_tee(self, sink: object) -> None:
        """``sink`` is gone."""
        with self._lock:
            self._tees = [tee for tee in self._tees if tee is not sink]

    def tee(self, message: loguru.Message, sink: object, coloured: bool = False) -> None:
        """A LoggerService sink's formatted line: into the innermost run's log, if captured."""
        tees = self._tees
        if not self._open or self._handler_id is not None or not tees or tees[0] is not sink:
            return  # no run; the router's own handler writes the lines; another sink does
        entry = self._entry(message.record["thread"].id)
        if entry is not None and entry.log is not None:
            entry.log.write(_ANSI.sub("", message) if coloured else message)

    def _write_printed(self, thread: int, text: str) -> None:
        entry = self._entry(thread)
        if entry is not None and entry.log is not None:
            entry.log.write(text)

    def _write(self, message: loguru.Message) -> None:
        entry = self._entry(message.record["thread"].id)
        if entry is not None and entry.log is not None:
            entry.log.write(message)

    def _entry(self, thread: int | None) -> _Open | None:
        opened = self._open
        if not opened:
            return None
        for entry in reversed(opened):
            if entry.thread == thread:
                return entry
        return opened[-1]  # a worker thread of the job, or MLflow's

    def _tag(self, record: loguru.Record) -> None:
        if self._open:
            run_id = self.innermost(record["thread"].id)
            if run_id is not None:
                record["extra"][RUN_ID_KEY] = run_id

    def _install_patcher(self) -> None:
        # loguru has one process-wide patcher, replaced by `configure(patcher=...)` and not
        # readable through its public API: a patcher the host application configured is read
        # from loguru's core (if it is there) and called first, so that it keeps working.
        core = getattr(logger, "_core", None)
        current = getattr(core, "patcher", None)
        if self._patcher is not None and current is self._patcher:
            return
        previous = current

        def patch(record: loguru.Record) -> None:
            if previous is not None:
                previous(record)
            self._tag(record)

        self._patcher = patch
        logger.configure(patcher=patch)


#: The process's router: runs are opened by MlflowService, lines handed over by LoggerService.
router = Router()
