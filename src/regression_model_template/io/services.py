"""The three global services of an ML job: logs, alerts to a person, and MLflow tracking.

Each service is a frozen, strict pydantic model (its settings) with ``start()`` and ``stop()``
(its lifecycle); every service is also a context manager. Services never read the
configuration or the container themselves: ``regression_model_template.containers`` builds
them from the merged configuration and starts them in order.

Heavy dependencies (mlflow, plyer's backends, requests) are imported when a service starts,
not when this module is imported.

Example:
    >>> with AlertsService(enable=False) as alerts:
    ...     alerts.notify("Training", "done")
    [regression_model_template] Training: done
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import inspect
import logging
import os
import re
import signal
import sys
import threading
import types
import typing as T
import urllib.parse
import warnings
from pathlib import Path

import loguru
import pydantic
from loguru import logger as _logger

if T.TYPE_CHECKING:
    from mlflow import ActiveRun
    from mlflow.tracking import MlflowClient

    from regression_model_template.io.batching import BatchWriter

__all__ = [
    "AlertsService",
    "LoggerService",
    "MlflowService",
    "Service",
    "ServiceError",
    "mask_uri",
]


class ServiceError(RuntimeError):
    """A service could not do its work with the settings it was given.

    The message names the service, the setting and the cause, and never carries a secret; the
    original exception is chained as ``__cause__`` (or a redacted copy of it when its own message
    contained a secret).

    Example:
        >>> str(ServiceError("MlflowService", "tracking_uri", "unsupported scheme 'foo'"))
        "MlflowService.tracking_uri: unsupported scheme 'foo'"
    """

    def __init__(self, service: str, setting: str, cause: str) -> None:
        super().__init__(f"{service}.{setting}: {cause}")
        self.service = service
        self.setting = setting
        self.cause = cause


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM while an MlflowService runs (exit code 143).

    Unwinding instead of dying lets ``run_context`` flush buffered values and end the run
    KILLED, and lets the container stop every service; the process still exits.

    Example:
        >>> Terminated().code
        143
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    raise Terminated()


class RedactedError(Exception):
    """Stands in for a dependency's exception whose message contained a secret.

    Example:
        >>> str(RedactedError("ConnectionError: http://user:***@host"))
        'ConnectionError: http://user:***@host'
    """


class Service(abc.ABC, pydantic.BaseModel):
    """Base class of the global services: strict, frozen settings plus ``start``/``stop``.

    Subclasses implement ``start()``; ``stop()`` does nothing unless overridden. Using a
    service as a context manager starts it on entry and stops it on exit, even when the block
    raises (the exception propagates).

    Example:
        >>> class Hello(Service):
        ...     name: str = "world"
        ...     def start(self) -> None:
        ...         print(f"hello {self.name}")
        ...     def stop(self) -> None:
        ...         print("bye")
        >>> with Hello(name="you"):
        ...     pass
        hello you
        bye
    """

    model_config = pydantic.ConfigDict(strict=True, frozen=True, extra="forbid")

    @abc.abstractmethod
    def start(self) -> None:
        """Start the service: acquire what it needs and configure global state.

        Example:
            >>> AlertsService(enable=False).start()
        """

    def stop(self) -> None:
        """Stop the service and release what it holds; harmless when not started.

        Example:
            >>> AlertsService(enable=False).stop()
        """

    def __enter__(self) -> T.Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()


# %% LOGGER


def _stream(name: str) -> T.TextIO | None:
    # Resolved at start, not at import: pytest's capsys swaps sys.stdout/sys.stderr per test.
    return {"stderr": sys.stderr, "stdout": sys.stdout}.get(name)


class _InterceptHandler(logging.Handler):
    """Forwards standard-library log records to loguru, keeping the caller's location."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = _logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        # Walk out of the logging module so loguru reports the real call site.
        frame, depth = inspect.currentframe(), 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame, depth = frame.f_back, depth + 1
        _logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


