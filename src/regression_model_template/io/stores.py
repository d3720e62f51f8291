"""Tracking and registry stores: their URIs, local folders, reachability and MLflow's globals.

MlflowService checks every URI here before MLflow sees it: a malformed URI (an unclosed IPv6
bracket, a port that is not a number) is a :class:`.errors.ServiceError` naming the setting,
never a bare ``ValueError`` from deep inside a dependency, nor a message carrying credentials.

Example:
    >>> check_uri("tracking_uri", "http://[::1")
    Traceback (most recent call last):
    ...
    regression_model_template.io.errors.ServiceError: MlflowService.tracking_uri: malformed URI 'http://[::1': Invalid IPv6 URL
    >>> sqlite_path("sqlite:///mlruns/mlflow.db")
    PosixPath('mlruns/mlflow.db')
"""  # noqa: E501

from __future__ import annotations

import base64
import contextlib
import fcntl
import math
import os
import re
import ssl
import time
import typing as T
import urllib.parse
from pathlib import Path

from loguru import logger

from regression_model_template.io.errors import ServiceError
from regression_model_template.io.masking import RedactedError, mask_uri, redact, uri_secrets

if T.TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = [
    "MLFLOW_GLOBALS",
    "check_uri",
    "ensure_experiment",
    "ensure_folders",
    "environ_restored",
    "is_postgresql",
    "is_server",
    "mlflow_environ",
    "not_blank",
    "probe_server",
    "quiet_run_links",
    "run_link",
    "schema_lock",
    "sqlite_path",
    "store_identity",
]

SERVICE = "MlflowService"

# mlflow.set_tracking_uri / set_registry_uri / set_experiment write these into os.environ.
MLFLOW_GLOBALS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")
# MLflow prints "View run ... at: <tracking URI>" at each end_run on a server, credentials
# included (and fetches the run again to do so): silenced while the service runs.
QUIET_LINKS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def not_blank(uri: T.Any) -> T.Any:
    """Reject an empty or blank URI setting (pydantic validator)."""
    if isinstance(uri, str) and not uri.strip():
        raise ValueError("empty URI")
    return uri


def check_uri(setting: str, uri: str) -> urllib.parse.SplitResult:
    """Parse a store URI; raise ServiceError naming ``setting`` when it is malformed.

    Example:
        >>> check_uri("registry_uri", "https://u:pw@host:80/").port
        80
    """
    try:
        parts = urllib.parse.urlsplit(uri)
        _ = parts.port, parts.hostname  # each raises ValueError when malformed
    except ValueError as exc:
        cause = redact(str(exc), uri_secrets(uri))
        raise ServiceError(SERVICE, setting, f"malformed URI {mask_uri(uri)!r}: {cause}") from None
    return parts


