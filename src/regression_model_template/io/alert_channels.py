"""Where alerts go: the desktop and apprise URLs, all at once, each bounded in time.

:func:`deliver` sends one alert to every channel in parallel daemon threads and returns, at the
latest, ``max_wait`` seconds later with what each channel did. A channel still busy then is
abandoned for that alert: its thread ends on its own (apprise's per-URL timeouts, 4 s by
default) and never holds the interpreter's exit. Nothing here raises.

apprise URLs are secrets (tokens sit in their host, path or password). A channel is shown by
:func:`regression_model_template.io.masking.mask_channel`, and while URL channels exist every
record of the ``apprise`` and ``urllib3`` loggers has their secrets masked before any handler
sees it (apprise logs whole URLs at DEBUG, and a malformed URL's token at ERROR).

Each alert gets fresh apprise plugin objects: one object would wait between two sends to the
same service (5.5 s for ntfy), and ``Apprise.notify`` runs a thread pool that holds the exit.

Example:
    >>> class Printer(Channel):
    ...     name = "printer"
    ...     def send(self, title: str, message: str, level: str) -> None:
    ...         print(f"{level}: {title}: {message}")
    >>> deliver([Printer()], "Training", "done", "success", max_wait=1.0)
    success: Training: done
    [Delivery(channel='printer', failure=None, lasting=False)]
"""

from __future__ import annotations

import abc
import contextlib
import logging
import threading
import time
import typing as T

from loguru import logger

from regression_model_template.io import desktop as _desktop
from regression_model_template.io.masking import channel_secrets, mask_channel, redact

__all__ = [
    "LEVELS",
    "AppriseChannel",
    "Channel",
    "Delivery",
    "DesktopChannel",
    "Dispatcher",
    "Level",
    "NotDelivered",
    "Repeats",
    "deliver",
    "mask_in_logs",
]

Level = T.Literal["info", "success", "warning", "failure"]
#: The alert levels, apprise's notify types.
LEVELS: tuple[Level, ...] = ("info", "success", "warning", "failure")


class NotDelivered(Exception):
    """A channel did not deliver the alert; the message says why (no secret in it)."""


class Delivery(T.NamedTuple):
    """What one channel did with one alert.

    Attributes:
        channel: the channel's name, secrets masked.
        failure: why it was not delivered, or None when it was.
        lasting: retrying this channel later is pointless (the desktop has no backend, or
            never answers).
    """

    channel: str
    failure: str | None
    lasting: bool = False


class Channel(abc.ABC):
    """A place an alert can go. ``send`` may block and may raise anything."""

    #: How the channel is shown in logs and in ``check`` (secrets masked).
    name: str = "channel"
    #: Whether a send still running at the deadline means the channel will never answer.
    hangs_for_good: bool = False

    @abc.abstractmethod
    def send(self, title: str, message: str, level: str) -> None:
        """Deliver the alert, or raise (:class:`NotDelivered` with the reason, or anything)."""

    def lasting(self, error: BaseException) -> bool:
        """Whether ``error`` means the channel will never work in this process."""
        return False


class DesktopChannel(Channel):
    """Desktop notifications through ``plyer.notification.notify`` (see :mod:`.desktop`)."""

    name = "desktop"
    hangs_for_good = True  # a notification daemon that does not answer stays silent

    def __init__(self, app_name: str, timeout: int | None) -> None:
        self.app_name = app_name
        self.timeout = timeout

    def send(self, title: str, message: str, level: str) -> None:
        """Show the notification (the desktop has no notion of levels)."""
        _desktop.notify(title, message, app_name=self.app_name, timeout=self.timeout)

    def lasting(self, error: BaseException) -> bool:
        """No backend at all will not appear later."""
        return isinstance(error, NotImplementedError)


class AppriseChannel(Channel):
    """One apprise URL: Slack, Teams (``workflows://``), e-mail, ntfy, a webhook, ...

    Raises:
        ValueError: apprise does not accept the URL (the message is masked).
    """

    def __init__(self, url: str) -> None:
        import apprise

        self.url = url
        self.name = mask_channel(url)
        if apprise.Apprise.instantiate(url) is None:
            raise ValueError("apprise does not accept this URL (see its wiki for the form)")

    def send(self, title: str, message: str, level: str) -> None:
        """Send with a fresh plugin object (no wait between sends); raise when not delivered."""
        import apprise

        plugin = apprise.Apprise.instantiate(self.url)
        with _warnings_of_this_thread() as warnings:
            delivered = plugin is not None and plugin.notify(
                body=message, title=title, notify_type=level
            )
        if not delivered:
            raise NotDelivered(warnings[-1] if warnings else "not delivered")