class _StdlibBridge:
    """Routes standard ``logging`` into loguru while a LoggerService is running.

    Records reach the bridge through the root logger. MLflow, when imported, gives its own
    loggers a stream handler and ``propagate=False``; ``adopt()`` swaps that handler for the
    bridge (MlflowService calls it after importing mlflow) and ``detach()`` restores it.
    """

    # Loggers that MLflow configures with its own handler and propagate=False.
    ADOPTED = ("mlflow", "alembic", "sqlalchemy.engine", "huey")

    def __init__(self) -> None:
        self.handler: _InterceptHandler | None = None
        self._saved: dict[str, tuple[list[logging.Handler], bool]] = {}

    def attach(self) -> None:
        self.handler = _InterceptHandler()
        logging.getLogger().addHandler(self.handler)
        if "mlflow" in sys.modules:
            self.adopt()

    def adopt(self) -> None:
        if self.handler is None:
            return
        for name in self.ADOPTED:
            stdlib_logger = logging.getLogger(name)
            if self.handler not in stdlib_logger.handlers:
                self._saved[name] = (stdlib_logger.handlers[:], stdlib_logger.propagate)
                stdlib_logger.handlers = [self.handler]
                stdlib_logger.propagate = False

    def detach(self) -> None:
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
        for name, (handlers, propagate) in self._saved.items():
            stdlib_logger = logging.getLogger(name)
            stdlib_logger.handlers, stdlib_logger.propagate = handlers, propagate
        self._saved.clear()
        self.handler = None


_stdlib_bridge = _StdlibBridge()

# loguru's own default handler (stderr) has id 0; it is the only handler we ever remove
# besides our own.
_DEFAULT_HANDLER_ID = 0

DEFAULT_LOG_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{name}</cyan>:<cyan>{function}</cyan>:<cyan>{line}</cyan> - <level>{message}</level>"
)


class LoggerService(Service):
    """A loguru logger writing to one sink, with standard-library logging routed into it.

    Attributes:
        sink: "stderr", "stdout", or the path of a log file (its folder is created).
        level: lowest level written (a loguru level name: TRACE, DEBUG, INFO, SUCCESS,
            WARNING, ERROR, CRITICAL).
        format: loguru format; the default shows timestamp, level, source
            (``name:function:line``) and the message.
        colorize: colour the output of the ``stderr``/``stdout`` streams (never applied to a
            log file: escape codes would end up in it).
        serialize: write each record as one JSON line.
        backtrace: extend exception tracebacks beyond the catching frame.
        diagnose: show variable values in tracebacks. Off by default: values can be secrets.
        catch: keep the program running when the sink fails; the error is printed to stderr.
        intercept_stdlib: route records of the standard ``logging`` module (MLflow's included)
            into this sink, so that a job has a single log stream.

    Example:
        >>> import sys
        >>> service = LoggerService(sink="stdout", colorize=False, format="{level} {message}")
        >>> with service:
        ...     service.logger().info("hello")
        INFO hello
    """

    sink: str = "stderr"
    level: str = "DEBUG"
    format: str = DEFAULT_LOG_FORMAT
    colorize: bool = True
    serialize: bool = False
    backtrace: bool = True
    diagnose: bool = False
    catch: bool = True
    intercept_stdlib: bool = True

    _handler_id: int | None = pydantic.PrivateAttr(default=None)
    _bridged: bool = pydantic.PrivateAttr(default=False)
    _lock: threading.Lock = pydantic.PrivateAttr(default_factory=threading.Lock)

    @pydantic.field_validator("level", mode="before")
    @classmethod
    def _check_level(cls, value: object) -> object:
        if not isinstance(value, str):
            return value  # strict mode reports the wrong type
        name = value.upper()
        try:
            _logger.level(name)
        except ValueError:
            known = "TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL"
            raise ValueError(f"unknown log level {value!r} (expected one of {known})") from None
        return name

    @pydantic.field_validator("sink")
    @classmethod
    def _check_sink(cls, value: str) -> str:
        if not value.strip():
            raise ValueError('empty sink: use "stderr", "stdout" or a file path')
        if value not in ("stderr", "stdout") and Path(value).is_dir():
            raise ValueError(f"sink {value!r} is a directory, not a file path")
        return value

    def start(self) -> None:
        """Add this service's sink to loguru (once) and route standard logging into it.

        Raises:
            ServiceError: the sink is a file that cannot be created or opened.

        Example:
            >>> service = LoggerService(sink="stdout", colorize=False, format="{message}")
            >>> service.start()
            >>> service.start()  # a second start does not duplicate the output
            >>> service.logger().info("once")
            once
            >>> service.stop()
        """
        with self._lock:
            if self._handler_id is not None:
                return
            stream = _stream(self.sink)
            sink: T.TextIO | str = stream if stream is not None else self.sink
            if stream is None:
                try:
                    Path(self.sink).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ServiceError(
                        "LoggerService", "sink", f"cannot create the folder of {self.sink!r}: {exc}"
                    ) from exc
            try:
                handler_id = _logger.add(
                    sink,
                    level=self.level,
                    format=self.format,
                    colorize=self.colorize and stream is not None,
                    serialize=self.serialize,
                    backtrace=self.backtrace,
                    diagnose=self.diagnose,
                    catch=self.catch,
                )
            except OSError as exc:
                raise ServiceError(
                    "LoggerService", "sink", f"cannot open {self.sink!r} for writing: {exc}"
                ) from exc
            with contextlib.suppress(ValueError):  # already removed by someone else
                _logger.remove(_DEFAULT_HANDLER_ID)
            self._handler_id = handler_id
            if self.intercept_stdlib and _stdlib_bridge.handler is None:
                _stdlib_bridge.attach()
                self._bridged = True

    def stop(self) -> None:
        """Flush pending records and remove only what this service added.

        Example:
            >>> service = LoggerService(sink="stdout", colorize=False, format="{message}")
            >>> service.stop()  # never started: harmless
            >>> with service:
            ...     service.logger().info("in")
            in
            >>> service.stop()  # twice: harmless
        """
        with self._lock:
            if self._bridged:
                _stdlib_bridge.detach()
                self._bridged = False
            if self._handler_id is None:
                return
            _logger.complete()
            with contextlib.suppress(ValueError):
                _logger.remove(self._handler_id)
            self._handler_id = None

    def logger(self) -> loguru.Logger:
        """Return the loguru logger.

        Example:
            >>> LoggerService().logger().bind(job="training")  # doctest: +ELLIPSIS
            <loguru.logger handlers=[...]>
        """
        return _logger


