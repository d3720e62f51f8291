"""What LoggerService is made of: its settings' checks, its loguru sink, the stdlib bridge.

Standard ``logging`` records (MLflow's, alembic's, any library's) are forwarded to loguru by
:class:`StdlibBridge`, so a job has one log stream. MLflow gives its own loggers a stream
handler and ``propagate=False``; the bridge takes those loggers over while it is attached and
gives them back on detach.

Example:
    >>> check_level("info")
    'INFO'
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
import typing as T
from pathlib import Path

from loguru import logger

from regression_model_template.io import console_capture, run_logs
from regression_model_template.io.errors import translated_errors
from regression_model_template.io.masking import secret_forms

if T.TYPE_CHECKING:
    import loguru

__all__ = [
    "DEFAULT_LOG_FORMAT",
    "StdlibBridge",
    "add_sink",
    "check_level",
    "check_sink",
    "remove_sink",
    "stdlib_bridge",
]

DEFAULT_LOG_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{name}</cyan>:<cyan>{function}</cyan>:<cyan>{line}</cyan> - <level>{message}</level>"
)

# loguru's own default handler (stderr) has id 0; the only handler removed besides our own.
DEFAULT_HANDLER_ID = 0

_LEVELS = "TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL"


def check_level(value: object) -> object:
    """Normalise a level name to upper case; reject a level loguru does not know.

    Example:
        >>> check_level("verbose")
        Traceback (most recent call last):
        ...
        ValueError: unknown log level 'verbose' (expected one of TRACE, DEBUG, INFO, ...)
    """
    if not isinstance(value, str):
        return value  # strict validation reports the wrong type
    try:
        logger.level(value.upper())
    except ValueError:
        raise ValueError(f"unknown log level {value!r} (expected one of {_LEVELS})") from None
    return value.upper()


def check_sink(value: str) -> str:
    """Accept ``stderr``, ``stdout`` or a file path that is not a folder.

    Example:
        >>> check_sink("logs/job.log")
        'logs/job.log'
    """
    if not value.strip():
        raise ValueError('empty sink: use "stderr", "stdout" or a file path')
    if value not in ("stderr", "stdout") and Path(value).is_dir():
        raise ValueError(f"sink {value!r} is a directory, not a file path")
    return value


def add_sink(
    sink: str, *, colorize: bool | None, secrets: T.Iterable[str] = (), **options: T.Any
) -> int:
    """Add a loguru handler writing to ``sink``; remove loguru's default stderr handler.

    ``stderr``/``stdout`` are the streams as they are now (pytest's capsys swaps them per
    test); any other value is a file path whose folder is created. ``colorize=None`` colours a
    stream only when it is a terminal; a file is never coloured. ``secrets`` are masked
    (``***``) in every line, traceback included. ``options`` are ``logger.add``'s. A
    plain-text sink also hands each line to the open run's log (:mod:`.run_logs`): formatted
    once, a record costs the run's log one write.

    Raises:
        ServiceError: the file or its folder cannot be created or opened (setting ``sink``).

    Example:
        >>> handler_id = add_sink("stdout", colorize=None, format="{message}", secrets=["pa55"])
        >>> logger.info("plain text in a pipe, password pa55")
        plain text in a pipe, password ***
        >>> remove_sink(handler_id)
    """
    # Under a tee (a sink added while a run is open), the console itself: each line once.
    stream = {"stderr": sys.stderr, "stdout": sys.stdout}.get(sink)
    stream = console_capture.unwrap(stream) if stream is not None else None
    if stream is None:
        with translated_errors("LoggerService", "sink", f"cannot create {sink!r}"):
            Path(sink).parent.mkdir(parents=True, exist_ok=True)
    serialize = bool(options.get("serialize"))
    # A JSON line writes a secret with JSON's escapes: those forms are masked too.
    forms = secret_forms([*secrets, *(json.dumps(s)[1:-1] for s in secrets if serialize)])
    with translated_errors("LoggerService", "sink", f"cannot open {sink!r}"):
        owned = stream is None
        if stream is None:
            colorize = False
            # Line-buffered like loguru's own file sink; closed by the sink's stop().
            stream = Path(sink).open("a", buffering=1, encoding="utf-8")  # noqa: SIM115
        else:
            colorize = _is_terminal(stream) if colorize is None else colorize
        # JSON lines are not handed to the run's log: it formats its own text.
        destination = _TeeSink(stream, colorize, owned, forms, tee=not serialize)
        try:
            handler_id = logger.add(destination, colorize=colorize, **options)
        except BaseException:
            destination.stop()
            raise
    with contextlib.suppress(ValueError):  # already removed by someone else
        logger.remove(DEFAULT_HANDLER_ID)
    return handler_id


def _is_terminal(stream: T.TextIO) -> bool:
    try:
        return stream.isatty()
    except Exception:  # a closed or unusual stream
        return False


class _TeeSink:
    """A text stream (the LoggerService's): lines masked, and also to the open run's log.

    loguru writes each formatted line, flushes, and calls ``stop`` when the handler is removed.
    """

    def __init__(
        self,
        stream: T.TextIO,
        coloured: bool,
        owned: bool = False,
        forms: T.Sequence[str] = (),
        tee: bool = True,
    ) -> None:
        self._stream = stream
        self._coloured = coloured  # ANSI colours are stripped from the run's copy
        self._owned = owned  # a file opened for the sink, closed with it
        self._forms = forms  # the secrets' forms (masking.secret_forms), masked in each line
        self._tee = tee
        if tee:
            run_logs.router.attach_tee(self)

    def write(self, message: loguru.Message) -> None:
        text: str = message
        for form in self._forms:  # the run's log masks its own copy
            text = text.replace(form, "***")
        self._stream.write(text)
        if self._tee:
            run_logs.router.tee(message, self, self._coloured)

    def flush(self) -> None:
        self._stream.flush()

    def stop(self) -> None:
        if self._tee:
            run_logs.router.detach_tee(self)
        if self._owned:
            self._stream.close()


def remove_sink(handler_id: int) -> None:
    """Write what is still queued, then remove the handler (once: a second call is harmless)."""
    logger.complete()
    with contextlib.suppress(ValueError):
        logger.remove(handler_id)


class _InterceptHandler(logging.Handler):
    """Forwards standard-library log records to loguru, keeping the caller's location."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        # Walk out of the logging module so loguru reports the real call site.
        frame, depth = inspect.currentframe(), 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame, depth = frame.f_back, depth + 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


class StdlibBridge:
    """Routes standard ``logging`` into loguru while attached (one per process).

    Records reach the bridge through the root logger. ``adopt()`` swaps the handlers of the
    loggers MLflow configures itself for the bridge (MlflowService calls it after importing
    mlflow) and ``detach()`` restores them.

    Example:
        >>> bridge = StdlibBridge()
        >>> bridge.attach()
        >>> bridge.attached
        True
        >>> bridge.detach()
    """

    # Loggers that MLflow configures with its own handler and propagate=False.
    ADOPTED = ("mlflow", "alembic", "sqlalchemy.engine", "huey")

    def __init__(self) -> None:
        self._handler: _InterceptHandler | None = None
        self._saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    @property
    def attached(self) -> bool:
        """Whether records are being routed to loguru."""
        return self._handler is not None

    def attach(self) -> None:
        """Route the root logger's records (and MLflow's, if imported) to loguru."""
        self._handler = _InterceptHandler()
        logging.getLogger().addHandler(self._handler)
        if "mlflow" in sys.modules:
            self.adopt()

    def adopt(self) -> None:
        """Take over the loggers MLflow configured itself; harmless when not attached."""
        if self._handler is None:
            return
        for name in self.ADOPTED:
            stdlib_logger = logging.getLogger(name)
            if self._handler not in stdlib_logger.handlers:
                self._saved[name] = (stdlib_logger.handlers[:], stdlib_logger.propagate)
                stdlib_logger.handlers = [self._handler]
                stdlib_logger.propagate = False

    def detach(self) -> None:
        """Stop routing; give every adopted logger its own handlers back."""
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        for name, (handlers, propagate) in self._saved.items():
            stdlib_logger = logging.getLogger(name)
            stdlib_logger.handlers, stdlib_logger.propagate = handlers, propagate
        self._saved.clear()
        self._handler = None


#: The process's bridge, attached by the first LoggerService that starts.
stdlib_bridge = StdlibBridge()
