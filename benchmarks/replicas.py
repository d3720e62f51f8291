"""8 jobs at once through the team's stack with 2 replicas behind haproxy, against 1 server.

Both stacks run at once (each with its own PostgreSQL) and the runs alternate, so both sides
share the noise. Each server has the ``make server`` default of 2 workers: the row shows what
``--replicas 2`` buys as it is typed. On this 2-core machine the jobs, the servers and
PostgreSQL share the cores, so the row is information, not a goal. Needs haproxy and
PostgreSQL (installed on first use as root): without them the group notes why and gives no row.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from benchmarks.common import Context, Row, Sizes, median, note, row
from benchmarks.team import check_stored, team_jobs

WORKERS = 2  # per server, as `make server` runs it


def run(context: Context) -> list[Row]:
    from regression_model_template.server.balancer import BalancerUnavailable
    from regression_model_template.server.postgres import PostgresUnavailable

    try:
        return bench_replicas(context.folder / "replicas", context.sizes)
    except (BalancerUnavailable, PostgresUnavailable) as error:
        note(f"replicas: no row, {error}")
        return []


def bench_replicas(folder: Path, sizes: Sizes) -> list[Row]:
    from regression_model_template.server.processes import free_port
    from regression_model_template.server.stack import team_server

    jobs, count = sizes.team_jobs, sizes.team_values
    spans: dict[int, list[float]] = {1: [], 2: []}
    with contextlib.ExitStack() as running:
        stacks = {
            replicas: running.enter_context(
                team_server(
                    folder / f"r{replicas}",
                    port=free_port(),
                    workers=WORKERS,
                    reap_after=0,
                    replicas=replicas,
                    report=lambda _: None,
                )
            )
            for replicas in (1, 2)
        }
        for repeat in range(max(sizes.repeats - 2, 1)):
            for replicas in (1, 2) if repeat % 2 == 0 else (2, 1):
                stack = stacks[replicas]
                span, run_ids = team_jobs(stack.url, folder, f"bench-replicas-{replicas}",
                                           jobs, count, "service")  # fmt: skip
                check_stored(stack.database, run_ids, count, f"{replicas} replicas, {jobs} jobs")
                spans[replicas].append(span)
    return [
        row(
            f"team server, {jobs} jobs at once ({count:,} values each): 2 replicas behind "
            f"haproxy vs 1 server ({WORKERS} workers each)",
            median(spans[2]), "s", median(spans[1]), None, "(information: 2 cores)",
        )
    ]  # fmt: skip