# %% ALERTS

_DESKTOP_VARIABLES = ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY")


class AlertsService(Service):
    """Notifications to a person: desktop notifications, or console lines as a fallback.

    ``notify`` never raises and never blocks longer than ``max_wait`` seconds. When the
    desktop cannot show a notification (no backend, no display or session bus, a backend that
    fails or hangs), the alert is printed as ``[app_name] title: message`` and one warning per
    cause is logged.

    Attributes:
        enable: send desktop notifications; when False, alerts are printed to the console.
        app_name: the application name shown with each alert.
        timeout: seconds the notification stays on screen (None: the desktop's default).
        max_wait: seconds ``notify`` waits for the desktop backend before falling back to
            the console.

    Example:
        >>> alerts = AlertsService(enable=False, app_name="demo")
        >>> with alerts:
        ...     alerts.notify("Evaluation", "r2=0.45")
        [demo] Evaluation: r2=0.45
    """

    enable: bool = True
    app_name: str = "regression_model_template"
    timeout: int | None = pydantic.Field(default=None, ge=1)
    max_wait: float = pydantic.Field(default=2.0, gt=0, le=60)

    _backend: T.Any = pydantic.PrivateAttr(default=None)
    _reason: str | None = pydantic.PrivateAttr(default=None)
    _warned: set[str] = pydantic.PrivateAttr(default_factory=set)
    _lock: threading.Lock = pydantic.PrivateAttr(default_factory=threading.Lock)

    @property
    def channel(self) -> T.Literal["desktop", "console"]:
        """Where the next alert goes, as decided by ``start()`` and by earlier failures.

        Example:
            >>> AlertsService(enable=False).channel
            'console'
        """
        return "desktop" if self._backend is not None else "console"

    def start(self) -> None:
        """Choose the desktop backend, or the console when the desktop cannot be used.

        Example:
            >>> alerts = AlertsService(enable=False)
            >>> alerts.start()
            >>> alerts.channel
            'console'
        """
        with self._lock:
            self._warned.clear()
            self._backend, self._reason = None, None
            if not self.enable:
                _logger.debug("Alerts go to the console (alerts.enable is false)")
                return
            backend, reason = _desktop_backend()
            if backend is None:
                self._fallback(T.cast(str, reason))
                return
            self._backend = backend
            _logger.debug("Alerts go to the desktop ({})", type(backend).__name__)

    def notify(self, title: str, message: str) -> None:
        """Send an alert; fall back to the console line when the desktop cannot show it.

        Example:
            >>> AlertsService(enable=False).notify("Job failed", "training: ValueError")
            [regression_model_template] Job failed: training: ValueError
        """
        backend = self._backend
        if backend is not None:
            failure = self._send(backend, title, message)
            if failure is None:
                return
            self._fallback(failure, permanent=failure.startswith("no answer"))
        print(f"[{self.app_name}] {title}: {message}", flush=True)

    def stop(self) -> None:
        """Forget the chosen backend; later alerts go to the console.

        Example:
            >>> AlertsService(enable=False).stop()
        """
        with self._lock:
            self._backend = None

    def _send(self, backend: T.Any, title: str, message: str) -> str | None:
        """Call the backend in a daemon thread; return why it failed, or None."""
        kwargs: dict[str, T.Any] = {"title": title, "message": message, "app_name": self.app_name}
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        errors: list[BaseException] = []

        def call() -> None:
            try:
                if type(backend).__name__ == "NotifySendNotification":
                    _notify_send(title, message, self.app_name, self.timeout)
                else:
                    backend.notify(**kwargs)
            except BaseException as exc:  # a backend may raise anything; never let it escape
                errors.append(exc)

        # A silent notification daemon blocks ~25 s: never wait for it longer than max_wait.
        worker = threading.Thread(target=call, name="alerts-notify", daemon=True)
        worker.start()
        worker.join(self.max_wait)
        if worker.is_alive():
            return f"no answer from the desktop within {self.max_wait:g} s (alerts.max_wait)"
        if errors:
            return f"the desktop backend failed: {type(errors[0]).__name__}: {errors[0]}"
        return None

    def _fallback(self, reason: str, permanent: bool = True) -> None:
        """Log once per cause why alerts go to the console; optionally stop using the desktop."""
        if permanent:
            self._backend = None
        if reason not in self._warned:
            self._warned.add(reason)
            _logger.warning(
                "Desktop notifications unavailable, alerts go to the console: {}", reason
            )


