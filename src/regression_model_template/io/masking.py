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

import pydantic

__all__ = [
    "CLIENT_SECRETS",
    "RedactedError",
    "channel_secrets",
    "client_secrets",
    "mask_channel",
    "mask_setting",
    "mask_uri",
    "redact",
    "secret_forms",
    "uri_secrets",
]

#: MLflow's client variables whose values are secrets: it sends them to the tracking server.
CLIENT_SECRETS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
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
    _, userinfo, _, rest = _channel_parts(uri)
    user, _, password = userinfo.partition(":")
    secret = password or user  # a lone user name (or one with an empty password): a token
    secrets = [secret] if secret else []
    query = rest.partition("?")[2].partition("#")[0]
    for key, value in urllib.parse.parse_qsl(query):
        if value and _SECRET_QUERY_KEYS.search(key):
            secrets.append(value)
    return secrets


def client_secrets(environ: T.Mapping[str, str]) -> list[str]:
    """Return the values of MLflow's credential variables (:data:`CLIENT_SECRETS`) in ``environ``.

    Example:
        >>> client_secrets({"MLFLOW_TRACKING_PASSWORD": "pa55", "MLFLOW_TRACKING_USERNAME": "bob"})
        ['pa55']
    """
    return [environ[name] for name in CLIENT_SECRETS if environ.get(name)]


def redact(text: str, secrets: T.Iterable[str]) -> str:
    """Replace each secret in ``text`` (as written, percent-encoded or decoded) by ``***``.

    Example:
        >>> redact("user p@ss, url p%40ss", ["p%40ss"])
        'user ***, url ***'
    """
    for form in secret_forms(secrets):
        text = text.replace(form, "***")
    return text


def secret_forms(secrets: T.Iterable[str]) -> list[str]:
    """The texts :func:`redact` replaces: each secret as written, percent-encoded and decoded.

    Longest first, so that a secret inside another is not replaced first. Computed once, they
    mask many lines fast (a run's log).

    Example:
        >>> secret_forms(["p%40ss"])
        ['p%2540ss', 'p%40ss', 'p@ss']
    """
    forms: set[str] = set()
    for secret in secrets:
        if secret:
            forms |= {secret, urllib.parse.quote(secret, safe=""), urllib.parse.unquote(secret)}
    return sorted(forms - {""}, key=lambda form: (-len(form), form))


def mask_uri(uri: str) -> str:
    """Return ``uri`` with its password, token or credential query values replaced by ``***``.

    Example:
        >>> mask_uri("https://tok3n@host/path?sig=1&token=abc")
        'https://***@host/path?sig=1&token=***'
        >>> mask_uri("sqlite:///mlruns/mlflow.db")
        'sqlite:///mlruns/mlflow.db'
        >>> mask_uri("postgresql://postgres@127.0.0.1:5432/mlflow")
        'postgresql://***@127.0.0.1:5432/mlflow'
    """
    scheme, userinfo, host, rest = _channel_parts(uri)
    if not userinfo:
        return redact(uri, uri_secrets(uri))
    # The user information is masked where it stands: a lone user name may also be a part of
    # the scheme or the host ("postgres" in "postgresql://"), which must stay readable.
    user, _, password = userinfo.partition(":")
    masked = f"{user}:***" if password else "***"  # a lone user name is a token
    return f"{scheme}://{masked}@{host}" + redact(rest, uri_secrets(uri))


_HOST_NAME = re.compile(
    r"(localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?", re.ASCII
)


def _host_is_a_name(host: str) -> bool:
    # A real host (a domain, an IP address, localhost, with a port) rather than a token in host
    # position, as in slack://TokenA/TokenB/TokenC or tgram://123456789:AAH.../chat_id.
    return _HOST_NAME.fullmatch(host) is not None


def _channel_parts(url: str) -> tuple[str, str, str, str]:
    """Return (scheme, user-information, host[:port], the rest) of a URL, without ever raising."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", "", url
    netloc = re.match(r"[^/?#]*", rest)
    host_part = netloc.group(0) if netloc else ""
    userinfo, _, host = host_part.rpartition("@")
    return scheme, userinfo, host, rest[len(host_part) :]


def channel_secrets(url: str) -> list[str]:
    """Return the parts of an alert (apprise) URL that may be secrets: nearly all of them.

    The whole URL, its user and password, a host that is not a name (a token), every path
    segment and every query value; pieces shorter than 3 characters are left out.

    Example:
        >>> channel_secrets("slack://TokenA/TokenB/TokenC")
        ['slack://TokenA/TokenB/TokenC', 'TokenA', 'TokenB', 'TokenC']
        >>> channel_secrets("json://127.0.0.1:8080/hook/t0ken?key=abc")
        ['json://127.0.0.1:8080/hook/t0ken?key=abc', 'hook', 't0ken', 'abc']
    """
    _, userinfo, host, rest = _channel_parts(url)
    pieces = [url, *userinfo.split(":", 1)]
    if not _host_is_a_name(host):
        pieces.append(host)
    path, _, query = rest.partition("?")
    pieces += path.split("/")
    pieces += [value for _, value in urllib.parse.parse_qsl(query.partition("#")[0])]
    return [piece for piece in pieces if len(piece) >= 3]


def mask_channel(url: str) -> str:
    """Show an alert URL without its secrets: the scheme, and the host when it is a name.

    Example:
        >>> mask_channel("json://user:pw@127.0.0.1:8080/hook/t0ken")
        'json://127.0.0.1:8080/***'
        >>> mask_channel("slack://TokenA/TokenB/TokenC")
        'slack://***'
        >>> mask_channel("tgram://123456789:AAHdqTcv/-100123")
        'tgram://***'
    """
    scheme, _, host, rest = _channel_parts(url)
    if not scheme:
        return "***"
    if not _host_is_a_name(host):
        return f"{scheme}://***"
    return f"{scheme}://{host}" + ("/***" if rest.strip("/") else "")


def mask_setting(path: str, value: T.Any) -> T.Any:
    """Return a setting's value fit to show: secret settings as ``***``, URIs masked.

    Example:
        >>> mask_setting("mlflow.tracking_uri", "http://u:pw@host")
        'http://u:***@host'
        >>> mask_setting("alerts.webhook", "anything")
        '***'
    """
    if isinstance(value, pydantic.SecretStr):  # alert URLs
        return mask_channel(value.get_secret_value())
    if isinstance(value, str):
        if any(word in path.lower() for word in _SECRET_SETTINGS):
            return "***"
        return mask_uri(value) if "://" in value else value
    if isinstance(value, list | tuple):
        return [mask_setting(path, item) for item in value]
    return value
