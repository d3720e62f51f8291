"""``mlflow server`` as the stack runs it: proxied artifacts, gunicorn, stopped as a whole."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import ssl
import subprocess
import sys
import time
import typing as T
import urllib.request
from pathlib import Path

from regression_model_template.io.masking import redact
from regression_model_template.server import auth
from regression_model_template.server.artifacts import storage_secrets
from regression_model_template.server.processes import (
    check_free,
    die_with_parent,
    free_port,
    main_thread_on_linux,
    stop_group,
    tail,
)

if T.TYPE_CHECKING:
    from regression_model_template.server.tls import TlsPair

__all__ = ["GUNICORN", "is_loopback", "mlflow_server", "running", "server_url"]


#: Serve with gunicorn instead of MLflow's default uvicorn: with several uvicorn workers every
#: request on a reused connection waits ~40 ms more (uvicorn issue 3149: TCP_NODELAY is lost);
#: measured here, one ``log_metric`` call with 2 workers: 53 ms (uvicorn), 8.9 ms (gunicorn).
#: gunicorn's default 30 s request timeout would kill the upload of a large model: 10 minutes.
GUNICORN = ("--gunicorn-opts", "--timeout 600")


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts: Path | str,
    *,
    port: int | None = None,
    workers: int = 1,
    startup_timeout: float = 60.0,
    env: T.Mapping[str, str] | None = None,
    output: Path | None = None,
    options: T.Sequence[str] = (),
    host: str = "127.0.0.1",
    tls: TlsPair | None = None,
    auth_env: T.Mapping[str, str] | None = None,
) -> T.Iterator[str]:
    """Run ``mlflow server`` on ``host`` for the block; yield its URL once it answers.

    Artifacts are proxied (clients upload through the server) into ``artifacts``; the
    background job runner is off (it holds gigabytes and a core for nothing here). The server
    and every process it started are stopped on exit (SIGTERM to its process group, then
    SIGKILL); on Linux, when started from the main thread, it also gets SIGTERM if this
    process dies first.

    Args:
        backend_store_uri: the server's store (``sqlite:///...``, ``postgresql://...``).
        artifacts: where the server keeps artifacts: a folder (created), or an ``s3://`` URI
            (with ``output`` given: there is no folder for the log; the S3 settings come
            from the server's environment, see :mod:`.artifacts`).
        port: the port to listen on (default: a free one).
        workers: server processes; see the README on workers and latency.
        startup_timeout: seconds to wait for ``/health``.
        env: the server's environment (default: this process's, without MLflow's client
            settings).
        output: the file receiving the server's output (default: ``artifacts/../server-*.log``);
            the server runs in its folder.
        options: more ``mlflow server`` options (e.g. :data:`GUNICORN`).
        host: the address (or name) to listen on; MLflow answers requests for it only
            (``MLFLOW_SERVER_ALLOWED_HOSTS``; loopback keeps MLflow's defaults).
        tls: serve HTTPS only, with this pair (by gunicorn); the URL is ``https://``, and
            ``/health`` is checked trusting this certificate.
        auth_env: turn on MLflow's basic-auth app with this environment
            (:func:`.auth.auth_environment`); once the server answers, its admin must be let
            in (:func:`.auth.check_admin`).

    Raises:
        RuntimeError: the port is taken, or the server exited or did not answer ``/health``
            within ``startup_timeout`` seconds (the message ends with its output), or its
            admin is refused.
    """
    port = port or free_port(host)
    check_free(port, host)  # else another server's /health would answer for ours
    url = server_url(host, port, tls is not None)
    if str(artifacts).startswith("s3://"):
        if output is None:
            raise ValueError("mlflow_server: give output= (the log's file) with an s3:// artifacts")
        destination, home = str(artifacts), output.parent
    else:
        folder = Path(artifacts).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        destination, home = str(folder), folder.parent
    log = output or home / f"server-{time.time_ns()}.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--artifacts-destination", destination,
        "--workers", str(workers),
        *_with_tls(options, tls),
        *(["--app-name", "basic-auth"] if auth_env is not None else []),
    ]  # fmt: skip
    environ = dict(os.environ if env is None else env)
    if env is None:
        for name in _CLIENT_SETTINGS:
            environ.pop(name, None)
    environ.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    environ["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri  # not argv: `ps` shows a password
    if not is_loopback(host):
        # gunicorn refuses --allowed-hosts; MLflow's middleware reads the variable.
        environ["MLFLOW_SERVER_ALLOWED_HOSTS"] = f"{_bracketed(host)}:{port},{_bracketed(host)}"
    environ.update(auth_env or {})
    hidden = [*auth.secrets_of(auth_env or {}), *storage_secrets(environ)]
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command,
            cwd=home,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
            # PR_SET_PDEATHSIG follows the starting *thread*: only the main thread's lives as
            # long as the process (a server started from a helper thread would die with it).
            preexec_fn=die_with_parent if main_thread_on_linux() else None,
        )
        try:
            certificate = tls.certificate if tls else None
            try:
                _wait_for_health(process, url, log, startup_timeout, certificate)
            except RuntimeError as error:  # its output must not show a secret either
                raise RuntimeError(redact(str(error), hidden)) from None
            if auth_env is not None:
                auth.check_admin(url, auth_env, certificate)
            yield url
        finally:
            stop_group(process)


#: MLflow's client settings: a server started from a job's shell must not inherit them.
_CLIENT_SETTINGS = (
    "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
)  # fmt: skip


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("198.18.9.1")
        (True, True, False)
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_url(host: str, port: int, tls: bool = False) -> str:
    """The URL of a server on ``host`` and ``port`` (an IPv6 address in brackets).

    Example:
        >>> server_url("127.0.0.1", 5000), server_url("::1", 5000, tls=True)
        ('http://127.0.0.1:5000', 'https://[::1]:5000')
    """
    return f"{'https' if tls else 'http'}://{_bracketed(host)}:{port}"


def running(url: str, timeout: float = 5.0, certificate: Path | None = None) -> bool:
    """Whether the server at ``url`` answers ``/health`` (over HTTPS: trusting ``certificate``)."""
    context = ssl.create_default_context(cafile=certificate) if certificate else None
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),  # never a proxy
        urllib.request.HTTPSHandler(context=context),
    )
    try:
        with opener.open(f"{url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _with_tls(options: T.Sequence[str], tls: TlsPair | None) -> list[str]:
    """``options`` with gunicorn's TLS options added to its ``--gunicorn-opts`` (or a new one)."""
    options = list(options)
    if tls is None:
        return options
    files = f"--certfile {shlex.quote(str(tls.certificate))} --keyfile {shlex.quote(str(tls.key))}"
    if "--gunicorn-opts" in options:
        at = options.index("--gunicorn-opts") + 1
        options[at] = f"{options[at]} {files}"
        return options
    return [*options, "--gunicorn-opts", files]


def _wait_for_health(
    process: subprocess.Popen[bytes],
    url: str,
    log: Path,
    timeout: float,
    certificate: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:  # note: a taken port makes mlflow server exit with code 0
            raise RuntimeError(f"mlflow server exited ({code}) before answering; " + tail(log))
        if running(url, timeout=2, certificate=certificate) and process.poll() is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server gave no /health within {timeout:g} s; " + tail(log))
        time.sleep(0.2)
