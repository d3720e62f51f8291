"""One job from another host over TLS with credentials, against the same job on loopback.

The other host is a network namespace on a veth link (:func:`regression_model_template.testing.
other_host`); the team's stack listens on this host's end of it, which turns on basic-auth and
TLS. The baseline is the same stack on 127.0.0.1 (plain HTTP, no credentials), the same job run
from this host. Both stacks run at once and the runs alternate, so both sides share the noise.
Needs root (namespaces) and PostgreSQL: without them the group notes why and gives no row.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import typing as T
from pathlib import Path

from benchmarks.common import Context, Row, Sizes, median, note, row
from benchmarks.team import check_stored

WORKERS = 2  # as `make server` runs it
ADMIN, PASSWORD = "bench", "bench-network-Pa55"

# One job: logs ``count`` values through MlflowService.log_metrics, one per call, then prints
# {"run_id", "seconds"}: from the first value to the run's end, its final flush included.
NETWORK_JOB = """
import json, sys, time
from regression_model_template.io.services import MlflowService
url, experiment, spool, count = sys.argv[1:5]
service = MlflowService(tracking_uri=url, experiment_name=experiment, spool_dir=spool,
                        autolog_disable=True)
config = MlflowService.RunConfig(name="network", log_system_metrics=False)
with service:
    with service.run_context(config) as run:
        start = time.perf_counter()
        for step in range(int(count)):
            service.log_metrics({"loss": step * 0.5}, step=step)
    seconds = time.perf_counter() - start
print(json.dumps({"run_id": run.info.run_id, "seconds": seconds}), flush=True)
"""


def run(context: Context) -> list[Row]:
    from regression_model_template.other_hosts import OtherHostUnavailable
    from regression_model_template.server.postgres import PostgresUnavailable

    try:
        return bench_network(context.folder / "network", context.sizes)
    except (OtherHostUnavailable, PostgresUnavailable) as error:
        note(f"network: no row, {error}")
        return []


def _job(
    command: T.Callable[[list[str]], list[str]],
    url: str,
    environ: dict[str, str],
    folder: Path,
    experiment: str,
    count: int,
) -> tuple[str, float]:
    """Run one job process (through ``command``: on this host or the other); its run and time."""
    argv = [url, experiment, str(folder / f"spool-{experiment}"), str(count)]
    done = subprocess.run(
        command([sys.executable, "-c", NETWORK_JOB, *argv]),
        env=environ, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"network job failed: {done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["run_id"], report["seconds"]


def bench_network(folder: Path, sizes: Sizes) -> list[Row]:
    """20,000 values from another host over TLS with auth vs on loopback without them."""
    from regression_model_template.io.stores import environ_restored
    from regression_model_template.other_hosts import other_host
    from regression_model_template.server.processes import free_port
    from regression_model_template.server.stack import team_server
    from regression_model_template.testing import clean_environ

    count = sizes.team_values
    remote_folder, local_folder = folder / "remote", folder / "local"
    for path in (folder, remote_folder, local_folder):
        path.mkdir(exist_ok=True)
        path.chmod(0o755)  # the stack's PostgreSQL (user postgres) must reach it
    times: dict[str, list[float]] = {"remote": [], "local": []}
    with contextlib.ExitStack() as running:
        host = running.enter_context(other_host())
        with environ_restored(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")):
            # the stack's admin comes from its environment at start
            os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=PASSWORD)
            remote = running.enter_context(
                team_server(remote_folder, port=free_port(host.gateway), workers=WORKERS,
                            reap_after=0, report=lambda line: None, host=host.gateway)
            )  # fmt: skip
        local = running.enter_context(
            team_server(local_folder, port=free_port(), workers=WORKERS, reap_after=0,
                        report=lambda line: None)
        )  # fmt: skip
        assert remote.certificate is not None
        remote_environ = clean_environ(
            MLFLOW_TRACKING_USERNAME=ADMIN,
            MLFLOW_TRACKING_PASSWORD=PASSWORD,
            MLFLOW_TRACKING_SERVER_CERT_PATH=str(remote.certificate),
        )
        Side = tuple[T.Callable[[list[str]], list[str]], T.Any, dict[str, str], Path]
        sides: dict[str, Side] = {
            "remote": (host.command, remote, remote_environ, remote_folder),
            "local": (list, local, clean_environ(), local_folder),
        }
        for repeat in range(max(sizes.repeats - 2, 1)):  # alternating who goes first
            for name in ("remote", "local") if repeat % 2 == 0 else ("local", "remote"):
                command, stack, environ, where = sides[name]
                run_id, seconds = _job(command, stack.url, environ, where, "bench-network", count)
                check_stored(stack.database, [run_id], count, f"network, {name} job")
                times[name].append(seconds)
    return [
        row(
            f"network: one job's {count:,} values incl. flush from another host (TLS, "
            f"credentials) vs on loopback (plain HTTP), team server with {WORKERS} workers",
            median(times["remote"]), "s", median(times["local"]), None, "(information)",
        )
    ]  # fmt: skip
