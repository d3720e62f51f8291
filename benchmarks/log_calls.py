"""Logging: many ``logger.info`` calls through LoggerService vs raw loguru (group ``logging``)."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import Context, Row, Sizes, median, row


def run(context: Context) -> list[Row]:
    return bench_logging(context.folder, context.sizes)


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
        row(
            f"logging: {sizes.log_calls:,} calls, LoggerService vs raw loguru",
            median(ours_times), "s", median(raw_times), 1.05, "<= 1.05x",
        )
    ]  # fmt: skip
