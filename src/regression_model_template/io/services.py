"""The three global services of an ML job: logs, alerts to a person, and MLflow tracking.

Each service is a frozen, strict pydantic model (its settings) with ``start()`` and ``stop()``
(its lifecycle); every service is also a context manager. Services never read the
configuration or the container themselves: ``regression_model_template.containers`` builds
them from the merged configuration and starts them in order. The machinery they use lives
beside this module, one idea each: ``logs``, ``alert_channels`` and ``desktop``, ``stores``,
``tracking`` and ``batching``, ``spool`` and ``recovery``, ``run_logs``, ``masking`` and
``errors``.

Heavy dependencies (mlflow, plyer, apprise, requests) are imported when a service starts, not
when this module is imported.

Example:
    >>> with AlertsService(enable=False) as alerts:
    ...     alerts.notify("Training", "done")
    [regression_model_template] Training: done
"""

from __future__ import annotations

import abc
import contextlib
import os
import threading
import time
import types
import typing as T
from pathlib import Path

import loguru
import pydantic
from loguru import logger as _logger

from regression_model_template.io import (
    alert_channels,
    logs,
    recovery,
    run_logs,
    spool,
    stores,
    tracking,
)
from regression_model_template.io.errors import ServiceError, translated_errors
from regression_model_template.io.masking import (
    RedactedError,
    channel_secrets,
    mask_uri,
    redact,
    uri_secrets,
)

if T.TYPE_CHECKING:
    from mlflow import ActiveRun
    from mlflow.tracking import MlflowClient


__all__ = [
    "AlertsService",
    "LoggerService",
    "MlflowService",
    "RedactedError",
    "Service",
    "ServiceError",
    "mask_uri",
]

DEFAULT_LOG_FORMAT = logs.DEFAULT_LOG_FORMAT


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

    # Settings can be secrets: a validation error never echoes the value it refused.
    model_config = pydantic.ConfigDict(
        strict=True, frozen=True, extra="forbid", hide_input_in_errors=True
    )

    @abc.abstractmethod
    def start(self) -> None:
        """Start the service: acquire what it needs and configure global state."""

    def stop(self) -> None:
        """Stop the service and release what it holds; harmless when not started."""

    def secrets(self) -> list[str]:
        """The secret parts of the settings, to mask in any message (none by default).

        Example:
            >>> LoggerService().secrets()
            []
        """
        return []

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


