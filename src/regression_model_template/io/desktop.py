"""Desktop notifications through plyer's public facade.

plyer picks its backend once per process (xdg portal, dbus, ``notify-send``) and fails in
ways a job must not feel: a daemon that never answers blocks its caller ~25 s, no backend
raises ``NotImplementedError``, and on a machine with no display nor session bus
``notify-send`` fails while plyer returns normally (nothing shown). So:

- :func:`unavailable` says up front when no desktop can show anything (headless Linux);
- :func:`notify` calls ``plyer.notification.notify``; the alert channels
  (:mod:`regression_model_template.io.alert_channels`) run it in a daemon thread with a deadline.

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
import typing as T
import warnings

__all__ = ["DESKTOP_VARIABLES", "notify", "unavailable"]

#: A session exposes at least one of these when notifications can be shown on Linux.
DESKTOP_VARIABLES = ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY")


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


def notify(title: str, message: str, *, app_name: str, timeout: int | None) -> None:
    """Show a notification through ``plyer.notification.notify``; raise when it fails.

    It may block (a silent notification daemon: ~25 s): :mod:`.alert_channels` calls it in a daemon
    thread with a deadline. With no backend at all plyer raises ``NotImplementedError``.
    """
    import plyer

    kwargs: dict[str, T.Any] = {"title": title, "message": message, "app_name": app_name}
    if timeout is not None:
        kwargs["timeout"] = timeout
    plyer.notification.notify(**kwargs)