def _notify_send(title: str, message: str, app_name: str, timeout: int | None) -> None:
    """Run notify-send and check its exit code, which plyer's backend ignores.

    Without a notification daemon, notify-send prints an error and exits 1: the alert was not
    shown, and this raises so that it reaches the console instead.
    """
    import subprocess

    command = ["notify-send", title, message, "-a", app_name]
    if timeout is not None:
        command += ["-t", str(timeout * 1000)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(
            f"notify-send exited {result.returncode}" + (f": {detail[0]}" if detail else "")
        )


def _desktop_backend() -> tuple[T.Any, str | None]:
    """Return (plyer backend, None), or (None, why no desktop notification can be shown)."""
    if sys.platform.startswith("linux") and not any(os.environ.get(v) for v in _DESKTOP_VARIABLES):
        # notify-send would exit 1 and plyer would return normally: nothing shown, no error.
        return None, "no desktop session (none of " + ", ".join(_DESKTOP_VARIABLES) + " is set)"
    try:
        from plyer import facades, utils

        module = importlib.import_module(f"plyer.platforms.{utils.platform}.notification")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plyer warns for each backend it cannot use
            backend = module.instance()
    except Exception as exc:
        return None, f"no notification backend ({type(exc).__name__}: {exc})"
    if type(backend) is facades.Notification:
        return None, "no notification backend (install dbus-python or notify-send)"
    return backend, None


# %% MLFLOW

# mlflow.set_tracking_uri / set_registry_uri / set_experiment write these into os.environ.
_MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
# MLflow prints "View run ... at: <tracking URI>" at each end_run on a server, credentials
# included (and fetches the run again to do so): silenced while the service runs.
_MLFLOW_QUIET_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"

_SECRET_QUERY_KEYS = re.compile(r"pass|secret|token|key|auth|credential|signature", re.IGNORECASE)


def mask_uri(uri: str) -> str:
    """Return the URI with its password, token or secret query values replaced by ``***``.

    Example:
        >>> mask_uri("https://alice:s3cret@mlflow.example.com/")
        'https://alice:***@mlflow.example.com/'
        >>> mask_uri("https://tok3n@host/path?sig=1&token=abc")
        'https://***@host/path?sig=1&token=***'
        >>> mask_uri("sqlite:///mlruns/mlflow.db")
        'sqlite:///mlruns/mlflow.db'
    """
    return _redact(uri, _uri_secrets(uri))


def _uri_secrets(uri: str | None) -> list[str]:
    """Return a URI's secrets: its password (or lone user name, often a token) and credentials.

    Credentials are the values of query parameters whose names look like passwords or tokens.
    """
    if not uri:
        return []
    parts = urllib.parse.urlsplit(uri)
    secrets: list[str] = []
    if parts.password:
        secrets.append(parts.password)
    elif parts.username and "@" in parts.netloc:
        secrets.append(parts.username)
    for key, value in urllib.parse.parse_qsl(parts.query):
        if value and _SECRET_QUERY_KEYS.search(key):
            secrets.append(value)
    return secrets


def _redact(text: str, secrets: T.Iterable[str]) -> str:
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
        quoted = urllib.parse.quote(secret, safe="")
        if quoted != secret:
            text = text.replace(quoted, "***")
    return text


def _sqlite_path(uri: str) -> Path | None:
    """Return the database file of a ``sqlite:///`` URI (relative to the working directory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


class MlflowService(Service):
    """MLflow experiment tracking: URIs, experiment, autolog, runs and a client.

    Attributes:
        tracking_uri: where runs are stored. Default: a SQLite database under ``mlruns/`` in the
            working directory (the folder is created). The artifacts of experiments it creates
            in a SQLite store go beside the database, in ``artifacts/<experiment>``.
        registry_uri: where models are registered. Default (None): the tracking URI.
        experiment_name: experiment created or selected by ``start()``.
        registry_name: name under which jobs register their model.
        connect_timeout: seconds ``start()`` waits for an HTTP tracking server to answer before
            failing (MLflow's own retries would take minutes).
        flush_interval: seconds a value logged with ``log_metrics``/``log_params`` may wait in
            the buffer before it is written.
        max_pending: values the buffer holds at most; beyond, ``log_metrics`` waits for the
            writer (memory stays bounded).
        write_retries: retries of a failed batch write before the job fails.
        autolog_disable: turn MLflow's autologging off.
        autolog_disable_for_unsupported_versions: skip autolog for untested library versions.
        autolog_exclusive: autolog only into runs that autolog creates itself.
        autolog_log_input_examples: log input examples with autologged models.
        autolog_log_model_signatures: log signatures with autologged models.
        autolog_log_models: let autolog log models (off: slow; jobs log their model explicitly).
        autolog_log_datasets: let autolog log dataset information (off: slow).
        autolog_silent: silence autolog's own warnings and messages.

    Credentials inside a URI are masked in this object's repr and str and in every message.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> service = MlflowService(tracking_uri=f"sqlite:///{folder}/m.db", experiment_name="demo")
        >>> with service:
        ...     with service.run_context(MlflowService.RunConfig(name="first")) as run:
        ...         _ = service.client().log_param(run.info.run_id, "alpha", 0.5)
        >>> service.client().get_run(run.info.run_id).info.status
        'FINISHED'
    """

    class RunConfig(pydantic.BaseModel):
        """How ``run_context`` starts a run.

        Attributes:
            name: the run's name.
            description: the run's description (shown in the MLflow UI).
            tags: tags set on the run.
            log_system_metrics: sample CPU, memory and disk use while the run is active.

        Example:
            >>> MlflowService.RunConfig(name="training", tags={"team": "ml"}).tags
            {'team': 'ml'}
        """

        model_config = pydantic.ConfigDict(strict=True, frozen=True, extra="forbid")

        name: str
        description: str | None = None
        tags: dict[str, T.Any] | None = None
        log_system_metrics: bool = True

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    registry_uri: str | None = None
    experiment_name: str = "regression_model_template"
    registry_name: str = "regression_model_template"
    connect_timeout: float = pydantic.Field(default=10.0, gt=0)
    flush_interval: float = pydantic.Field(default=1.0, gt=0)
    max_pending: int = pydantic.Field(default=100_000, ge=1000)
    write_retries: int = pydantic.Field(default=3, ge=0)
    autolog_disable: bool = False
    autolog_disable_for_unsupported_versions: bool = False
    autolog_exclusive: bool = False
    autolog_log_input_examples: bool = False
    autolog_log_model_signatures: bool = True
    autolog_log_models: bool = False
    autolog_log_datasets: bool = False
    autolog_silent: bool = False

    _runs: list[str] = pydantic.PrivateAttr(default_factory=list)
    _writer: BatchWriter | None = pydantic.PrivateAttr(default=None)
    _saved_environ: dict[str, str | None] | None = pydantic.PrivateAttr(default=None)
    _sigterm: bool = pydantic.PrivateAttr(default=False)

    @pydantic.field_validator("tracking_uri", "registry_uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("empty URI")
        return value

    def __repr_args__(self) -> T.Iterable[tuple[str | None, T.Any]]:
        for name, value in super().__repr_args__():
            if name in ("tracking_uri", "registry_uri") and isinstance(value, str):
                value = mask_uri(value)
            yield name, value

    @property
    def registry(self) -> str:
        """The registry URI in use: ``registry_uri``, or the tracking URI when unset.

        Example:
            >>> MlflowService(tracking_uri="sqlite:///t.db").registry
            'sqlite:///t.db'
        """
        return self.registry_uri or self.tracking_uri

    def start(self) -> None:
        """Point MLflow at the tracking and registry stores, select the experiment, set autolog.

        Raises:
            ServiceError: an invalid or unreachable store, naming the setting and the cause
                (with credentials masked).

        Example:
            >>> import tempfile
            >>> service = MlflowService(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/m.db")
            >>> service.start()
            >>> import mlflow
            >>> mlflow.get_experiment_by_name("regression_model_template").name
            'regression_model_template'
            >>> service.stop()
        """
        self._ensure_local_store()
        self._probe_server()
        import mlflow

        _stdlib_bridge.adopt()  # importing mlflow gave its loggers their own stderr handler
        if self._saved_environ is None:  # mlflow.set_*_uri write these: restored by stop()
            names = (*_MLFLOW_URI_VARIABLES, _MLFLOW_QUIET_LINKS)
            self._saved_environ = {name: os.environ.get(name) for name in names}
            os.environ[_MLFLOW_QUIET_LINKS] = "true"
        with self._errors("tracking_uri", f"cannot use the tracking store {self._masked()}"):
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.registry)
            self._create_experiment_beside_store()
            mlflow.set_experiment(self.experiment_name)
        with self._errors("autolog_disable", "cannot configure autolog"):
            mlflow.autolog(
                disable=self.autolog_disable,
                disable_for_unsupported_versions=self.autolog_disable_for_unsupported_versions,
                exclusive=self.autolog_exclusive,
                log_input_examples=self.autolog_log_input_examples,
                log_model_signatures=self.autolog_log_model_signatures,
                log_models=self.autolog_log_models,
                log_datasets=self.autolog_log_datasets,
                silent=self.autolog_silent,
            )
        if self._writer is None:
            # Imported after mlflow: its exit hook then flushes before MLflow ends runs.
            from regression_model_template.io.batching import BatchWriter

            self._writer = BatchWriter(
                self.client(),
                interval=self.flush_interval,
                max_pending=self.max_pending,
                retries=self.write_retries,
                redact=self.redact,
            )
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        ):
            signal.signal(signal.SIGTERM, _terminate)
            self._sigterm = True

    def stop(self) -> None:
        """Write buffered values, end the runs left open (KILLED), restore MLflow's globals.

        Raises:
            ServiceError: buffered values could not be written (after every retry).

        Example:
            >>> MlflowService().stop()  # never started: harmless
        """
        if "mlflow" not in sys.modules:
            return  # never started: nothing to end or flush
        import mlflow

        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        finally:
            while self._runs:
                run_id = self._runs.pop()
                active = mlflow.active_run()
                if active is not None and active.info.run_id == run_id:
                    _logger.warning("Ending run {} left open at stop: KILLED", run_id)
                    mlflow.end_run("KILLED")
            if self._sigterm and signal.getsignal(signal.SIGTERM) is _terminate:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._sigterm = False
            self._restore_environ()

    @contextlib.contextmanager
    def run_context(self, run_config: MlflowService.RunConfig) -> T.Iterator[ActiveRun]:
        """Start a run; end it FINISHED, FAILED (exception) or KILLED (Ctrl-C, SIGTERM).

        A run started while another is active becomes its nested child. Values buffered by
        ``log_metrics``/``log_params`` are written before the run ends; if they cannot be,
        the run ends FAILED and ``ServiceError`` is raised.

        Example:
            >>> import tempfile
            >>> service = MlflowService(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/m.db")
            >>> with service:
            ...     with service.run_context(MlflowService.RunConfig(name="outer")) as outer:
            ...         with service.run_context(MlflowService.RunConfig(name="inner")) as inner:
            ...             pass
            >>> inner.data.tags["mlflow.parentRunId"] == outer.info.run_id
            True
        """
        import mlflow

        with self._errors("tracking_uri", f"cannot start a run on {self._masked()}"):
            run = mlflow.start_run(
                run_name=run_config.name,
                description=run_config.description,
                tags=run_config.tags,
                nested=mlflow.active_run() is not None,
                log_system_metrics=run_config.log_system_metrics,
            )
        run_id = run.info.run_id
        self._runs.append(run_id)
        try:
            yield run
        except (KeyboardInterrupt, Terminated) as error:
            self._finish(run_id, "KILLED", error)
            raise
        except SystemExit as error:
            self._finish(run_id, "FINISHED" if error.code in (0, None) else "FAILED", error)
            raise
        except BaseException as error:
            self._finish(run_id, "FAILED", error)
            raise
        self._finish(run_id, "FINISHED", None)

    def client(self) -> MlflowClient:
        """Return an ``MlflowClient`` bound to this service's tracking and registry URIs.

        Works before ``start()`` and after ``stop()``.

        Example:
            >>> import tempfile
            >>> client = MlflowService(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/m.db").client()
            >>> [e.name for e in client.search_experiments()]
            ['Default']
        """
        from mlflow.tracking import MlflowClient

        self._ensure_local_store()
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry)

    def log_params(self, params: T.Mapping[str, T.Any]) -> None:
        """Log parameters to the active run, through the buffer (see ``log_metrics``).

        Example:
            >>> import tempfile
            >>> service = MlflowService(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/m.db")
            >>> with service, service.run_context(MlflowService.RunConfig(name="p")) as run:
            ...     service.log_params({"alpha": 0.5})
            >>> service.client().get_run(run.info.run_id).data.params
            {'alpha': '0.5'}
        """
        self._buffer().log_params(self._active_run_id(), params)

    def log_metrics(self, metrics: T.Mapping[str, float], step: int | None = None) -> None:
        """Log metrics to the active run, at ``step`` when given: fast, batched, lossless.

        Values go to an in-memory buffer that a background thread writes with ``log_batch``;
        they land in the run active in the calling thread (or, from another thread, the run
        most recently started by ``run_context``). Call it freely inside a training loop.

        Raises:
            ServiceError: no active run, the service is not started, or earlier values could
                not be written.

        Example:
            >>> import tempfile
            >>> service = MlflowService(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/m.db")
            >>> with service, service.run_context(MlflowService.RunConfig(name="m")) as run:
            ...     service.log_metrics({"rmse": 53.0}, step=1)
            >>> service.client().get_run(run.info.run_id).data.metrics
            {'rmse': 53.0}
        """
        self._buffer().log_metrics(self._active_run_id(), metrics, step)

    def redact(self, text: str) -> str:
        """Return ``text`` with the credentials of this service's URIs replaced by ``***``.

        Example:
            >>> service = MlflowService(tracking_uri="https://bob:pa55@mlflow.example.com")
            >>> service.redact("cannot reach https://bob:pa55@mlflow.example.com")
            'cannot reach https://bob:***@mlflow.example.com'
        """
        return _redact(text, self._secrets())

    # -- helpers

    def _masked(self) -> str:
        return mask_uri(self.tracking_uri)

    def _secrets(self) -> list[str]:
        return _uri_secrets(self.tracking_uri) + _uri_secrets(self.registry_uri)

    @contextlib.contextmanager
    def _errors(self, setting: str, what: str) -> T.Iterator[None]:
        """Turn a dependency's exception into a ServiceError without secrets."""
        try:
            yield
        except ServiceError:
            raise
        except Exception as exc:
            secrets = self._secrets()
            cause = f"{type(exc).__name__}: {exc}"
            safe = _redact(cause, secrets)
            origin: BaseException = exc if safe == cause else RedactedError(safe)
            raise ServiceError("MlflowService", setting, f"{what}: {safe}") from origin

    def _buffer(self) -> BatchWriter:
        if self._writer is None:
            raise ServiceError("MlflowService", "start", "not started: log inside `with service:`")
        return self._writer

    def _active_run_id(self) -> str:
        import mlflow

        active = mlflow.active_run()
        if active is not None:
            return str(active.info.run_id)
        if self._runs:  # another thread's run_context: MLflow's active run is per thread
            return self._runs[-1]
        raise ServiceError("MlflowService", "run", "no active run: log inside run_context()")

    def _finish(self, run_id: str, status: str, error: BaseException | None) -> None:
        """Write the run's buffered values, then end it; a failed write makes it FAILED."""
        if run_id in self._runs:  # stop() inside the block already ended it
            self._runs.remove(run_id)
        try:
            if self._writer is not None:
                self._writer.flush()
        except ServiceError as write_error:
            self._end_run(run_id, "FAILED" if status == "FINISHED" else status)
            if error is None:
                raise
            error.add_note(str(write_error))
            return
        self._end_run(run_id, status)

    def _create_experiment_beside_store(self) -> None:
        """Keep a SQLite store's artifacts beside the database file.

        MLflow would otherwise put them in ``./mlruns`` of whatever the working directory is.
        """
        path = _sqlite_path(self.tracking_uri)
        client = self.client()
        if path is None or client.get_experiment_by_name(self.experiment_name) is not None:
            return
        folder = path.parent.resolve() / "artifacts" / re.sub(r"[^\w.-]", "_", self.experiment_name)
        client.create_experiment(self.experiment_name, artifact_location=folder.as_uri())

    def _restore_environ(self) -> None:
        saved, self._saved_environ = self._saved_environ, None
        for name, value in (saved or {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def _end_run(self, run_id: str, status: str) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:
            return  # already ended by the block itself
        with self._errors("tracking_uri", f"cannot end run {run_id} as {status}"):
            mlflow.end_run(status)

    def _ensure_local_store(self) -> None:
        for setting, uri in (("tracking_uri", self.tracking_uri), ("registry_uri", self.registry)):
            path = _sqlite_path(uri)
            if path is None:
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ServiceError(
                    "MlflowService", setting, f"cannot create the folder of {uri!r}: {exc}"
                ) from exc

    def _probe_server(self) -> None:
        """Fail fast, within ``connect_timeout``, when an HTTP tracking server does not answer."""
        parts = urllib.parse.urlsplit(self.tracking_uri)
        if parts.scheme not in ("http", "https"):
            return
        import requests

        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc += f":{parts.port}"
        url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))
        auth = (parts.username, parts.password or "") if parts.username else None
        try:
            # Any HTTP answer (even 401 or 404) proves the server is there.
            requests.get(url, auth=auth, timeout=self.connect_timeout, allow_redirects=False)
        except requests.RequestException as exc:
            cause = _redact(f"{type(exc).__name__}: {exc}", self._secrets())
            raise ServiceError(
                "MlflowService",
                "tracking_uri",
                f"no answer from the tracking server {self._masked()} within "
                f"{self.connect_timeout:g} s (mlflow.connect_timeout): {cause}",
            ) from RedactedError(cause)
