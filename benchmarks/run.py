"""Benchmarks: the services against raw MLflow and loguru, as ratios measured in the same run.

Usage (``make bench`` runs the full set and writes benchmarks/RESULTS.md)::

    python benchmarks/run.py              # full: SQLite, a local `mlflow server`, the team server
    python benchmarks/run.py --quick      # small sizes, no server: checks that it all runs
    python benchmarks/run.py --only team,job   # some groups only; prints, writes no table
                                               # unless --output is given
    python benchmarks/run.py --only network    # another host (a network namespace: root)
    python benchmarks/run.py --only replicas   # 2 replicas behind haproxy vs 1 server

Each figure is a median over repeats, divided by its baseline measured in the same run: these
machines are noisy, ratios are what we compare. Each group is a module of this folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import typing as T
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this folder as the package it is
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import (
    alerts,
    cold_start,
    disk_full,
    heartbeat,
    injection,
    job,
    lifecycle,
    log_calls,
    metrics,
    network,
    outage,
    replicas,
    run_log,
    team,
)
from benchmarks.common import FULL, NOTES, QUICK, Context, Row

HERE = Path(__file__).resolve().parent

#: Group name (for --only) -> its benchmarks, in the order of the table.
GROUPS: dict[str, T.Callable[[Context], list[Row]]] = {
    "metrics": metrics.run,
    "heartbeat": heartbeat.run,
    "outage": outage.run,
    "disk_full": disk_full.run,
    "team": team.run,
    "network": network.run,
    "replicas": replicas.run,
    "job": job.run,
    "injection": injection.run,
    "lifecycle": lifecycle.run,
    "logging": log_calls.run,
    "run_log": run_log.run,
    "alerts": alerts.run,
    "cold": cold_start.run,
}
SERVER_GROUPS = ("outage", "team", "network", "replicas")  # need a server: skipped by --quick


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
    wanted = {g for g in args.only if not (args.quick and g in SERVER_GROUPS)}
    folder = Path(tempfile.mkdtemp(prefix="rmt-bench-"))
    folder.chmod(0o755)  # the team server's PostgreSQL (user postgres) must reach it
    context = Context(folder, QUICK if args.quick else FULL, args.quick)
    rows: list[Row] = []
    try:
        for name, group in GROUPS.items():
            if name in wanted:
                rows += group(context)
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