def sqlite_path(uri: str) -> Path | None:
    """Return the database file of a ``sqlite:///`` URI (relative to the working directory)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


# The port a scheme uses when its URI names none: written out, so that both spellings are one.
_DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
# Query parameters that say where a database is (PostgreSQL's socket folder); the rest are
# options or credentials.
_WHERE_PARAMETERS = ("host", "port")


def store_identity(uri: str) -> str:
    """What the store ``uri`` names, the same however the URI is written, without credentials.

    - SQLite: ``sqlite:///`` and the database file's absolute path, symbolic links resolved
      (a relative path is relative to the working directory, as MLflow reads it);
    - a tracking server: scheme, host (lower case), port (the scheme's default written out)
      and path (no trailing ``/``); no user, password, query or fragment;
    - a database (``postgresql+psycopg2://``, ``mysql://``...): the dialect without its driver,
      host, port and database, plus a ``host``/``port`` query parameter (a socket folder);
      no user, password or other query parameter;
    - a file store (``file:``, a bare path): its folder's absolute ``file://`` URI;
    - anything else (``databricks``): the URI without user, password, query or fragment.

    Example:
        >>> store_identity("sqlite:///mlruns/mlflow.db") == (
        ...     "sqlite:///" + str(Path("mlruns/mlflow.db").resolve())
        ... )
        True
        >>> store_identity("https://bob:pa55@MLflow.example.com/team/")
        'https://mlflow.example.com:443/team'
        >>> store_identity("postgresql+psycopg2://bob:pa55@db:5432/mlflow?sslpassword=x")
        'postgresql://db:5432/mlflow'
    """
    try:
        identity = _identity(uri)
    except ValueError:  # malformed (check_uri refuses it before any spool is written)
        identity = uri
    return redact(identity, uri_secrets(uri))  # whatever masking calls a secret never stays


def _identity(uri: str) -> str:
    path = sqlite_path(uri)
    if path is not None:
        return f"sqlite:///{path.resolve()}"
    parts = urllib.parse.urlsplit(uri)
    port = parts.port
    scheme = parts.scheme.lower()
    if scheme == "" and uri.startswith("databricks"):  # MLflow's names of Databricks stores
        return uri
    if scheme in ("", "file"):
        return Path(parts.path or ".").resolve().as_uri()
    if scheme == "sqlite":  # in memory (``sqlite://``, ``:memory:``): the process's own
        return "sqlite://"
    dialect = scheme.partition("+")[0]
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if host and (port := port or _DEFAULT_PORTS.get(dialect)) is not None:
        netloc += f":{port}"
    query = ""
    if scheme not in ("http", "https"):
        where = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k in _WHERE_PARAMETERS]
        query = urllib.parse.urlencode(sorted(where), safe="/")
    return f"{dialect}://{netloc}{parts.path.rstrip('/')}" + (f"?{query}" if query else "")


def ensure_folders(uris: T.Mapping[str, str]) -> None:
    """Create the folder of each SQLite database among ``{setting: uri}``."""
    for setting, uri in uris.items():
        path = sqlite_path(uri)
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(
                SERVICE, setting, f"cannot create the folder of {mask_uri(uri)!r}: {exc}"
            ) from exc


#: MLflow's client variables that change how it reaches a tracking server over TLS.
SERVER_CERT = "MLFLOW_TRACKING_SERVER_CERT_PATH"
INSECURE_TLS = "MLFLOW_TRACKING_INSECURE_TLS"
CLIENT_CERT = "MLFLOW_TRACKING_CLIENT_CERT_PATH"
#: MLflow's client variables holding the credentials it sends to a tracking server.
USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def probe_server(uri: str, timeout: float) -> None:
    """Fail within ``timeout`` seconds when an HTTP tracking server cannot be used.

    MLflow's own retries would take minutes. The probe asks the way MLflow's client will: the
    same certificate checks (``MLFLOW_TRACKING_SERVER_CERT_PATH``, ``MLFLOW_TRACKING_INSECURE_TLS``,
    ``MLFLOW_TRACKING_CLIENT_CERT_PATH``) and the same credentials (the URI's user information,
    else ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``).
    MLflow reads those variables itself at each request, so the probe lets MLflow's own function
    read them (``get_default_host_creds``): both see the same values, and no copy can differ.
    Any HTTP answer (even 404) will do, except 401: the server refused the credentials.

    Raises:
        ServiceError: naming ``tracking_uri`` or the variable at fault, and the cause
            (credentials masked): no answer, a certificate that is not trusted, credentials
            refused, or MLflow's variables contradicting each other.
    """
    parts = check_uri("tracking_uri", uri)
    if parts.scheme not in ("http", "https"):
        return
    import requests

    creds = _host_creds(uri)
    secrets = uri_secrets(uri) + [s for s in (creds.password, creds.token) if s]
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))
    headers = {}
    if creds.username and creds.password:  # what MLflow's http_request sends, in this order
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif creds.token:
        headers["Authorization"] = f"Bearer {creds.token}"
    # The URI's user information wins over the variables, as requests does for MLflow.
    auth = (parts.username, parts.password or "") if parts.username else None
    try:
        answer = requests.get(
            url,
            auth=auth,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            verify=creds.verify,
            cert=creds.client_cert_path,
        )
    except requests.exceptions.SSLError as exc:
        raise _tls_error(uri, exc, creds.server_cert_path, secrets) from RedactedError(
            redact(str(exc), secrets)
        )
    except requests.RequestException as exc:
        cause = redact(f"{type(exc).__name__}: {exc}", secrets)
        raise ServiceError(
            SERVICE,
            "tracking_uri",
            f"no answer from the tracking server {mask_uri(uri)} within {timeout:g} s "
            f"(mlflow.connect_timeout): {cause}",
        ) from RedactedError(cause)
    except OSError as exc:  # a certificate file that cannot be read (requests checks first)
        cause = redact(f"{type(exc).__name__}: {exc}", secrets)
        raise ServiceError(
            SERVICE,
            "tracking_uri",
            f"cannot use the certificate files of {SERVER_CERT} or {CLIENT_CERT}: {cause}",
        ) from RedactedError(cause)
    if answer.status_code == 401:
        given = "the URI's user information" if auth else _credentials_given(creds)
        raise ServiceError(
            SERVICE,
            "tracking_uri",
            f"the tracking server {mask_uri(uri)} refused the credentials (HTTP 401): set "
            f"{USERNAME} and {PASSWORD} to a user of the server (sent: {given})",
        )


def _credentials_given(creds: T.Any) -> str:
    """Which credentials were sent, never their values."""
    if creds.username and creds.password:
        return f"the user {creds.username!r} and a password"
    if creds.token:
        return "the token of MLFLOW_TRACKING_TOKEN"
    return "none" if not creds.username else f"the user {creds.username!r} without a password"


def _tls_error(uri: str, exc: Exception, trusted: str | None, secrets: list[str]) -> ServiceError:
    """A failed TLS handshake, saying whether the server's certificate was not trusted."""
    found = _ssl_cause(exc)
    now = f"it is {trusted}" if trusted else "it is not set"
    if isinstance(found, ssl.SSLCertVerificationError):
        what = (
            f"its certificate is not trusted ({found.verify_message}): set {SERVER_CERT} to "
            f"the server's certificate, or the certificate of the authority that signed it ({now})"
        )
    else:
        cause = redact(str(found or exc), secrets)
        what = f"the TLS handshake failed ({cause}); {SERVER_CERT} {now}"
    return ServiceError(
        SERVICE, "tracking_uri", f"cannot connect to the tracking server {mask_uri(uri)}: {what}"
    )


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error inside what requests raised (requests wraps urllib3, which wraps ssl)."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        if isinstance(error, ssl.SSLError):
            return error
        seen.add(id(error))
        pending += [error.__cause__, error.__context__, getattr(error, "reason", None)]
        pending += list(error.args)
    return None


def _host_creds(uri: str) -> T.Any:
    """MLflow's own reading of its client variables for ``uri`` (a ServiceError when invalid)."""
    try:
        from mlflow.utils.credentials import get_default_host_creds

        return get_default_host_creds(uri)  # type: ignore[no-untyped-call]
    except Exception as exc:  # both TLS variables set, a flag that is not a boolean
        cause = redact(f"{type(exc).__name__}: {exc}", uri_secrets(uri))
        raise ServiceError(
            SERVICE,
            "tracking_uri",
            f"MLflow's TLS variables cannot be used ({SERVER_CERT}, {INSECURE_TLS}, "
            f"{CLIENT_CERT}): {cause}",
        ) from RedactedError(cause)


def is_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server (``http://``, ``https://``)."""
    return urllib.parse.urlsplit(uri).scheme in ("http", "https")


def is_postgresql(uri: str) -> bool:
    """Whether ``uri`` is a PostgreSQL database (``postgresql://``, ``postgresql+psycopg2://``)."""
    return urllib.parse.urlsplit(uri).scheme.startswith("postgresql")


# Any fixed number: PostgreSQL advisory locks are per database, and only ours take this one.
SCHEMA_LOCK_KEY = 0x726D745F736368  # "rmt_sch"
#: Seconds a start waits for another process to create MLflow's tables (~3-4 s on PostgreSQL).
SCHEMA_WAIT = 120.0


@contextlib.contextmanager
def schema_lock(setting: str, uri: str, timeout: float) -> T.Iterator[None]:
    """Hold, for the block, a lock every process opening the database ``uri`` takes first.

    MLflow creates its tables when it first opens an empty database; two processes doing it
    at the same moment crash (PostgreSQL: ``UniqueViolation`` on ``pg_type``). Inside this
    lock one creates them and the others find them. PostgreSQL: an advisory lock (good across
    machines), also a probe bounded by ``timeout`` (MLflow's own retries take many minutes);
    SQLite: a file lock beside the database (``<database>.lock``). Other stores: no lock.
    Waiting for the lock says so once, and gives up after ``SCHEMA_WAIT`` seconds (120).

    Raises:
        ServiceError: naming ``setting`` (credentials masked): the PostgreSQL database cannot
            be reached within ``timeout`` seconds, the lock file cannot be written, or another
            process held the lock too long.

    Example:
        >>> import tempfile
        >>> uri = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
        >>> with schema_lock("tracking_uri", uri, timeout=10):
        ...     pass  # open the store here
    """
    if is_postgresql(uri):
        with _advisory_lock(setting, uri, timeout):
            yield
    elif (path := sqlite_path(uri)) is not None:
        try:
            handle = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 -- closed below
        except OSError as exc:
            raise ServiceError(
                SERVICE, setting, f"cannot write the lock file beside {path}: {exc}"
            ) from exc
        with handle:  # closing (or dying) releases the lock
            _acquire(lambda: _try_flock(handle), setting, uri)
            yield
    else:
        yield


def _try_flock(handle: T.IO[str]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _acquire(attempt: T.Callable[[], bool], setting: str, uri: str) -> None:
    """Call ``attempt`` until it takes the lock; say once that we wait; give up in time."""
    deadline = time.monotonic() + SCHEMA_WAIT
    said = False
    while not attempt():
        if time.monotonic() >= deadline:
            raise ServiceError(
                SERVICE,
                setting,
                f"another process has held the schema lock of {mask_uri(uri)} for more than "
                f"{SCHEMA_WAIT:g} s (it creates MLflow's tables, or it is stopped)",
            )
        if not said:
            said = True
            logger.info("Waiting for another job creating MLflow's tables in {}", mask_uri(uri))
        time.sleep(0.1)


@contextlib.contextmanager
def _advisory_lock(setting: str, uri: str, timeout: float) -> T.Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(
        uri, poolclass=NullPool, connect_args={"connect_timeout": max(1, math.ceil(timeout))}
    )
    try:
        connection = engine.connect()
    except Exception as exc:
        cause = redact(f"{type(exc).__name__}: {exc}", uri_secrets(uri))
        cause = cause.split("(Background on this error")[0].strip()  # SQLAlchemy's link
        raise ServiceError(
            SERVICE,
            setting,
            f"cannot connect to the database {mask_uri(uri)} within {timeout:g} s "
            f"(mlflow.connect_timeout): {cause}",
        ) from RedactedError(cause)
    try:
        query = sqlalchemy.text(f"SELECT pg_try_advisory_lock({SCHEMA_LOCK_KEY})")
        _acquire(lambda: bool(connection.execute(query).scalar()), setting, uri)
        yield
    finally:
        connection.close()  # closing the session releases the lock
        engine.dispose()


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """Return the run's page in the MLflow UI of a tracking server (None for other stores).

    Credentials are left out: the browser asks for them.

    Example:
        >>> run_link("https://bob:pw@mlflow.example.com/", "3", "ab12")
        'https://mlflow.example.com/#/experiments/3/runs/ab12'
        >>> run_link("sqlite:///mlruns/mlflow.db", "3", "ab12") is None
        True
    """
    parts = check_uri("tracking_uri", uri)
    if parts.scheme not in ("http", "https"):
        return None
    host = parts.netloc.rpartition("@")[2]
    base = urllib.parse.urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def ensure_experiment(client: MlflowClient, uri: str, name: str) -> None:
    """Create experiment ``name`` unless it exists: safe when other jobs create it at once.

    ``mlflow.set_experiment`` would create it too, but when another process creates it
    between its lookup and its creation, it returns without making it the active experiment:
    the job's runs then land in "Default" (measured: 2 of 8 jobs starting together on a
    server). Created here first, ``set_experiment`` only finds it. In a SQLite store its
    artifacts go beside the database, not in ``./mlruns`` of whatever the working directory is.
    """
    if client.get_experiment_by_name(name) is not None:
        return
    path = sqlite_path(uri)
    location = None
    if path is not None:
        folder = path.parent.resolve() / "artifacts" / re.sub(r"[^\w.-]", "_", name)
        location = folder.as_uri()
    try:
        client.create_experiment(name, artifact_location=location)
    except Exception as exc:
        # another job created it meanwhile: that is all we wanted
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise


@contextlib.contextmanager
def environ_restored(names: T.Iterable[str]) -> T.Iterator[None]:
    """Give each of ``names`` back the value it had in ``os.environ`` (or none) after the block.

    Example:
        >>> with environ_restored(["RMT_EXAMPLE"]):
        ...     os.environ["RMT_EXAMPLE"] = "1"
        >>> "RMT_EXAMPLE" in os.environ
        False
    """
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quiet_run_links() -> T.Iterator[None]:
    """Stop MLflow printing "View run ... at: <tracking URI>" (credentials included)."""
    with environ_restored([QUIET_LINKS]):
        os.environ[QUIET_LINKS] = "true"
        yield


@contextlib.contextmanager
def mlflow_environ() -> T.Iterator[None]:
    """Quiet MLflow's credential-bearing run links; restore what MLflow wrote into the environment.

    ``mlflow.set_tracking_uri`` and friends write :data:`MLFLOW_GLOBALS` into ``os.environ``,
    where child processes would inherit them.
    """
    with environ_restored(MLFLOW_GLOBALS), quiet_run_links():
        yield
