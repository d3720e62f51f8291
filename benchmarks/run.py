"""Benchmarks: the services against raw MLflow and loguru, as ratios measured in the same run.

Usage (``make bench`` runs the full set and writes benchmarks/RESULTS.md)::

    python benchmarks/run.py              # full: SQLite, a local `mlflow server`, the team server
    python benchmarks/run.py --quick      # small sizes, no server: checks that it all runs
    python benchmarks/run.py --only team,job   # some groups only; prints, writes no table
                                               # unless --output is given

Each figure is a median over repeats, divided by its baseline measured in the same run: these
machines are noisy, ratios are what we compare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import typing as T
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from regression_model_template.testing import local_mlflow_server

HERE = Path(__file__).resolve().parent
Row = tuple[str, str, str, str, str]  # benchmark, measured, baseline, ratio, goal + verdict
NOTES: list[str] = []  # findings of this run, listed under the table


class Sizes(T.NamedTuple):
    steps: int  # metric steps (x 5 metrics)
    per_call_sample: int  # values timed for the per-call baseline (then scaled)
    log_calls: int
    repeats: int
    team_jobs: int = 8  # concurrent jobs against the team server
    team_values: int = 20_000  # values each job logs through MlflowService.log_metrics
    team_sample: int = 200  # values each job logs with per-call mlflow.log_metric (then scaled)


FULL = Sizes(steps=2000, per_call_sample=500, log_calls=100_000, repeats=5)
QUICK = Sizes(steps=40, per_call_sample=20, log_calls=2_000, repeats=1, team_jobs=2,
              team_values=500, team_sample=20)  # fmt: skip
METRICS = ("loss", "rmse", "mae", "r2", "lr")


# %% helpers


def _median(times: list[float]) -> float:
    return statistics.median(times)


def _timed(function: T.Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _count_values(client: T.Any, run_id: str) -> int:
    return sum(len(client.get_metric_history(run_id, key)) for key in METRICS)


# %% 1. metric logging


def bench_metrics(uri: str, label: str, sizes: Sizes) -> list[Row]:
    """Service (buffered) vs per-call ``mlflow.log_metric`` vs one bulk ``log_batch``."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from regression_model_template.io.services import MlflowService

    total = sizes.steps * len(METRICS)
    service = MlflowService(
        tracking_uri=uri, experiment_name=f"bench-{label}", autolog_disable=True
    )
    client = MlflowClient(tracking_uri=uri)
    run_config = MlflowService.RunConfig(name="bench", log_system_metrics=False)
    service_totals, caller_costs = [], []
    with service:
        for _ in range(sizes.repeats):
            rows = [{k: step * 0.5 for k in METRICS} for step in range(sizes.steps)]
            with service.run_context(run_config) as run:
                start = time.perf_counter()
                for step, row in enumerate(rows):
                    service.log_metrics(row, step=step)
                caller_costs.append((time.perf_counter() - start) / total)
            service_totals.append(time.perf_counter() - start)  # + the flush at the run's end
            stored = _count_values(client, run.info.run_id)
            if stored != total:
                raise AssertionError(f"{label}: {stored} of {total} values stored (service)")

        # (b) one bulk log_batch of the same values, 1,000 per call (MLflow's limit)
        bulk_times = []
        for _ in range(sizes.repeats):
            with mlflow.start_run(log_system_metrics=False) as run:
                now = int(time.time() * 1000)
                values = [
                    Metric(k, step * 0.5, now, step) for step in range(sizes.steps) for k in METRICS
                ]
                start = time.perf_counter()
                for i in range(0, len(values), 1000):
                    client.log_batch(run.info.run_id, metrics=values[i : i + 1000])
                bulk_times.append(time.perf_counter() - start)
            if _count_values(client, run.info.run_id) != total:
                raise AssertionError(f"{label}: bulk baseline lost values")

        # (a) per-call log_metric: timed on a sample, scaled to the same number of values
        sample = min(sizes.per_call_sample, total)
        with mlflow.start_run(log_system_metrics=False) as run:
            start = time.perf_counter()
            for i in range(sample):
                mlflow.log_metric(METRICS[i % len(METRICS)], i * 0.5, step=i // len(METRICS))
            per_call = (time.perf_counter() - start) / sample * total
        if _count_values(client, run.info.run_id) != sample:
            raise AssertionError(f"{label}: per-call baseline lost values")

    ours, bulk, cost = _median(service_totals), _median(bulk_times), _median(caller_costs)
    goal_speedup = 20 if label == "sqlite" else 100
    return [
        _row(f"metrics {label}: caller cost per value", cost * 1e6, "us", None, 10, "<= 10 us"),
        _row(f"metrics {label}: total incl. flush vs bulk", ours, "s", bulk, 1.5, "<= 1.5x"),
        _row(
            f"metrics {label}: per-call log_metric / total (speed-up)",
            per_call, "s", ours, None, f">= {goal_speedup}x",
            speedup_goal=goal_speedup,
        ),
    ]  # fmt: skip


# %% 2. cold start


def bench_cold_start(sizes: Sizes) -> list[Row]:
    cli = str(Path(sys.executable).with_name("regression-model-template"))
    commands = {
        "pass": [sys.executable, "-c", "pass"],
        "import mlflow": [sys.executable, "-c", "import mlflow"],
        "import package": [sys.executable, "-c", "import regression_model_template"],
        "--help": [cli, "--help"],
    }
    times = {}
    for name, command in commands.items():
        runs = []
        for _ in range(max(sizes.repeats, 3)):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            runs.append(time.perf_counter() - start)
        times[name] = _median(runs)
    base = times["import mlflow"]
    return [
        _row("cold start: --help vs import mlflow", times["--help"], "s", base, 0.25, "<= 0.25x"),
        _row("cold start: import package vs mlflow", times["import package"], "s", base, None, ""),
        _row("cold start: python -c pass", times["pass"], "s", None, None, "(reference)"),
    ]


# %% 3. injection


def bench_injection(sizes: Sizes) -> list[Row]:
    from dependency_injector.wiring import Provide

    from regression_model_template.containers import Container, inject
    from regression_model_template.io.services import AlertsService, MlflowService

    def plain(alerts: AlertsService, mlflow_service: MlflowService) -> int:
        return 1

    @inject
    def job(
        alerts: AlertsService = Provide[Container.alerts_service],
        mlflow_service: MlflowService = Provide[Container.mlflow_service],
    ) -> int:
        return 1

    container = Container(profile=False, environ={})
    globals()["_bench_job"] = job  # wiring patches module members: make the job one
    container.wire(modules=[sys.modules[__name__]])
    alerts, mlflow_service = container.alerts_service(), container.mlflow_service()
    number = 20_000 if sizes is FULL else 2_000
    wired = _median(timeit.repeat(job, number=number, repeat=5)) / number
    direct = (
        _median(timeit.repeat(lambda: plain(alerts, mlflow_service), number=number, repeat=5))
        / number
    )
    container.unwire()
    overhead = wired - direct
    return [_row("injection: @inject overhead per call", overhead * 1e6, "us", None, 3, "<= 3 us")]


# %% 4. lifecycle


def bench_lifecycle(folder: Path, sizes: Sizes) -> list[Row]:
    import mlflow
    from loguru import logger

    from regression_model_template.containers import Container, lifespan
    from regression_model_template.io.services import MlflowService

    uri = f"sqlite:///{folder}/lifecycle.db"
    config = {
        "logger": {"sink": str(folder / "lifecycle.log")},
        "alerts": {"enable": False},
        "mlflow": {"tracking_uri": uri, "experiment_name": "lifecycle"},
    }
    run_config = MlflowService.RunConfig(name="empty", log_system_metrics=False)

    def ours(container: Container) -> None:
        with lifespan(container), container.mlflow_service().run_context(run_config):
            pass

    def fresh() -> Container:
        return Container(config=config, profile=False, environ={})

    def raw() -> None:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        mlflow.set_experiment("lifecycle")
        mlflow.autolog(log_models=False, log_datasets=False)
        with mlflow.start_run(run_name="empty", log_system_metrics=False):
            pass

    def service_only() -> None:
        service = MlflowService(tracking_uri=uri, experiment_name="lifecycle")
        with service, service.run_context(run_config):
            pass

    def loguru_add_remove() -> None:
        handler = logger.add(str(folder / "lifecycle-raw.log"))
        logger.remove(handler)

    ours(fresh())  # creates the store and warms imports: both sides use an existing store
    raw()
    times: dict[str, list[float]] = {"ours": [], "raw": [], "service": [], "loguru": []}
    for _ in range(max(sizes.repeats * 4, 3)):  # interleaved: drift hits every side alike
        container = fresh()  # built outside the timing
        times["ours"].append(_timed(lambda c=container: ours(c)))  # type: ignore[misc]
        times["raw"].append(_timed(raw))
        times["service"].append(_timed(service_only))
        times["loguru"].append(_timed(loguru_add_remove))
    ours_time, raw_time = _median(times["ours"]), _median(times["raw"])
    service, add = _median(times["service"]), _median(times["loguru"])
    return [
        _row(
            "lifecycle: lifespan + empty run vs raw MLflow",
            ours_time,
            "s",
            raw_time,
            1.2,
            "<= 1.2x",
        ),
        _row(
            "lifecycle: MlflowService alone vs raw MLflow", service, "s", raw_time, None, "(part)"
        ),
        _row("lifecycle: one loguru logger.add + remove", add, "s", None, None, "(part)"),
    ]


# %% 5. logging


def bench_logging(folder: Path, sizes: Sizes) -> list[Row]:
    from loguru import logger

    from regression_model_template.io.services import DEFAULT_LOG_FORMAT, LoggerService

    def ours(path: Path) -> float:
        service = LoggerService(sink=str(path), intercept_stdlib=False)
        with service:
            log = service.logger()
            start = time.perf_counter()
            for i in range(sizes.log_calls):
                log.info("step {}", i)
            log.complete()
            return time.perf_counter() - start

    def raw(path: Path) -> float:
        handler = logger.add(str(path), format=DEFAULT_LOG_FORMAT, level="DEBUG", diagnose=False)
        start = time.perf_counter()
        for i in range(sizes.log_calls):
            logger.info("step {}", i)
        logger.complete()
        elapsed = time.perf_counter() - start
        logger.remove(handler)
        return elapsed

    ours_times, raw_times = [], []
    for repeat in range(max(sizes.repeats, 3)):  # alternate which side goes first
        first, second = (ours, raw) if repeat % 2 == 0 else (raw, ours)
        times = {first: first(folder / f"{first.__name__}-{repeat}.log")}
        times[second] = second(folder / f"{second.__name__}-{repeat}.log")
        ours_times.append(times[ours])
        raw_times.append(times[raw])
    for repeat in range(max(sizes.repeats, 3)):
        lines = len((folder / f"ours-{repeat}.log").read_text().splitlines())
        if lines != sizes.log_calls:
            raise AssertionError(f"logging: {lines} of {sizes.log_calls} lines written")
    return [
        _row(
            f"logging: {sizes.log_calls:,} calls, LoggerService vs raw loguru",
            _median(ours_times), "s", _median(raw_times), 1.05, "<= 1.05x",
        )
    ]  # fmt: skip


# %% 5b. the run's own log


def bench_run_log(folder: Path, sizes: Sizes) -> list[Row]:
    """Logging inside a run with the run's log captured vs not; the upload of a 1 MB log."""
    from loguru import logger
    from mlflow.tracking import MlflowClient

    from regression_model_template.io import run_logs
    from regression_model_template.io.services import LoggerService, MlflowService

    uri = f"sqlite:///{folder}/run-log.db"
    run_config = MlflowService.RunConfig(name="run-log", log_system_metrics=False)

    def inside_a_run(capture: bool, path: Path) -> float:
        logger_service = LoggerService(sink=str(path), intercept_stdlib=False)
        service = MlflowService(
            tracking_uri=uri,
            experiment_name="bench-run-log",
            autolog_disable=True,
            capture_log=capture,
            capture_log_max_bytes=100_000_000,  # every line kept: the cost of the whole log
            spool_dir=str(folder / "run-log-spool"),
        )
        with logger_service, service, service.run_context(run_config) as run:
            start = time.perf_counter()
            for i in range(sizes.log_calls):
                logger.info("step {}", i)
            logger.complete()
            elapsed = time.perf_counter() - start
        text = _run_log_text(service.client(), run.info.run_id, folder)
        expected = sizes.log_calls if capture else 0
        if len(text.splitlines()) != expected:
            raise AssertionError(f"run log: {len(text.splitlines())} of {expected} lines")
        return elapsed

    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(max(sizes.repeats, 3)):  # alternate which side goes first
        for capture in (True, False) if repeat % 2 == 0 else (False, True):
            times[capture].append(inside_a_run(capture, folder / f"run-log-{repeat}-{capture}.log"))

    # the upload of a 1 MB log, as the end of a run does it
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench-run-log")
    assert experiment is not None
    uploads = []
    line = "2025-01-01 12:00:00.000 | INFO     | train:fit:42 - step 123456, loss 0.1234\n"
    for _ in range(max(sizes.repeats, 3)):
        run_id = client.create_run(experiment.experiment_id).info.run_id
        spool = folder / "upload-spool" / run_id
        spool.mkdir(parents=True)
        log = run_logs.RunLog(spool, max_bytes=10_000_000)
        for _ in range(1_000_000 // len(line)):
            log.write(line)
        log.close()
        start = time.perf_counter()
        run_logs.upload(client, run_id, spool)
        uploads.append(time.perf_counter() - start)
        client.set_terminated(run_id)
    return [
        _row(
            f"run log: {sizes.log_calls:,} log calls in a run, captured vs not",
            _median(times[True]), "s", _median(times[False]), 1.3, "<= 1.3x",
        ),
        _row("run log: upload of a 1 MB run.log (SQLite)", _median(uploads) * 1000, "ms",
             None, 100, "<= 100 ms"),
    ]  # fmt: skip


def _run_log_text(client: T.Any, run_id: str, folder: Path) -> str:
    if "run.log" not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return ""
    target = folder / f"download-{run_id}"
    target.mkdir()
    return Path(client.download_artifacts(run_id, "run.log", str(target))).read_text()


# %% 6. alerts


def bench_alerts(folder: Path) -> list[Row]:
    from regression_model_template.io.services import AlertsService
    from regression_model_template.io.stores import environ_restored

    script = folder / "bin" / "notify-send"
    script.parent.mkdir(exist_ok=True)
    script.write_text("#!/bin/sh\nsleep 5\n")
    script.chmod(0o755)
    with environ_restored(("PATH", "DISPLAY")):
        os.environ["PATH"] = f"{script.parent}{os.pathsep}{os.environ['PATH']}"
        os.environ["DISPLAY"] = ":99"
        alerts = AlertsService(max_wait=1.0)
        with alerts, open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            elapsed = _timed(lambda: alerts.notify("bench", "hanging backend"))
    return [
        _row(
            "alerts: notify with a hanging backend (bound 1.0 s)",
            elapsed,
            "s",
            None,
            1.1,
            "<= bound + 0.1 s",
        ),
        _row(
            "alerts: notify to 3 URLs, one hanging, one refused (bound 1.0 s)",
            _notify_three_channels(),
            "s",
            None,
            1.1,
            "<= bound + 0.1 s",
        ),
    ]


def _notify_three_channels() -> float:
    """One alert to a webhook that answers, one that hangs 5 s and a refused port (127.0.0.1)."""
    import http.server
    import threading

    from regression_model_template.io.services import AlertsService
    from regression_model_template.io.stores import environ_restored
    from regression_model_template.testing import free_port

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/hang":
                time.sleep(5)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: T.Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    urls = [f"json://127.0.0.1:{port}/ok", f"json://127.0.0.1:{port}/hang"]
    urls.append(f"json://127.0.0.1:{free_port()}/refused")
    try:
        with environ_restored(("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")):
            for name in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS"):
                os.environ.pop(name, None)
            alerts = AlertsService.model_validate({"urls": urls, "max_wait": 1.0})
            with alerts:
                return _timed(lambda: alerts.notify("bench", "three channels"))
    finally:
        server.shutdown()
        server.server_close()


# %% 7. a tracking-server outage


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
        stored = _count_values(service.client(), run.info.run_id)
        status = service.client().get_run(run.info.run_id).info.status
    finally:
        stop.set()
        done.set()
        thread.join(60)
    if stored != calls * len(METRICS) or status != "FINISHED":
        raise AssertionError(f"outage: {stored} of {calls * len(METRICS)} values, run {status}")
    return [
        _row(
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


# %% 8. the team's tracking server (PostgreSQL-backed `mlflow server`, 4 workers)

TEAM_WORKERS = 4  # as a team would run it (MLflow's default); this machine has 2 cores

# One job process: starts, reports "ready" with its run started, waits for "go" on stdin, logs
# one value per call, then prints {"run_id", "start", "end"}: the end is after the run ended
# (for the service: after the final flush).
TEAM_JOB = """
import json, sys, time
url, experiment, spool, name, count, mode = sys.argv[1:7]
count = int(count)
if mode == "service":
    from regression_model_template.io.services import MlflowService
    service = MlflowService(tracking_uri=url, experiment_name=experiment, spool_dir=spool,
                            autolog_disable=True)
    config = MlflowService.RunConfig(name=name, log_system_metrics=False)
    with service:
        with service.run_context(config) as run:
            print("ready", flush=True)
            sys.stdin.readline()
            start = time.time()
            for step in range(count):
                service.log_metrics({"loss": step * 0.5}, step=step)
        end = time.time()
else:  # per-call mlflow.log_metric
    import mlflow
    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=name, log_system_metrics=False) as run:
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.time()
        for step in range(count):
            mlflow.log_metric("loss", step * 0.5, step=step)
        end = time.time()
print(json.dumps({"run_id": run.info.run_id, "start": start, "end": end}), flush=True)
"""


def _team_jobs(
    url: str, folder: Path, experiment: str, jobs: int, count: int, mode: str
) -> tuple[float, list[str]]:
    """Run ``jobs`` job processes at once; return the span from the first start to the last end."""
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    if client.get_experiment_by_name(experiment) is None:  # not 8 processes racing to create it
        client.create_experiment(experiment)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    environ.pop("MLFLOW_REGISTRY_URI", None)
    logs = [folder / f"{experiment}-{i}.log" for i in range(jobs)]
    processes = []
    for i, log in enumerate(logs):
        argv = [
            url,
            experiment,
            str(folder / f"spool-{experiment}-{i}"),
            f"job{i}",
            str(count),
            mode,
        ]
        with log.open("w") as errors:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", TEAM_JOB, *argv],
                    env=environ,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    text=True,
                )
            )
    try:
        for process, log in zip(processes, logs, strict=True):
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise AssertionError(f"team job did not start: {log.read_text()[-3000:]}")
        for process in processes:  # all ready: start them together
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        reports = []
        for process, log in zip(processes, logs, strict=True):
            stdout, _ = process.communicate(timeout=1800)
            if process.returncode != 0:
                raise AssertionError(f"team job failed: {log.read_text()[-3000:]}")
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return span, [r["run_id"] for r in reports]


def _stored_values(database: str, run_ids: list[str]) -> list[int]:
    """How many values of ``loss`` the server stored for each run (read from PostgreSQL)."""
    import psycopg

    with psycopg.connect(database) as db:
        return [
            T.cast(
                tuple[int],
                db.execute(
                    "SELECT count(DISTINCT step) FROM metrics WHERE run_uuid = %s AND key = 'loss'",
                    (run_id,),
                ).fetchone(),
            )[0]
            for run_id in run_ids
        ]


def _check_stored(database: str, run_ids: list[str], expected: int, what: str) -> None:
    """Every run holds ``expected`` values once its job has ended; else wait, note, or raise.

    Values that land only after the run has ended are noted in RESULTS.md (a reader who
    trusts the run's end would miss them); values still missing 30 s later fail the benchmark.
    """
    stored = _stored_values(database, run_ids)
    if stored == [expected] * len(run_ids):
        return
    short = sum(expected - n for n in stored)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and stored != [expected] * len(run_ids):
        time.sleep(0.5)
        stored = _stored_values(database, run_ids)
    if stored != [expected] * len(run_ids):
        raise AssertionError(f"{what}: {stored} values stored of {expected} per run (30 s later)")
    note = (
        f"{what}: {short:,} values were not in the store when the run had ended; they landed "
        f"within 30 s (checked with a PostgreSQL query on the run's `metrics`)."
    )
    print(note, file=sys.stderr)
    NOTES.append(note)


def bench_team_load(url: str, database: str, folder: Path, sizes: Sizes) -> list[Row]:
    """8 job processes at once: aggregate values/s, the service vs per-call ``log_metric``."""
    jobs = sizes.team_jobs
    ours_span, ours_runs = _team_jobs(url, folder, "bench-team-service", jobs,
                                      sizes.team_values, "service")  # fmt: skip
    _check_stored(database, ours_runs, sizes.team_values, f"team load, {jobs} service jobs")
    base_span, base_runs = _team_jobs(url, folder, "bench-team-per-call", jobs,
                                      sizes.team_sample, "per-call")  # fmt: skip
    _check_stored(database, base_runs, sizes.team_sample, "team load, per-call baseline")
    ours = jobs * sizes.team_values / ours_span
    base = jobs * sizes.team_sample / base_span
    return [
        _rate_row(
            f"team server, {jobs} jobs at once: values/s through log_metrics vs per-call "
            f"log_metric ({sizes.team_values:,} and {sizes.team_sample:,} values/job)",
            ours, base, 50,
        )
    ]  # fmt: skip


def bench_team_one_job(url: str, database: str, folder: Path, sizes: Sizes) -> list[Row]:
    """One job: 20,000 values through the service (1, 2, 4 uploads) vs serial bulk log_batch."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from regression_model_template.io.services import MlflowService

    experiment, count = "bench-team-one", sizes.team_values
    client = MlflowClient(tracking_uri=url)
    experiment_id = (
        found.experiment_id
        if (found := client.get_experiment_by_name(experiment))
        else client.create_experiment(experiment)
    )
    uploads = (2, 1, 4)
    times: dict[int | str, list[float]] = {n: [] for n in uploads}
    times["bulk"] = []

    def ours(parallel: int) -> None:
        service = MlflowService(
            tracking_uri=url,
            experiment_name=experiment,
            spool_dir=str(folder / "spool-one"),
            autolog_disable=True,
            parallel_uploads=parallel,
        )
        config = MlflowService.RunConfig(name=f"uploads-{parallel}", log_system_metrics=False)
        with service:
            with service.run_context(config) as run:
                start = time.perf_counter()
                for step in range(count):
                    service.log_metrics({"loss": step * 0.5}, step=step)
            times[parallel].append(time.perf_counter() - start)  # + the flush at the run's end
        _check_stored(database, [run.info.run_id], count, f"team one job, {parallel} uploads")

    def bulk() -> None:
        run_id = client.create_run(experiment_id, run_name="bulk").info.run_id
        now = int(time.time() * 1000)
        values = [Metric("loss", step * 0.5, now, step) for step in range(count)]
        start = time.perf_counter()
        for i in range(0, count, 1000):
            client.log_batch(run_id, metrics=values[i : i + 1000])
        times["bulk"].append(time.perf_counter() - start)
        client.set_terminated(run_id)
        _check_stored(database, [run_id], count, "team one job, serial log_batch")

    sides: list[T.Callable[[], None]] = [bulk, *(lambda n=n: ours(n) for n in uploads)]
    for repeat in range(max(sizes.repeats - 2, 1)):  # interleaved, rotating who goes first
        for side in sides[repeat % len(sides) :] + sides[: repeat % len(sides)]:
            side()
    base = _median(times["bulk"])
    name = f"team server, one job: {count:,} values incl. flush"
    return [
        _row(f"{name}, 2 parallel uploads (default) vs serial log_batch of 1,000",
             _median(times[2]), "s", base, 0.8, "<= 0.8x"),
        _row(f"{name}, 1 upload at a time vs serial log_batch", _median(times[1]), "s", base,
             None, "(information)"),
        _row(f"{name}, 4 parallel uploads vs serial log_batch", _median(times[4]), "s", base,
             None, "(information)"),
    ]  # fmt: skip


def bench_team(folder: Path, sizes: Sizes) -> list[Row]:
    """The rows on the team's stack: PostgreSQL and ``mlflow server`` with 4 workers."""
    from regression_model_template.io.team_server import free_port, team_server

    with team_server(folder, port=free_port(), workers=TEAM_WORKERS) as stack:
        rows = bench_team_load(stack.url, stack.database, folder, sizes)
        rows += bench_team_one_job(stack.url, stack.database, folder, sizes)
        rows += bench_job(folder, sizes, uri=stack.url, label="server")
    return rows


# %% 9. job overhead: the training job against the same training in raw MLflow


def bench_job(
    folder: Path, sizes: Sizes, uri: str | None = None, label: str = "sqlite"
) -> list[Row]:
    """``jobs.run("training")`` in-process (as the CLI runs it) vs raw MLflow, same store."""
    import mlflow
    from loguru import logger
    from mlflow.tracking import MlflowClient

    from regression_model_template import jobs
    from regression_model_template.containers import Container
    from regression_model_template.jobs import JobsConfig
    from regression_model_template.jobs.data import load_split, regression_metrics
    from regression_model_template.jobs.training import _predicted_vs_actual

    uri = uri or f"sqlite:///{folder}/job.db"
    experiment, registered = f"bench-job-{label}", f"bench_job_{label}"
    config = {
        "logger": {"sink": str(folder / f"job-{label}.log")},
        "alerts": {"enable": False},
        "mlflow": {
            "tracking_uri": uri,
            "experiment_name": experiment,
            "registry_name": registered,
            "spool_dir": str(folder / f"spool-job-{label}"),
        },
    }

    def ours() -> None:
        container = Container(config=config, profile=False, environ={})
        jobs.run("training", container)

    def raw() -> None:
        """The training job's steps written with MLflow's and loguru's own calls."""
        import sklearn
        from mlflow.models import infer_signature
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        handler = logger.add(str(folder / f"job-raw-{label}.log"), diagnose=False)
        try:
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            mlflow.set_experiment(experiment)
            mlflow.autolog(log_models=False, log_datasets=False)
            settings = JobsConfig()
            x_train, x_test, y_train, y_test = load_split(settings)
            model = make_pipeline(StandardScaler(), Ridge(alpha=settings.alpha))
            with mlflow.start_run(run_name="training", tags={"job": "training"}) as run:
                logger.info("Training a ridge regression on {} rows", len(x_train))
                model.fit(x_train, y_train)
                predictions = model.predict(x_test)
                metrics = regression_metrics(y_test, predictions)
                mlflow.log_params(settings.model_dump())
                mlflow.log_metrics(metrics)
                info = mlflow.sklearn.log_model(
                    model,
                    name="model",
                    signature=infer_signature(x_test, predictions),
                    pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
                )
                mlflow.log_figure(
                    _predicted_vs_actual(y_test, predictions), "predicted_vs_actual.png"
                )
                version = mlflow.register_model(info.model_uri, registered).version
                MlflowClient().set_registered_model_alias(registered, settings.model_alias, version)
            logger.info("Registered {} version {}", registered, version)
            print(f"training finished: rmse={metrics['rmse']:.2f} run {run.info.run_id}")
        finally:
            logger.remove(handler)

    times: dict[str, list[float]] = {"ours": [], "raw": []}
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        ours()  # creates the store and warms imports: both sides use an existing store
        raw()
        for repeat in range(max(sizes.repeats, 3)):  # alternate which side goes first
            first, second = (ours, raw) if repeat % 2 == 0 else (raw, ours)
            spent = {first: _timed(first), second: _timed(second)}
            times["ours"].append(spent[ours])
            times["raw"].append(spent[raw])
    finished = MlflowClient(tracking_uri=uri).search_runs(
        [T.cast(T.Any, mlflow.get_experiment_by_name(experiment)).experiment_id]
    )
    if any(run.info.status != "FINISHED" for run in finished):
        raise AssertionError(f"job {label}: a training run did not finish")
    store = "SQLite" if label == "sqlite" else f"team server, {TEAM_WORKERS} workers"
    goal = ("<= 1.1x", 1.1) if label == "sqlite" else ("(information)", None)
    return [
        _row(f"job overhead ({store}): run training vs the same training in raw MLflow",
             _median(times["ours"]), "s", _median(times["raw"]), goal[1], goal[0]),
    ]  # fmt: skip


# %% report


def _row(
    name: str,
    value: float,
    unit: str,
    baseline: float | None,
    limit: float | None,
    goal: str,
    speedup_goal: float | None = None,
) -> Row:
    if speedup_goal is not None and baseline is not None:
        ratio = value / baseline
        verdict = "met" if ratio >= speedup_goal else "MISSED"
        return (
            name,
            f"{baseline:.3g} {unit}",
            f"{value:.3g} {unit}",
            f"{ratio:.1f}x",
            f"{goal} {verdict}",
        )
    ratio_text, verdict = "", ""
    if baseline is not None:
        ratio = value / baseline
        ratio_text = f"{ratio:.2f}x"
        if limit is not None:
            verdict = "met" if ratio <= limit else "MISSED"
    elif limit is not None:
        verdict = "met" if value <= limit else "MISSED"
    base_text = f"{baseline:.3g} {unit}" if baseline is not None else ""
    return (name, f"{value:.3g} {unit}", base_text, ratio_text, f"{goal} {verdict}".strip())


def _rate_row(name: str, ours: float, baseline: float, goal: float) -> Row:
    """A rate (higher is better): ours, the baseline, ours / baseline against ``>= goal x``."""
    ratio = ours / baseline
    verdict = "met" if ratio >= goal else "MISSED"
    return (
        name,
        f"{ours:,.0f} /s",
        f"{baseline:,.0f} /s",
        f"{ratio:.1f}x",
        f">= {goal:g}x {verdict}",
    )


def write_results(rows: list[Row], path: Path, note: str) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` ({note}). Medians of repeats; each ratio is against a",
        "baseline measured in the same run. Per-call `log_metric` baselines are timed on a",
        "sample of values and scaled to the full count (the full count takes minutes over HTTP).",
        "The team server rows run on `team_server(workers=4)`: PostgreSQL + `mlflow server` under",
        "gunicorn, the stack of `make server` (which defaults to 2 workers) with 4 workers, on",
        "this 2-core machine. The 8-job row is one run of each side (8 processes started",
        "together; from the first value to the last job's end, its final flush included).",
        "",
        "| benchmark | measured | baseline | ratio | goal |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in rows],
        "",
        *([f"- {note}" for note in NOTES] + [""] if NOTES else []),
    ]
    path.write_text("\n".join(lines))


GROUPS = ("metrics", "outage", "team", "job", "injection", "lifecycle", "logging", "run_log",
          "alerts", "cold")  # fmt: skip
SERVER_GROUPS = ("outage", "team")  # need a server: skipped by --quick


def main(argv: T.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes, no server")
    parser.add_argument(
        "--only",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=list(GROUPS),
        help=f"comma-separated groups to run ({', '.join(GROUPS)}); default: all. The table is "
        "then written only with an explicit --output",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s) {', '.join(sorted(unknown))} (known: {', '.join(GROUPS)})")
    partial = set(args.only) != set(GROUPS)
    output = args.output or (None if partial else HERE / "RESULTS.md")
    sizes = QUICK if args.quick else FULL
    wanted = {g for g in args.only if not (args.quick and g in SERVER_GROUPS)}
    folder = Path(tempfile.mkdtemp(prefix="rmt-bench-"))
    folder.chmod(0o755)  # the team server's PostgreSQL (user postgres) must reach it
    rows: list[Row] = []
    try:
        if "metrics" in wanted:
            rows += bench_metrics(f"sqlite:///{folder}/metrics.db", "sqlite", sizes)
            if not args.quick:
                with local_mlflow_server(folder) as url:
                    rows += bench_metrics(url, "http", sizes)
        if "outage" in wanted:
            rows += bench_outage(folder)
        if "team" in wanted:
            rows += bench_team(folder / "team", sizes)
        if "job" in wanted:
            rows += bench_job(folder, sizes)
        if "injection" in wanted:
            rows += bench_injection(sizes)
        if "lifecycle" in wanted:
            rows += bench_lifecycle(folder, sizes)
        if "logging" in wanted:
            rows += bench_logging(folder, sizes)
        if "run_log" in wanted:
            rows += bench_run_log(folder, sizes)
        if "alerts" in wanted:
            rows += bench_alerts(folder)
        if "cold" in wanted:
            rows += bench_cold_start(sizes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    note = "quick mode: sizes too small for the goals" if args.quick else "full sizes"
    if partial:
        note += f"; only {', '.join(args.only)}"
    if output is not None:
        write_results(rows, output, note)
    for row in rows:
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
