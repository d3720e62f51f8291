"""``mlflow server`` as the stack runs it: proxied artifacts, gunicorn, stopped as a whole."""

from __future__ import annotations

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

__all__ = ["GUNICORN", "MlflowServer", "is_loopback", "running", "server_url"]


#: Serve with gunicorn instead of MLflow's default uvicorn: with several uvicorn workers every
#: request on a reused connection waits ~40 ms more (uvicorn issue 3149: TCP_NODELAY is lost);
#: measured here, one ``log_metric`` call with 2 workers: 53 ms (uvicorn), 8.9 ms (gunicorn).
#: gunicorn's default 30 s request timeout would kill the upload of a large model: 10 minutes.
GUNICORN = ("--gunicorn-opts", "--timeout 600")


class MlflowServer:
    """``mlflow server`` on ``host``, started and stopped as a whole.

    Use it with ``with``, or :meth:`start` and :meth:`stop`, again and again on the same port.
    Artifacts are proxied (clients upload through the server) into ``artifacts``; the
    background job runner is off (it holds gigabytes and a core for nothing here). The server
    and every process it started are stopped together (SIGTERM to its process group, then
    SIGKILL); on Linux, started from the main thread, it also gets SIGTERM if this process
    dies first.

    Args:
        backend_store_uri: the server's store (``sqlite:///...``, ``postgresql://...``).
        artifacts: where the server keeps artifacts: a folder, or an object store's URI
            (``s3://bucket/prefix``, reached with the server's ``AWS_*`` variables).
        port: the port to listen on (default: a free one, kept for every start).
        workers: server processes; see the README on workers and latency.
        startup_timeout: seconds to wait for ``/health``.
        env: the server's environment (default: this process's, without MLflow's client
            settings).
        output: the file receiving the server's output (default: ``server-*.log`` beside the
            artifacts' folder, or in the current folder).
        options: more ``mlflow server`` options (e.g. :data:`GUNICORN`).
        host: the address (or name) to listen on; MLflow answers requests for it only
            (``MLFLOW_SERVER_ALLOWED_HOSTS``; loopback keeps MLflow's defaults).
        tls: serve HTTPS only, with this pair (by gunicorn); the URL is ``https://``, and
            ``/health`` is checked trusting this certificate.
        auth_env: turn on MLflow's basic-auth app with this environment
            (:func:`.auth.auth_environment`); once the server answers, its admin must be let
            in (:func:`.auth.check_admin`).
        public: the ``(host, port)`` clients reach it by, when a balancer stands in front
            (default: ``host`` and ``port``); MLflow answers requests for that address.

    Example (``with`` yields the URL once ``/health`` answers)::

        with MlflowServer("sqlite:///m.db", Path("artifacts")) as url:
            ...

    Raises:
        RuntimeError: at start: the port is taken, or the server exited or did not answer
            ``/health`` within ``startup_timeout`` seconds (the message ends with its output),
            or its admin is refused.
    """

    def __init__(
        self,
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
        public: tuple[str, int] | None = None,
    ) -> None:
        self.port = port or free_port(host)
        self.host = host
        self.url = server_url(host, self.port, tls is not None)
        # a folder is made at start; an object store's URI is handed over as it is
        self.folder = None if "://" in str(artifacts) else Path(artifacts).absolute()
        home = self.folder.parent if self.folder else Path.cwd()
        self.log = (output or home / f"server-{time.time_ns()}.log").absolute()
        self.startup_timeout = startup_timeout
        self.certificate = tls.certificate if tls else None
        self._auth_env = auth_env
        self._command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", host,
            "--port", str(self.port),
            "--artifacts-destination", str(self.folder or artifacts),
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
        named, at = public or (host, self.port)
        if not is_loopback(named):
            # gunicorn refuses --allowed-hosts; MLflow's middleware reads the variable. Behind
            # a balancer the server's own address stays allowed: the stack checks it directly.
            served = {(named, at), (host, self.port)}
            environ["MLFLOW_SERVER_ALLOWED_HOSTS"] = ",".join(
                f"{_bracketed(name)}:{port},{_bracketed(name)}" for name, port in sorted(served)
            )
        environ.update(auth_env or {})
        self._environ = environ
        self._hidden = [*auth.secrets_of(auth_env or {}), *storage_secrets(environ)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, tied: bool | None = None) -> str:
        """Start the server; return its URL once it answers (and lets its admin in).

        ``tied``: the server gets SIGTERM when the thread starting it ends (PR_SET_PDEATHSIG
        follows the starting *thread*; default: only from the main thread, which lives as long
        as the process). A thread that outlives its servers passes True.
        """
        if self.process is not None:
            raise RuntimeError(f"the mlflow server on port {self.port} is already running")
        check_free(self.port, self.host)  # else another server's /health would answer for ours
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        tie = main_thread_on_linux() if tied is None else tied and sys.platform == "linux"
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                self._command,
                cwd=self.log.parent,
                env=self._environ,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
                preexec_fn=die_with_parent if tie else None,
            )
        try:
            try:
                _wait_for_health(
                    self.process, self.url, self.log, self.startup_timeout, self.certificate
                )
            except RuntimeError as error:  # its output must not show a secret either
                raise RuntimeError(redact(str(error), self._hidden)) from None
            if self._auth_env is not None:
                auth.check_admin(self.url, self._auth_env, self.certificate)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        """Stop the server and every process it started (nothing when it is not running)."""
        if self.process is not None:
            stop_group(self.process)
            self.process = None

    def exited(self) -> int | None:
        """The exit code of a started server that has exited since (None: running, or stopped)."""
        return None if self.process is None else self.process.poll()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
