"""The whole stack for a block: PostgreSQL, ``mlflow server`` on it, and the reaper."""

from __future__ import annotations

import contextlib
import os
import typing as T
from pathlib import Path

from regression_model_template.server import auth, tls
from regression_model_template.server.postgres import cluster_folder, postgres_cluster
from regression_model_template.server.tracking_server import GUNICORN, is_loopback, mlflow_server

__all__ = ["TeamServer", "team_server"]


class TeamServer(T.NamedTuple):
    """A running stack: the tracking server's URL, its database's URI, the cluster's folder.

    ``certificate``: the server's TLS certificate, for jobs' ``MLFLOW_TRACKING_SERVER_CERT_PATH``
    (None: plain HTTP on loopback). ``database`` may hold PostgreSQL's password: show it
    through :func:`regression_model_template.io.masking.mask_uri` only.
    """

    url: str
    database: str
    cluster: Path
    certificate: Path | None = None


def _said(line: str) -> None:
    print(line, flush=True)


@contextlib.contextmanager
def team_server(
    folder: Path,
    port: int = 5000,
    workers: int = 2,
    reap_after: float = 300.0,
    report: T.Callable[[str], None] = _said,
    *,
    host: str = "127.0.0.1",
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> T.Iterator[TeamServer]:
    """PostgreSQL and ``mlflow server`` on ``port``, and its reaper, for the block.

    The cluster is in ``folder/postgres``, or where :func:`.postgres.cluster_folder` puts it when
    the ``postgres`` user cannot reach ``folder``. Artifacts go to ``folder/artifacts``, the
    server's output to ``folder/server.log``. All are kept between runs; both processes stop
    when the block ends. ``workers``: see the README's "A tracking server for the team" (2
    suits a 2-core machine). ``reap_after``: the runs whose heartbeat is older than this many
    seconds are ended KILLED (:func:`regression_model_template.io.reaper.reaping`; 0: no
    reaper), each told to ``report`` in a line (default: printed).

    ``host``: the address (or name) the server listens on. Any other than loopback turns on
    MLflow's basic-auth app, its admin from this process's ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (:mod:`.auth`), and HTTPS only: with ``tls_cert`` and
    ``tls_key``, or a self-signed pair made for ``host`` in ``folder/tls`` (:mod:`.tls`; a new
    one is told to ``report``). A pair given on loopback serves HTTPS there too.

    Raises:
        ValueError: the admin's variables are missing, or the pair given is unusable.
        RuntimeError: a part did not start (its output ends the message).
    """
    from regression_model_template.io import reaper

    folder = Path(folder).absolute()
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a TLS pair needs both the certificate and the key")
    facing = not is_loopback(host)
    admin = auth.admin_from(os.environ) if facing else None
    pair: tls.TlsPair | None = None
    if tls_cert is not None and tls_key is not None:
        pair = tls.user_pair(tls_cert, tls_key, host)
    elif facing:
        pair = tls.tls_pair(folder, host, report)
    auth_env = auth.auth_environment(folder, admin) if admin else None
    certificate = pair.certificate if pair else None
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
            host=host,
            tls=pair,
            auth_env=auth_env,
        ) as url,
        _trusting(certificate),
        reaper.reaping(url, reap_after, report) if reap_after else contextlib.nullcontext(),
    ):
        yield TeamServer(url, database, cluster, certificate)


@contextlib.contextmanager
def _trusting(certificate: Path | None) -> T.Iterator[None]:
    """This process's MLflow client trusts ``certificate`` for the block (the reaper's calls).

    The reaper is an MLflow client in this process: MLflow reads the certificate to trust, and
    the credentials, from the environment at each request. The credentials are already there
    (the admin's ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``); only the certificate is added, and
    the variable is put back as it was when the block ends.
    """
    name = "MLFLOW_TRACKING_SERVER_CERT_PATH"
    if certificate is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = str(certificate)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before
