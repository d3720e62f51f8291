"""The logging loop on a full spool disk: its time per value against the same loop on a free one.

Both spools are on a real small disk (a tmpfs, mounted as root): one with room, one filled up.
Without root, the row is left out and a note says why.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
import typing as T
from pathlib import Path

from benchmarks.common import METRICS, Context, Row, count_values, median, note, row


def run(context: Context) -> list[Row]:
    return bench_disk_full(context.folder, context.sizes.steps * 5, context.sizes.repeats)


def bench_disk_full(folder: Path, steps: int, repeats: int) -> list[Row]:
    """Median time per value of ``steps`` ``log_metrics`` calls (5 metrics), free vs full disk."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats):
        for full in (False, True):
            with _tmpfs(folder / f"disk-{repeat}-{full}", "32m") as disk:
                if disk is None:
                    note("disk full: no row, a tmpfs cannot be mounted here (needs root)")
                    return []
                if full:
                    _fill(disk)
                times[full].append(_loop(folder, disk / "spool", steps, f"{repeat}-{full}"))
    values = steps * len(METRICS)
    free_us, full_us = (median(times[state]) / values * 1e6 for state in (False, True))
    return [
        row(
            "disk full: log_metrics per value, spool on a full disk vs a free one",
            full_us, "us", free_us, 3.0, "<= 3x",
        )
    ]  # fmt: skip


def _loop(folder: Path, spool_dir: Path, steps: int, name: str) -> float:
    """Seconds the loop's calls take (the run's end excluded); checks that every value landed."""
    from regression_model_template.io.services import MlflowService

    service = MlflowService(
        tracking_uri=f"sqlite:///{folder}/disk-{name}.db",
        experiment_name="bench-disk-full",
        autolog_disable=True,
        spool_dir=str(spool_dir),
    )
    run_config = MlflowService.RunConfig(name=name, log_system_metrics=False)
    with service, service.run_context(run_config) as run:
        begin = time.perf_counter()
        for step in range(steps):
            service.log_metrics({key: float(step) for key in METRICS}, step=step)
        took = time.perf_counter() - begin
    stored = count_values(service.client(), run.info.run_id)
    if stored != steps * len(METRICS):
        raise AssertionError(f"disk full: {stored} of {steps * len(METRICS)} values stored")
    return took


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str) -> T.Iterator[Path | None]:
    folder.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:
        yield None
        return
    if mounted.returncode:
        yield None
        return
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> None:
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"x" * chunk) == chunk:
                    pass
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