class LoggerService(Service):
    """A loguru logger writing to one sink, with standard-library logging routed into it.

    Attributes:
        sink: "stderr", "stdout", or the path of a log file (its folder is created).
        level: lowest level written (a loguru level name: TRACE, DEBUG, INFO, SUCCESS,
            WARNING, ERROR, CRITICAL).
        format: loguru format; the default shows timestamp, level, source
            (``name:function:line``) and the message.
        colorize: colour the ``stderr``/``stdout`` stream: None (default) when it is a
            terminal, True or False to force it. A log file is never coloured.
        serialize: write each record as one JSON line.
        backtrace: extend exception tracebacks beyond the catching frame.
        diagnose: show variable values in tracebacks. Off by default: values can be secrets.
        catch: keep the program running when the sink fails; the error is printed to stderr.
        intercept_stdlib: route records of the standard ``logging`` module (MLflow's included)
            into this sink, so that a job has a single log stream.

    Example:
        >>> service = LoggerService(sink="stdout", format="{level} {message}")
        >>> with service:
        ...     service.logger().info("hello")
        INFO hello
    """

    sink: T.Annotated[str, pydantic.AfterValidator(logs.check_sink)] = "stderr"
    level: T.Annotated[str, pydantic.BeforeValidator(logs.check_level)] = "DEBUG"
    format: str = logs.DEFAULT_LOG_FORMAT
    colorize: bool | None = None
    serialize: bool = False
    backtrace: bool = True
    diagnose: bool = False
    catch: bool = True
    intercept_stdlib: bool = True

    _handler_id: int | None = pydantic.PrivateAttr(default=None)
    _bridged: bool = pydantic.PrivateAttr(default=False)
    _secrets: tuple[str, ...] = pydantic.PrivateAttr(default=())
    _lock: threading.Lock = pydantic.PrivateAttr(default_factory=threading.Lock)

    def start(self) -> None:
        """Add this service's sink to loguru (once) and route standard logging into it.

        Raises:
            ServiceError: the sink is a file that cannot be created or opened.

        Example:
            >>> service = LoggerService(sink="stdout", format="{message}")
            >>> service.start()
            >>> service.start()  # a second start does not duplicate the output
            >>> service.logger().info("once")
            once
            >>> service.stop()
        """
        with self._lock:
            if self._handler_id is not None:
                return
            loguru_options = self.model_dump(exclude={"sink", "intercept_stdlib"})
            self._handler_id = logs.add_sink(self.sink, secrets=self._secrets, **loguru_options)
            if self.intercept_stdlib and not logs.stdlib_bridge.attached:
                logs.stdlib_bridge.attach()
                self._bridged = True

    def stop(self) -> None:
        """Flush pending records and remove only what this service added.

        Example:
            >>> service = LoggerService(sink="stdout", format="{message}")
            >>> service.stop()  # never started: harmless
            >>> with service:
            ...     service.logger().info("in")
            in
            >>> service.stop()  # twice: harmless
        """
        with self._lock:
            if self._bridged:
                logs.stdlib_bridge.detach()
                self._bridged = False
            if self._handler_id is not None:
                logs.remove_sink(self._handler_id)
                self._handler_id = None

    def mask(self, secrets: T.Sequence[str]) -> None:
        """Write ``secrets`` as ``***`` in every line of the sink. Takes effect at ``start()``.

        The container passes the credentials MLflow sends (``MLFLOW_TRACKING_PASSWORD``,
        ``MLFLOW_TRACKING_TOKEN``): whoever logs them, the job, MLflow or urllib3, they are
        never written.

        Example:
            >>> service = LoggerService(sink="stdout", format="{message}")
            >>> service.mask(["pa55w0rd"])
            >>> with service:
            ...     service.logger().info("login with pa55w0rd")
            login with ***
        """
        self._secrets = tuple(secrets)

    def secrets(self) -> list[str]:
        """The secrets this service masks (see ``mask``).

        Example:
            >>> LoggerService().secrets()
            []
        """
        return list(self._secrets)

    def logger(self) -> loguru.Logger:
        """Return the loguru logger.

        Example:
            >>> LoggerService().logger().bind(job="training")  # doctest: +ELLIPSIS
            <loguru.logger handlers=[...]>
        """
        return _logger


# %% ALERTS


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value  # one URL given alone is a list of one