def deliver(
    channels: T.Sequence[Channel], title: str, message: str, level: str, max_wait: float
) -> list[Delivery]:
    """Send the alert to every channel at once; return within ``max_wait`` s what each did."""
    errors: dict[int, BaseException] = {}

    def send(index: int, channel: Channel) -> None:
        try:
            channel.send(title, message, level)
        except BaseException as exc:  # a channel may raise anything; never let it escape
            errors[index] = exc

    workers = [
        threading.Thread(target=send, args=(i, c), name=f"alerts-{i}", daemon=True)
        for i, c in enumerate(channels)
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + max_wait
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    deliveries = []
    for index, (channel, worker) in enumerate(zip(channels, workers, strict=True)):
        if worker.is_alive():
            reason = f"no answer within {max_wait:g} s (alerts.max_wait)"
            deliveries.append(Delivery(channel.name, reason, channel.hangs_for_good))
        elif index in errors:
            error = errors[index]
            reason = str(error) if isinstance(error, NotDelivered) else _describe(error)
            deliveries.append(Delivery(channel.name, reason, channel.lasting(error)))
        else:
            deliveries.append(Delivery(channel.name, None))
    return deliveries


def _describe(error: BaseException) -> str:
    if isinstance(error, NotImplementedError):
        return "no notification backend (install dbus-python or notify-send)"
    return f"{type(error).__name__}: {error}"


# %% apprise's log records: secrets masked, warnings kept per sending thread

_captured = threading.local()


class _MaskSecrets(logging.Filter):
    """Masks the alert URLs' secrets in every record; keeps warnings for the sending thread."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        text = redact(record.getMessage(), self.secrets)
        record.msg, record.args = text, None
        if record.exc_info and record.exc_info[1] is not None:  # its text may carry a URL
            record.msg = f"{text}: {redact(_describe(record.exc_info[1]), self.secrets)}"
            record.exc_info, record.exc_text = None, None
        warnings = getattr(_captured, "warnings", None)
        if warnings is not None and record.levelno >= logging.WARNING:
            warnings.append(record.msg)
        return True


@contextlib.contextmanager
def _warnings_of_this_thread() -> T.Iterator[list[str]]:
    warnings: list[str] = []
    _captured.warnings = warnings
    try:
        yield warnings
    finally:
        _captured.warnings = None


#: Loggers whose records can carry an alert URL: apprise's, and urllib3's (request paths).
#: (A logger's filters see only the records logged on it, not on its children.)
_URL_LOGGERS = (
    "apprise",
    "urllib3.connection",
    "urllib3.connectionpool",
    "urllib3.poolmanager",
    "urllib3.response",
)


_mask = _MaskSecrets([])
_mask_lock = threading.Lock()


def mask_in_logs(urls: T.Sequence[str]) -> None:
    """From now on, records of apprise and urllib3 have the secrets of ``urls`` masked.

    The masking is never removed: a send abandoned at ``max_wait`` may still log after its
    service stopped.

    Example:
        >>> mask_in_logs(["json://127.0.0.1/t0ken"])
        >>> record = logging.makeLogRecord({"msg": "POST /t0ken", "name": "apprise"})
        >>> _ = _mask.filter(record)
        >>> record.getMessage()
        'POST /***'
    """
    secrets = [secret for url in urls for secret in channel_secrets(url)]
    with _mask_lock:
        _mask.secrets = sorted(set(_mask.secrets) | set(secrets), key=len, reverse=True)
        for name in _URL_LOGGERS:
            if _mask not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_mask)


class Repeats:
    """Folds repeats: the same alert again within ``window`` seconds is not sent again.

    ``admit`` says whether to send; ``settle`` returns the alerts whose window has closed with
    repeats folded in it (and forgets every closed window, so memory stays bounded).

    Example:
        >>> now = [0.0]
        >>> repeats = Repeats(60, clock=lambda: now[0])
        >>> [repeats.admit(("loss", "nan")) for _ in range(3)]
        [True, False, False]
        >>> now[0] = 61.0
        >>> repeats.settle()
        [(('loss', 'nan'), 2)]
        >>> repeats.admit(("loss", "nan"))
        True
    """

    def __init__(self, window: float, clock: T.Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[T.Hashable, list[float]] = {}  # key -> [first sent at, repeats folded]

    def admit(self, key: T.Hashable) -> bool:
        """Return True to send the alert ``key``, False when it repeats one sent just before."""
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.window:
                entry[1] += 1
                return False
            self._seen[key] = [now, 0]
            return True

    def settle(self, everything: bool = False) -> list[tuple[T.Hashable, int]]:
        """Forget closed windows (all of them with ``everything``); return their folded counts."""
        now = self._clock()
        with self._lock:
            closed = [
                k for k, (sent, _) in self._seen.items() if everything or now - sent >= self.window
            ]
            counts = [(key, int(self._seen.pop(key)[1])) for key in closed]
        return [(key, count) for key, count in counts if count]


# %% a started AlertsService


class Dispatcher:
    """What a started AlertsService holds: its channels, folded repeats, causes warned.

    Opened by ``AlertsService.start()`` (:meth:`open`), closed by ``stop()``.

    Example:
        >>> dispatcher = Dispatcher.open(desktop=False, urls=[], app_name="demo", timeout=None)
        >>> dispatcher.send("Training", "done", "success", max_wait=1.0)
        False
        >>> dispatcher.names
        []
    """

    def __init__(self, channels: list[Channel], repeats: Repeats | None) -> None:
        self._channels = channels
        self._repeats = repeats
        self._secrets: list[str] = []
        self.refused: list[Delivery] = []  # URLs that cannot be used at all, and why
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        *,
        desktop: bool,
        urls: T.Sequence[str],
        app_name: str,
        timeout: int | None,
        dedup_seconds: float = 0,
    ) -> Dispatcher:
        """Choose the channels: the desktop (when ``desktop`` and one can show alerts), each URL.

        A URL apprise refuses, or a desktop that cannot be used while no URL is configured, is
        warned once; nothing raises.
        """
        dispatcher = cls([], Repeats(dedup_seconds) if dedup_seconds else None)
        if urls:
            mask_in_logs(urls)
            dispatcher._secrets = [secret for url in urls for secret in channel_secrets(url)]
        reason = _desktop.unavailable() if desktop else None
        if desktop and reason is None:
            dispatcher._channels.append(DesktopChannel(app_name, timeout))
        elif reason is not None and not urls:
            dispatcher.warn("desktop", reason)
        for url in urls:
            try:
                dispatcher._channels.append(AppriseChannel(url))
            except Exception as exc:  # apprise missing, or refusing the URL: say so, go on
                refused = Delivery(mask_channel(url), dispatcher.redact(str(exc)), lasting=True)
                dispatcher.refused.append(refused)
                dispatcher.warn(refused.channel, T.cast(str, refused.failure))
        return dispatcher

    @property
    def names(self) -> list[str]:
        """The channels' names, secrets masked."""
        return [channel.name for channel in self._channels]

    def send(self, title: str, message: str, level: str, max_wait: float) -> bool:
        """Send an alert to every channel (a repeat is folded); return whether one delivered it."""
        if self._repeats is not None:
            self._report(self._repeats.settle())
            if not self._repeats.admit((level, title, message)):
                return True  # sent already, within the window
        chosen = list(self._channels)
        deliveries = self._deliver(chosen, title, message, level, max_wait)
        delivered = False
        for channel, delivery in zip(chosen, deliveries, strict=True):
            if delivery.failure is None:
                delivered = True
                continue
            if delivery.lasting:
                with self._lock:
                    self._channels[:] = [c for c in self._channels if c is not channel]
            self.warn(delivery.channel, delivery.failure)
        return delivered

    def probe(self, title: str, message: str, level: str, max_wait: float) -> list[Delivery]:
        """Send to every channel, no folding; return what each (and each refused URL) did."""
        chosen = list(self._channels)
        return self._deliver(chosen, title, message, level, max_wait) + self.refused

    def warn(self, channel: str, reason: str) -> None:
        """Warn once per channel and cause."""
        with self._lock:
            if (channel, reason) in self._warned:
                return
            self._warned.add((channel, reason))
        logger.warning("Alerts cannot use {}: {}", channel, reason)

    def redact(self, text: str) -> str:
        """Mask the alert URLs' secrets in ``text``."""
        return redact(text, self._secrets)

    def _deliver(
        self, chosen: list[Channel], title: str, message: str, level: str, max_wait: float
    ) -> list[Delivery]:
        if not chosen:
            return []
        deliveries = deliver(chosen, title, message, level, max_wait)
        return [d._replace(failure=d.failure and self.redact(d.failure)) for d in deliveries]

    def close(self) -> None:
        """Report the repeats still folded; stop sending."""
        if self._repeats is not None:
            self._report(self._repeats.settle(everything=True))
        self._channels.clear()

    def _report(self, folded: list[tuple[T.Hashable, int]]) -> None:
        assert self._repeats is not None
        for key, count in folded:
            title = key[1] if isinstance(key, tuple) else key
            logger.info(
                "Alert {!r} was repeated {} more time(s) within {:g} s and sent once "
                "(alerts.dedup_seconds)",
                title,
                count,
                self._repeats.window,
            )
