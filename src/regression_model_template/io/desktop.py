"""Desktop notifications through plyer's public facade, bounded in time, never raising.

plyer picks its backend once per process (xdg portal, dbus, ``notify-send``) and fails in
ways a job must not feel: a daemon that never answers blocks its caller ~25 s, no backend
raises ``NotImplementedError``, and on a machine with no display nor session bus
``notify-send`` fails while plyer returns normally (nothing shown). So:

- :func:`unavailable` says up front when no desktop can show anything (headless Linux);
- :func:`send` calls ``plyer.notification.notify`` in a daemon thread, waits at most
  ``max_wait`` seconds, and returns why the alert was not shown instead of raising.

Going through ``plyer.notification.notify`` (not plyer's platform modules) keeps a user's
``mock.patch("plyer.notification.notify")`` effective and survives plyer's internals changing.
Its price: plyer does not report ``notify-send``'s exit code, so a display without a
notification daemon counts as shown.

Example:
    >>> unavailable({})  # on Linux, with no display nor session bus
    'no desktop session (none of DBUS_SESSION_BUS_ADDRESS, DISPLAY, WAYLAND_DISPLAY is set)'
"""

from __future__ import annotations

import os
import sys
import threading
import typing as T
import warnings

__all__ = ["DESKTOP_VARIABLES", "Failure", "send", "unavailable"]

#: A session exposes at least one of these when notifications can be shown on Linux.
DESKTOP_VARIABLES = ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY")


class Failure(T.NamedTuple):
    """Why an alert was not shown; ``lasting`` when retrying the desktop is pointless.

    Example:
        >>> Failure("no answer", lasting=True).lasting
        True
    """

    reason: str
    lasting: bool


def unavailable(environ: T.Mapping[str, str] | None = None) -> str | None:
    """Return why no desktop notification can be shown here, or None when one may be.

    On Linux, a session without a display and without a session bus (CI, a container, ssh)
    cannot show one. Otherwise plyer chooses its backend now, with its warnings silenced.
    """
    environ = os.environ if environ is None else environ
    if sys.platform.startswith("linux") and not any(environ.get(v) for v in DESKTOP_VARIABLES):
        return "no desktop session (none of " + ", ".join(DESKTOP_VARIABLES) + " is set)"
    try:
        import plyer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # plyer warns for each backend it cannot use
            plyer.notification.notify  # noqa: B018 -- the first access chooses the backend
    except Exception as exc:
        return f"no notification backend ({type(exc).__name__}: {exc})"
    return None


def send(
    title: str, message: str, *, app_name: str, timeout: int | None, max_wait: float
) -> Failure | None:
    """Show a notification through ``plyer.notification.notify``; return why not, or None.

    Never raises and returns within ``max_wait`` seconds: a backend still busy then is left
    to finish in its daemon thread, which does not hold the interpreter's exit.
    """
    kwargs: dict[str, T.Any] = {"title": title, "message": message, "app_name": app_name}
    if timeout is not None:
        kwargs["timeout"] = timeout
    errors: list[BaseException] = []

    def call() -> None:
        try:
            import plyer

            plyer.notification.notify(**kwargs)
        except BaseException as exc:  # a backend may raise anything; never let it escape
            errors.append(exc)

    worker = threading.Thread(target=call, name="alerts-desktop", daemon=True)
    worker.start()
    worker.join(max_wait)
    if worker.is_alive():
        reason = f"no answer from the desktop within {max_wait:g} s (alerts.max_wait)"
        return Failure(reason, lasting=True)
    if not errors:
        return None
    error = errors[0]
    if isinstance(error, NotImplementedError):
        return Failure("no notification backend (install dbus-python or notify-send)", True)
    return Failure(f"the desktop backend failed: {type(error).__name__}: {error}", False)
