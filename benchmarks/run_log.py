"""The run's own log: logging inside a run with its log captured vs not; the upload."""

from __future__ import annotations

import time
import typing as T
from pathlib import Path

from benchmarks.common import Context, Row, Sizes, median, row


def run(context: Context) -> list[Row]:
    return bench_run_log(context.folder, context.sizes)


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
        row(
            f"run log: {sizes.log_calls:,} log calls in a run, captured vs not",
            median(times[True]), "s", median(times[False]), 1.3, "<= 1.3x",
        ),
        row("run log: upload of a 1 MB run.log (SQLite)", median(uploads) * 1000, "ms",
            None, 100, "<= 100 ms"),
    ]  # fmt: skip


def _run_log_text(client: T.Any, run_id: str, folder: Path) -> str:
    if "run.log" not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return ""
    target = folder / f"download-{run_id}"
    target.mkdir()
    return Path(client.download_artifacts(run_id, "run.log", str(target))).read_text()