class AlertsService(Service):
    """Alerts to a person: the desktop, any number of apprise URLs, the console as a fallback.

    Each alert goes to the desktop (when one can show it) and to every URL at once: Slack,
    Microsoft Teams (``workflows://``), e-mail (``mailto://``), ntfy, webhooks (``json://``)...
    When no channel delivers it, or alerts are disabled, it is printed as
    ``[app_name] title: message`` (with the level before the title unless it is ``info``).
    ``notify`` never raises and returns within ``max_wait`` seconds however many channels are
    slow; each failing channel and cause is warned once, with the URL masked. ``notify`` before
    ``start()`` starts the channels itself, within the same ``max_wait``; after ``stop()``,
    alerts are printed.

    Attributes:
        enable: send alerts to the desktop and the URLs; when False, every alert is printed.
        app_name: the application name shown with each alert.
        timeout: seconds a desktop notification stays on screen (None: the desktop's default).
        max_wait: seconds ``notify`` waits for all channels together; a slower channel is
            abandoned for that alert.
        urls: apprise URLs, one per channel. They are secrets: never shown, logged or printed
            (keep them in the environment, e.g. ``RMT_ALERTS__URLS='["slack://..."]'``).
        dedup_seconds: the same title and message again within this many seconds is sent
            once; the log says how many repeats were folded (0: never fold).

    Example:
        >>> alerts = AlertsService(enable=False, app_name="demo")
        >>> with alerts:
        ...     alerts.notify("Evaluation", "r2=0.45")
        ...     alerts.notify("Evaluation", "r2 below 0.5", level="warning")
        [demo] Evaluation: r2=0.45
        [demo] WARNING Evaluation: r2 below 0.5
    """

    enable: bool = True
    app_name: str = "regression_model_template"
    timeout: int | None = pydantic.Field(default=None, ge=1)
    max_wait: float = pydantic.Field(default=2.0, gt=0, le=60)
    urls: T.Annotated[list[pydantic.SecretStr], pydantic.BeforeValidator(_one_or_many)] = []
    dedup_seconds: float = pydantic.Field(default=60.0, ge=0)

    _dispatcher: alert_channels.Dispatcher | None = pydantic.PrivateAttr(default=None)
    _stopped: bool = pydantic.PrivateAttr(default=False)  # later alerts go to the console
    _opening: threading.Lock = pydantic.PrivateAttr(default_factory=threading.Lock)
    _masked: tuple[str, ...] = pydantic.PrivateAttr(default=())  # see mask()

    @property
    def channel(self) -> T.Literal["desktop", "console"]:
        """Whether the desktop shows the next alert (``desktop``) or it cannot (``console``).

        Example:
            >>> AlertsService(enable=False).channel
            'console'
        """
        return "desktop" if "desktop" in self.channels else "console"

    @property
    def channels(self) -> list[str]:
        """Where the next alert goes, URLs masked (``console`` alone when nowhere else).

        Example:
            >>> AlertsService(enable=False).channels
            ['console']
        """
        return (self._dispatcher.names if self._dispatcher else []) or ["console"]

    @property
    def refused(self) -> list[str]:
        """The URLs that cannot be used at all (masked), each with why.

        Example:
            >>> AlertsService(enable=False).refused
            []
        """
        found = self._dispatcher.refused if self._dispatcher else []
        return [f"{delivery.channel}: {delivery.failure}" for delivery in found]

    def secrets(self) -> list[str]:
        """The parts of the alert URLs that may be secrets, to mask wherever logs are kept.

        Example:
            >>> AlertsService(urls=["json://127.0.0.1:8080/hook/t0ken"]).secrets()[-1]
            't0ken'
        """
        return [piece for url in self.urls for piece in channel_secrets(url.get_secret_value())]

    def start(self) -> None:
        """Choose the channels: the desktop when it can show alerts, and every URL.

        Example:
            >>> alerts = AlertsService(enable=False)
            >>> alerts.start()
            >>> alerts.channels
            ['console']
        """
        self._close()  # a second start chooses again
        self._stopped = False
        if not self.enable:
            _logger.debug("Alerts go to the console (alerts.enable is false)")
            return
        self._dispatcher = alert_channels.Dispatcher.open(
            desktop=True,
            urls=[url.get_secret_value() for url in self.urls],
            app_name=self.app_name,
            timeout=self.timeout,
            dedup_seconds=self.dedup_seconds,
        )
        _logger.debug("Alerts go to {}", ", ".join(self.channels))

    def mask(self, secrets: T.Sequence[str]) -> None:
        """Write ``secrets`` as ``***`` in every alert's title and message, whoever sends it.

        The container passes the credentials MLflow sends (``MLFLOW_TRACKING_PASSWORD``,
        ``MLFLOW_TRACKING_TOKEN``), as it does to the LoggerService.

        Example:
            >>> alerts = AlertsService(enable=False)
            >>> alerts.mask(["pa55w0rd"])
            >>> alerts.notify("Login failed", "with pa55w0rd")
            [regression_model_template] Login failed: with ***
        """
        self._masked = tuple(secrets)

    def notify(self, title: str, message: str, level: alert_channels.Level = "info") -> None:
        """Send an alert to every channel; print it when none delivers it.

        ``level`` is ``info``, ``success``, ``warning`` or ``failure``: apprise's notify type,
        and shown in the console line.

        Before ``start()``, the first alert starts the channels (the time it takes counts in
        ``max_wait``), so a service built in a notebook or a test alerts like a started one.

        Example:
            >>> AlertsService(enable=False).notify("Job failed", "ValueError", level="failure")
            [regression_model_template] FAILURE Job failed: ValueError
        """
        title, message = redact(title, self._masked), redact(message, self._masked)
        dispatcher, wait = self._started_on_first_use()
        if level not in alert_channels.LEVELS:
            if dispatcher is not None:
                dispatcher.warn("level", f"unknown alert level {level!r}: sent as info")
            level = "info"
        try:  # never raise: no thread at interpreter shutdown, a closed stdout...
            if dispatcher is None or not dispatcher.send(title, message, level, wait):
                tag = "" if level == "info" else f"{level.upper()} "
                print(f"[{self.app_name}] {tag}{title}: {message}", flush=True)
        except Exception as exc:
            _logger.error("Alert {!r} not sent: {}", title, type(exc).__name__)

    def probe(
        self, title: str, message: str, level: alert_channels.Level = "info"
    ) -> list[alert_channels.Delivery]:
        """Send an alert to every channel, without folding or console; return what each did.

        Example:
            >>> AlertsService(enable=False).probe("check", "test alert")
            []
        """
        dispatcher, wait = self._started_on_first_use()
        return dispatcher.probe(title, message, level, wait) if dispatcher else []

    def stop(self) -> None:
        """Report folded repeats; later alerts go to the console.

        Example:
            >>> AlertsService(enable=False).stop()
        """
        self._stopped = True
        self._close()

    def _started_on_first_use(self) -> tuple[alert_channels.Dispatcher | None, float]:
        """The channels, and the seconds an alert may wait for them (``max_wait``).

        When an alert comes before ``start()``, the channels are started here, and the time
        that takes is taken out of the wait.
        """
        if self._dispatcher is None and self.enable and not self._stopped:
            began = time.monotonic()
            with self._opening:  # two threads alerting at once start the channels once
                if self._dispatcher is None and not self._stopped:
                    self.start()
            return self._dispatcher, max(self.max_wait - (time.monotonic() - began), 0.0)
        return self._dispatcher, self.max_wait

    def _close(self) -> None:
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            dispatcher.close()


