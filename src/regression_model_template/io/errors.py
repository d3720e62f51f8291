"""The error every service raises, and how a dependency's exception becomes one.

Example:
    >>> with translated_errors("MlflowService", "tracking_uri", "cannot connect", ["pw"]):
    ...     raise ConnectionError("refused: http://u:pw@host")
    Traceback (most recent call last):
    ...
    regression_model_template.io.errors.ServiceError: MlflowService.tracking_uri: cannot connect: ConnectionError: refused: http://u:***@host
"""  # noqa: E501

from __future__ import annotations

import contextlib
import typing as T

from regression_model_template.io.masking import RedactedError, redact

__all__ = ["ServiceError", "translated_errors"]


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


@contextlib.contextmanager
def translated_errors(
    service: str, setting: str, what: str, secrets: T.Iterable[str] = ()
) -> T.Iterator[None]:
    """Turn any exception of the block (not a ServiceError) into a ServiceError without secrets.

    The message is ``what: <ExceptionType>: <message>`` with ``secrets`` masked.
    """
    try:
        yield
    except ServiceError:
        raise
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}"
        safe = redact(cause, secrets)
        origin: BaseException = exc if safe == cause else RedactedError(safe)
        raise ServiceError(service, setting, f"{what}: {safe}") from origin
