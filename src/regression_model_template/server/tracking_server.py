"""``mlflow server`` as the stack runs it: proxied artifacts, gunicorn, stopped as a whole."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import typing as T
import urllib.request
from pathlib import Path

from regression_model_template.server.processes import (
    check_free,
    die_with_parent,
    free_port,
    main_thread_on_linux,
    stop_group,
    tail,
)

__all__ = ["GUNICORN", "mlflow_server", "running"]


#: Serve with gunicorn instead of MLflow's default uvicorn: with several uvicorn workers every
#: request on a reused connection waits ~40 ms more (uvicorn issue 3149: TCP_NODELAY is lost);
#: measured here, one ``log_metric`` call with 2 workers: 53 ms (uvicorn), 8.9 ms (gunicorn).
#: gunicorn's default 30 s request timeout would kill the upload of a large model: 10 minutes.
GUNICORN = ("--gunicorn-opts", "--timeout 600")


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts: Path,
    *,
    port: int | None = None,
    workers: int = 1,
    startup_timeout: float = 60.0,
    env: T.Mapping[str, str] | None = None,
    output: Path | None = None,
    options: T.Sequence[str] = (),
) -> T.Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1 for the block; yield its URL once it answers.

    Artifacts are proxied (clients upload through the server) into ``artifacts``; the
    background job runner is off (it holds gigabytes and a core for nothing here). The server
    and every process it started are stopped on exit (SIGTERM to its process group, then
    SIGKILL); on Linux, when started from the main thread, it also gets SIGTERM if this
    process dies first.

    Args:
        backend_store_uri: the server's store (``sqlite:///...``, ``postgresql://...``).
        artifacts: where the server keeps artifacts.
        port: the port to listen on (default: a free one).
        workers: server processes; see the README on workers and latency.
        startup_timeout: seconds to wait for ``/health``.
        env: the server's environment (default: this process's, without MLflow's client
            settings).
        output: the file receiving the server's output (default: ``artifacts/../server-*.log``).
        options: more ``mlflow server`` options (e.g. :data:`GUNICORN`).

    Raises:
        RuntimeError: the port is taken, or the server exited or did not answer ``/health``
            within ``startup_timeout`` seconds; the message ends with its output.
    """
    port = port or free_port()
    check_free(port)  # else another server's /health would answer for ours
    url = f"http://127.0.0.1:{port}"
    artifacts = Path(artifacts).absolute()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = output or artifacts.parent / f"server-{time.time_ns()}.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--artifacts-destination", str(artifacts),
        "--workers", str(workers),
        *options,
    ]  # fmt: skip
    environ = dict(os.environ if env is None else env)
    if env is None:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
            environ.pop(name, None)
    environ.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    environ["MLFLOW_BACKEND_STORE_URI"] = backend_store_uri  # not argv: `ps` shows a password
    with log.open("ab") as sink:
        process = subprocess.Popen(
            command,
            cwd=artifacts.parent,
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
            _wait_for_health(process, url, log, startup_timeout)
            yield url
        finally:
            stop_group(process)


def running(url: str, timeout: float = 5.0) -> bool:
    """Whether the server at ``url`` answers ``/health``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(f"{url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _wait_for_health(process: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:  # note: a taken port makes mlflow server exit with code 0
            raise RuntimeError(f"mlflow server exited ({code}) before answering; " + tail(log))
        if running(url, timeout=2) and process.poll() is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server gave no /health within {timeout:g} s; " + tail(log))
        time.sleep(0.2)
