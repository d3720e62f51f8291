"""The whole stack for a block: PostgreSQL, ``mlflow server`` on it, and the reaper."""

from __future__ import annotations

import contextlib
import typing as T
from pathlib import Path

from regression_model_template.server.postgres import cluster_folder, postgres_cluster
from regression_model_template.server.tracking_server import GUNICORN, mlflow_server

__all__ = ["TeamServer", "team_server"]


class TeamServer(T.NamedTuple):
    """A running stack: the tracking server's URL, its database's URI, the cluster's folder."""

    url: str
    database: str
    cluster: Path


def _said(line: str) -> None:
    print(line, flush=True)


@contextlib.contextmanager
def team_server(
    folder: Path,
    port: int = 5000,
    workers: int = 2,
    reap_after: float = 300.0,
    report: T.Callable[[str], None] = _said,
) -> T.Iterator[TeamServer]:
    """PostgreSQL and ``mlflow server`` on ``port``, and its reaper, for the block.

    The cluster is in ``folder/postgres``, or where :func:`.postgres.cluster_folder` puts it when the
    ``postgres`` user cannot reach ``folder``. Artifacts go to ``folder/artifacts``, the
    server's output to ``folder/server.log``. All are kept between runs; both processes stop
    when the block ends. ``workers``: see the README's "A tracking server for the team" (2
    suits a 2-core machine). ``reap_after``: the runs whose heartbeat is older than this many
    seconds are ended KILLED (:func:`regression_model_template.io.reaper.reaping`; 0: no reaper), each told to ``report``
    in a line (default: printed).
    """
    from regression_model_template.io import reaper

    folder = Path(folder).absolute()
    cluster = cluster_folder(folder)
    with (
        postgres_cluster(cluster) as database,
        mlflow_server(
            database,
            folder / "artifacts",
            port=port,
            workers=workers,
            startup_timeout=120.0,
            output=folder / "server.log",
            options=GUNICORN,
        ) as url,
        reaper.reaping(url, reap_after, report) if reap_after else contextlib.nullcontext(),
    ):
        yield TeamServer(url, database, cluster)
