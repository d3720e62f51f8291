"""A tracking-server outage: the longest ``log_metrics`` call while the server is away."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import METRICS, Context, Row, count_values, row
from regression_model_template.testing import local_mlflow_server


def run(context: Context) -> list[Row]:
    return bench_outage(context.folder)


def bench_outage(folder: Path, outage: float = 20.0) -> list[Row]:
    """Log steadily through a server outage: the longest ``log_metrics`` call, and no loss."""
    import threading

    from regression_model_template.io.services import MlflowService
    from regression_model_template.testing import free_port

    root, port = folder / "outage", free_port()
    root.mkdir()
    stop, restarted, done = threading.Event(), threading.Event(), threading.Event()

    def server() -> None:
        with local_mlflow_server(root, port=port):
            stop.wait()
        time.sleep(outage)  # the outage: nothing listens on the port
        with local_mlflow_server(root, port=port):
            restarted.set()
            done.wait()

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    _wait_for(url)
    service = MlflowService(
        tracking_uri=url,
        experiment_name="bench-outage",
        autolog_disable=True,
        spool_dir=str(folder / "spool"),
        end_timeout=300,
    )
    longest, calls = 0.0, 0
    run_config = MlflowService.RunConfig(name="outage", log_system_metrics=False)
    try:
        with service, service.run_context(run_config) as run:
            started = time.monotonic()
            while not restarted.is_set() or time.monotonic() - started < 5:
                if not stop.is_set() and time.monotonic() - started > 3:
                    stop.set()  # the server goes away after 3 s of logging
                begin = time.perf_counter()
                service.log_metrics({key: float(calls) for key in METRICS}, step=calls)
                longest = max(longest, time.perf_counter() - begin)
                calls += 1
                time.sleep(0.002)  # a training loop: ~2,500 values/s
        stored = count_values(service.client(), run.info.run_id)
        status = service.client().get_run(run.info.run_id).info.status
    finally:
        stop.set()
        done.set()
        thread.join(60)
    if stored != calls * len(METRICS) or status != "FINISHED":
        raise AssertionError(f"outage: {stored} of {calls * len(METRICS)} values, run {status}")
    return [
        row(
            f"outage: longest log_metrics call during a {outage:g} s server outage",
            longest * 1000, "ms", None, 50, "<= 50 ms",
        )
    ]  # fmt: skip


def _wait_for(url: str, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no server at {url}")
