"""Secret masking: credentials never reach a log line, an error message or the screen.

Secrets are the password of a URI (or a lone user name, which is usually a token), and the
values of query parameters named like credentials (``token``, ``key``, ``password``...).
Masking never raises, even for a URI that no parser accepts: an error message about a
malformed URI must still be safe to print.

Example:
    >>> mask_uri("https://alice:s3cret@mlflow.example.com/")
    'https://alice:***@mlflow.example.com/'
    >>> redact("cannot reach s3cret", ["s3cret"])
    'cannot reach ***'
"""

from __future__ import annotations

import re
import typing as T
import urllib.parse

__all__ = ["RedactedError", "mask_setting", "mask_uri", "redact", "uri_secrets"]

_SECRET_QUERY_KEYS = re.compile(r"pass|secret|token|key|auth|credential|signature", re.IGNORECASE)
# Setting names whose whole value is a secret (``config show`` prints ``***`` for them).
_SECRET_SETTINGS = ("password", "secret", "token", "webhook", "api_key")


class RedactedError(Exception):
    """Stands in for a dependency's exception whose message contained a secret.

    Chained as ``__cause__`` instead of the original, so a printed traceback stays safe.

    Example:
        >>> str(RedactedError("ConnectionError: http://user:***@host"))
        'ConnectionError: http://user:***@host'
    """


def uri_secrets(uri: str | None) -> list[str]:
    """Return the secrets inside ``uri``: its password (or lone user name) and credentials.

    The user-information is read the way ``urllib.parse.urlsplit`` reads it, but by hand, so
    that a URI ``urlsplit`` rejects (``http://u:p@[::1``) is masked too.

    Example:
        >>> uri_secrets("postgresql://bob:pa55@db:5432/mlflow?sslpassword=x")
        ['pa55', 'x']
        >>> uri_secrets("http://tok3n@[::1")
        ['tok3n']
    """
    if not uri:
        return []
    rest = uri.partition("//")[2] if "//" in uri else ""
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]
    secrets: list[str] = []
    if "@" in netloc:
        user, colon, password = netloc.rpartition("@")[0].partition(":")
        secret = password if colon else user
        if secret:
            secrets.append(secret)
    query = uri.partition("?")[2].partition("#")[0]
    for key, value in urllib.parse.parse_qsl(query):
        if value and _SECRET_QUERY_KEYS.search(key):
            secrets.append(value)
    return secrets


def redact(text: str, secrets: T.Iterable[str]) -> str:
    """Replace each secret in ``text`` (as written, percent-encoded or decoded) by ``***``.

    Example:
        >>> redact("user p@ss, url p%40ss", ["p%40ss"])
        'user ***, url ***'
    """
    forms: set[str] = set()
    for secret in secrets:
        if secret:
            forms |= {secret, urllib.parse.quote(secret, safe=""), urllib.parse.unquote(secret)}
    for form in sorted(forms - {""}, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def mask_uri(uri: str) -> str:
    """Return ``uri`` with its password, token or credential query values replaced by ``***``.

    Example:
        >>> mask_uri("https://tok3n@host/path?sig=1&token=abc")
        'https://***@host/path?sig=1&token=***'
        >>> mask_uri("sqlite:///mlruns/mlflow.db")
        'sqlite:///mlruns/mlflow.db'
    """
    return redact(uri, uri_secrets(uri))


def mask_setting(path: str, value: T.Any) -> T.Any:
    """Return a setting's value fit to show: secret settings as ``***``, URIs masked.

    Example:
        >>> mask_setting("mlflow.tracking_uri", "http://u:pw@host")
        'http://u:***@host'
        >>> mask_setting("alerts.webhook", "anything")
        '***'
    """
    if isinstance(value, str):
        if any(word in path.lower() for word in _SECRET_SETTINGS):
            return "***"
        return mask_uri(value) if "://" in value else value
    if isinstance(value, list | tuple):
        return [mask_setting(path, item) for item in value]
    return value