# %% MLFLOW

_NOT_BLANK = pydantic.AfterValidator(stores.not_blank)


class MlflowService(Service):
    """MLflow experiment tracking: URIs, experiment, autolog, runs and a client.

    Attributes:
        tracking_uri: where runs are stored. Default: a SQLite database under ``mlruns/`` in the
            working directory (the folder is created). The artifacts of experiments it creates
            in a SQLite store go beside the database, in ``artifacts/<experiment>``.
        registry_uri: where models are registered. Default (None): the tracking URI.
        experiment_name: experiment created or selected by ``start()``.
        registry_name: name under which jobs register their model.
        connect_timeout: seconds ``start()`` waits for an HTTP tracking server to answer, or
            for a connection to a PostgreSQL store, before failing (MLflow's own retries would
            take minutes).
        flush_interval: seconds a value logged with ``log_metrics``/``log_params`` may wait in
            the spool before it is written.
        spool_dir: where each run's values are spooled before they are written (None: the
            per-user cache folder, ``~/.cache/regression_model_template/spool`` on Linux).
            What a killed process left there is sent at the next ``start()`` or by
            ``regression-model-template recover``.
        end_timeout: seconds the end of a run waits for the store to take the run's last
            values; past it they stay in the spool and ``run_context`` raises ``ServiceError``.
        full_disk_memory: values held in memory at most while a run's spool cannot be written
            (a full or read-only disk): they go straight to the store from there, and
            ``log_metrics`` waits while that many are waiting (about 200-500 bytes each: 20-50
            MB by default). A killed process loses them; ``recover`` cannot send them.
        write_retries: retries of a value the store refuses (after 0.5 s, then doubling)
            before it is set aside in ``<spool_dir>/refused/`` and the run ends FAILED; the
            run's other values are written regardless. An unreachable store is retried for as
            long as it takes.
        parallel_uploads: ``log_batch`` calls in flight at once when the tracking store is a
            server (``http(s)://``): a server with several workers takes a backlog faster
            (one job's 20,000 values into a 4-worker server on 2 cores, final flush included:
            2.22 s with 1, 2.06 s with 2, 1.94 s with 4; ``benchmarks/RESULTS.md``). 1 sends
            one at a time. A database store is always written by one call at a time.
        capture_log: keep each run's own log: every line logged while it is the innermost open
            run (the job's, its threads', MLflow's) is written, secrets masked, to its spool
            folder as it goes and stored as the artifact ``run.log`` when the run ends (or by
            ``recover`` after a crash). Records inside a run carry its id (``extra``
            ``mlflow_run_id``) either way.
        capture_log_max_bytes: the size cap of a run's log: past it the first and the last
            part are kept, with a line saying how much was cut between them.
        heartbeat_interval: seconds between two heartbeats of an open run: the background
            writer sets the run's tag ``rmt.heartbeat`` to the time, until the run ends. A
            reaper (``regression-model-template reap``, the team stack's) ends KILLED the runs
            whose heartbeat is older than its ``--stale-after``: keep this well below that.
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

    tracking_uri: T.Annotated[str, _NOT_BLANK] = "sqlite:///mlruns/mlflow.db"
    registry_uri: T.Annotated[str | None, _NOT_BLANK] = None
    experiment_name: str = "regression_model_template"
    registry_name: str = "regression_model_template"
    connect_timeout: float = pydantic.Field(default=10.0, gt=0)
    flush_interval: float = pydantic.Field(default=1.0, gt=0)
    spool_dir: str | None = pydantic.Field(default=None, min_length=1)
    end_timeout: float = pydantic.Field(default=60.0, gt=0)
    write_retries: int = pydantic.Field(default=3, ge=0)
    full_disk_memory: int = pydantic.Field(default=100_000, ge=1)
    parallel_uploads: int = pydantic.Field(default=2, ge=1, le=16)
    capture_log: bool = True
    capture_log_max_bytes: int = pydantic.Field(default=5_000_000, ge=10_000)
    heartbeat_interval: float = pydantic.Field(default=30.0, gt=0)
    autolog_disable: bool = False
    autolog_disable_for_unsupported_versions: bool = False
    autolog_exclusive: bool = False
    autolog_log_input_examples: bool = False
    autolog_log_model_signatures: bool = True
    autolog_log_models: bool = False
    autolog_log_datasets: bool = False
    autolog_silent: bool = False

    _session: tracking.TrackingSession | None = pydantic.PrivateAttr(default=None)
    _log_style: run_logs.LogStyle = pydantic.PrivateAttr(
        default=run_logs.LogStyle(logs.DEFAULT_LOG_FORMAT)
    )

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
        self._check_stores()
        stores.probe_server(self.tracking_uri, self.connect_timeout)
        if self._session is not None:
            return  # started already
        import mlflow  # noqa: F401 -- it gives its loggers their own handlers: take them over

        logs.stdlib_bridge.adopt()
        self._open_databases()
        spool_dir = self._spool_dir()
        identity = stores.store_identity(self.tracking_uri)  # here: relative paths are cwd's
        for report in self._recover(spool_dir, identity):  # what killed processes left here
            log = _logger.warning if report.waiting or report.damage else _logger.info
            log("Recovered from the spool: {}", report.summary())
        settings = self.model_dump()
        self._session = tracking.TrackingSession.open(
            self.tracking_uri,
            self.registry,
            experiment_name=self.experiment_name,
            autolog={k[len("autolog_") :]: v for k, v in settings.items() if "autolog_" in k},
            writer={
                "spool_dir": spool_dir,
                "store_id": identity,
                "interval": self.flush_interval,
                "retries": self.write_retries,
                "memory_limit": self.full_disk_memory,
                "uploads": self.parallel_uploads if stores.is_server(self.tracking_uri) else 1,
                "heartbeat": self.heartbeat_interval,
            },
            redact=self.redact,
            errors=self._errors,
            store=self._masked(),
            end_timeout=self.end_timeout,
            run_log=self._run_log_options(),
        )

    def log_runs_like(self, format: str, level: str, secrets: T.Sequence[str] = ()) -> None:
        """Write each run's log in ``format`` from ``level`` on, also masking ``secrets``.

        The container passes the LoggerService's format and level, the alert URLs' secrets
        and the credentials MLflow sends, so that ``run.log`` reads like the job's log. The
        ``secrets`` are masked in this service's messages too (``redact``). Takes effect at
        ``start()`` for ``run.log``, at once for messages.

        Example:
            >>> service = MlflowService()
            >>> service.log_runs_like("{level} {message}", "INFO", ["t0ken"])
        """
        self._log_style = run_logs.LogStyle(format, level, tuple(secrets))

    def stop(self) -> None:
        """Write buffered values, end the runs left open (KILLED), restore MLflow's globals.

        Raises:
            ServiceError: buffered values could not be written (after every retry).

        Example:
            >>> MlflowService().stop()  # never started: harmless
        """
        started, self._session = self._session, None
        if started is not None:
            started.close()

    @contextlib.contextmanager
    def run_context(self, run_config: MlflowService.RunConfig) -> T.Iterator[ActiveRun]:
        """Start a run; end it FINISHED, FAILED (exception) or KILLED (Ctrl-C, SIGTERM).

        A run started while another is active becomes its nested child. Values buffered by
        ``log_metrics``/``log_params`` are written before the run ends; if they cannot be,
        the run ends FAILED and ``ServiceError`` is raised. What is logged while the run is
        the innermost one is its artifact ``run.log`` (see ``capture_log``).

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
        with self._started().run(
            run_name=run_config.name,
            description=run_config.description,
            tags=run_config.tags,
            log_system_metrics=run_config.log_system_metrics,
        ) as run:
            yield run

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

        self._check_stores()
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry)

    def log_params(self, params: T.Mapping[str, T.Any]) -> None:
        """Log parameters to the active run, through the buffer (see ``log_metrics``).

        Keys are ``str`` and valid MLflow names; values are stored as text (``str(value)``), cut
        to MLflow's 6,000 characters with a warning, as MLflow does, unless
        ``MLFLOW_TRUNCATE_LONG_VALUES=false`` (then they are refused).

        Raises:
            MlflowException: (``INVALID_PARAMETER_VALUE``, what ``mlflow.log_param`` raises) a
                key that is not a ``str`` or not a valid name, or a value over the limit; the
                message names the key and MLflow's reason. Nothing of the call is logged.
            ServiceError: no active run, or the service is not started.

        Example:
            >>> import tempfile
            >>> service = MlflowService(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/m.db")
            >>> with service, service.run_context(MlflowService.RunConfig(name="p")) as run:
            ...     service.log_params({"alpha": 0.5})
            >>> service.client().get_run(run.info.run_id).data.params
            {'alpha': '0.5'}
        """
        started = self._started()
        started.writer.log_params(started.active_run_id(), params)

    def log_metrics(
        self, metrics: T.Mapping[str, T.SupportsFloat], step: T.SupportsIndex | None = None
    ) -> None:
        """Log metrics to the active run, at ``step`` when given: fast, batched, lossless.

        Values go to an in-memory buffer that a background thread writes with ``log_batch``;
        they land in the run active in the calling thread (or, from another thread, the run
        most recently started by ``run_context``). Call it freely inside a training loop.

        Takes what ``mlflow.log_metric`` takes, checked by MLflow's own rules at the call:
        names are ``str`` and valid MLflow names; values are numbers (Python or numpy, a bool,
        a numeric string, a one-element array or tensor), stored as floats, NaN and infinities
        included; ``step`` is an integer (``int``, a numpy integer) within 64 bits, stored as
        an ``int``, 0 when None.

        Raises:
            MlflowException: (``INVALID_PARAMETER_VALUE``, what ``mlflow.log_metric`` raises) a
                name that is not a ``str`` or not valid, a value that is not a number, a step
                that is not an integer; the message names the metric and MLflow's reason.
                Nothing of the call is logged: fix it and call again.
            ServiceError: no active run, or the service is not started.

        Example:
            >>> import tempfile
            >>> service = MlflowService(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/m.db")
            >>> with service, service.run_context(MlflowService.RunConfig(name="m")) as run:
            ...     service.log_metrics({"rmse": 53.0}, step=1)
            >>> service.client().get_run(run.info.run_id).data.metrics
            {'rmse': 53.0}
        """
        started = self._started()
        started.writer.log_metrics(started.active_run_id(), metrics, step)

    def run_link(self, run_id: str | None = None) -> str | None:
        """The run's page in the MLflow UI when the store is a tracking server, else None.

        ``run_id`` defaults to the run started most recently.

        Example:
            >>> MlflowService(tracking_uri="https://u:pw@mlflow.example.com").run_link("ab12")
        """
        run_id = run_id or (self._session.last_run_id if self._session else None)
        if run_id is None or self._session is None:
            return None
        return stores.run_link(self.tracking_uri, self._session.experiment_id, run_id)

    def recover(
        self, hosts: T.Collection[str] = (), elsewhere: list[recovery.Elsewhere] | None = None
    ) -> list[recovery.Recovered]:
        """Send what killed processes left in the spool for this store; end their runs.

        Each run is ended with the status it recorded, or KILLED when its process died in the
        middle of it. Runs of live processes and of other stores are not touched, nor runs
        spooled on another host (a shared home folder) unless their host is among ``hosts``:
        this host cannot tell whether their process lives. Those left go to ``elsewhere``.

        Raises:
            ServiceError: the spool folder cannot be created (``mlflow.spool_dir``).

        Example:
            >>> import tempfile
            >>> folder = tempfile.mkdtemp()
            >>> service = MlflowService(tracking_uri=f"sqlite:///{folder}/m.db", spool_dir=folder)
            >>> service.recover()
            []
        """
        identity = stores.store_identity(self.tracking_uri)
        return self._recover(self._spool_dir(), identity, hosts, elsewhere)

    def _recover(
        self,
        folder: Path,
        identity: str,
        hosts: T.Collection[str] = (),
        elsewhere: list[recovery.Elsewhere] | None = None,
    ) -> list[recovery.Recovered]:
        if not spool.spooled_runs(folder):
            return []
        with self._errors("tracking_uri", f"cannot use the tracking store {self._masked()}"):
            client = self.client()
        with stores.quiet_run_links():  # MLflow would print the URI, credentials included
            return recovery.recover(
                folder,
                self._masked(),
                client,
                self.redact,
                identity=identity,
                hosts=hosts,
                elsewhere=elsewhere,
            )

    def redact(self, text: str) -> str:
        """Return ``text`` with the credentials of this service's URIs replaced by ``***``.

        Example:
            >>> service = MlflowService(tracking_uri="https://bob:pa55@mlflow.example.com")
            >>> service.redact("cannot reach https://bob:pa55@mlflow.example.com")
            'cannot reach https://bob:***@mlflow.example.com'
        """
        return redact(text, self.secrets())

    def secrets(self) -> list[str]:
        """The credentials inside the tracking and registry URIs, and those handed over.

        The container hands over (``log_runs_like``) the alert URLs' secrets and the
        credentials MLflow sends (``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``).

        Example:
            >>> MlflowService(tracking_uri="https://bob:pa55@mlflow.example.com").secrets()
            ['pa55']
        """
        handed = self._log_style.secrets
        return [*uri_secrets(self.tracking_uri), *uri_secrets(self.registry_uri), *handed]

    # -- helpers

    def _masked(self) -> str:
        return mask_uri(self.tracking_uri)

    def _errors(self, setting: str, what: str) -> contextlib.AbstractContextManager[None]:
        return translated_errors("MlflowService", setting, what, self.secrets())

    def _open_databases(self) -> None:
        """Open each database store once, one process at a time (``stores.schema_lock``).

        MLflow creates its tables on first use: jobs starting together on an empty database
        would race. The tracking store creates the registry's tables too: a registry in the
        same database needs no second look.
        """
        for setting, uri, open_store in (
            ("tracking_uri", self.tracking_uri, self.client),  # a client opens its store
            ("registry_uri", self.registry, lambda: self.client().search_registered_models()),
        ):
            if setting == "registry_uri" and uri == self.tracking_uri:
                continue
            if stores.is_postgresql(uri) or stores.sqlite_path(uri) is not None:
                with (
                    stores.schema_lock(setting, uri, self.connect_timeout),
                    self._errors(setting, f"cannot open the store {mask_uri(uri)}"),
                ):
                    open_store()

    def _check_stores(self) -> None:
        uris = {"tracking_uri": self.tracking_uri, "registry_uri": self.registry}
        for setting, uri in uris.items():
            stores.check_uri(setting, uri)
        stores.ensure_folders(uris)

    def _spool_dir(self) -> Path:
        """The spool folder, created (user only) and checked writable."""
        folder = Path(self.spool_dir) if self.spool_dir else spool.default_spool_dir()
        probe = folder / f".probe-{os.getpid()}"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise ServiceError(
                "MlflowService", "spool_dir", f"cannot write the spool folder {folder}: {exc}"
            ) from exc
        return folder

    def _run_log_options(self) -> tracking.RunLogOptions:
        style = self._log_style._replace(secrets=tuple(self.secrets()))
        size = self.capture_log_max_bytes if self.capture_log else None
        return tracking.RunLogOptions(style, size)

    def _started(self) -> tracking.TrackingSession:
        session = self._session  # read once: a private attribute costs a lookup per read
        if session is None:
            raise ServiceError("MlflowService", "start", "not started: use `with service:`")
        return session
