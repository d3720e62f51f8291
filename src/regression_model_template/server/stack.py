"""The whole stack for a block: PostgreSQL, ``mlflow server`` on it, and the reaper."""

from __future__ import annotations

import contextlib
import os
import typing as T
from pathlib import Path

from regression_model_template.server import auth, tls
from regression_model_template.server.artifacts import artifacts_destination, check_destination
from regression_model_template.server.balancer import balancer, haproxy_program
from regression_model_template.server.postgres import cluster_folder, postgres_cluster
from regression_model_template.server.replicas import Replicas
from regression_model_template.server.tracking_server import GUNICORN, MlflowServer, is_loopback

__all__ = ["TeamServer", "team_server"]


class TeamServer(T.NamedTuple):
    """A running stack: the tracking server's URL, its database's URI, the cluster's folder.

    ``certificate``: the server's TLS certificate, for jobs' ``MLFLOW_TRACKING_SERVER_CERT_PATH``
    (None: plain HTTP on loopback). ``database`` may hold PostgreSQL's password: show it
    through :func:`regression_model_template.io.masking.mask_uri` only. ``artifacts``: where
    the server keeps artifacts (a folder, or ``s3://...``). ``replicas``: the servers behind
    the balancer (None: one server, no balancer).
    """

    url: str
    database: str
    cluster: Path
    certificate: Path | None = None
    artifacts: str = ""
    replicas: Replicas | None = None


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
    replicas: int = 1,
    artifacts: str | None = None,
) -> T.Iterator[TeamServer]:
    """PostgreSQL, ``mlflow server`` (or replicas behind haproxy) on ``port``, the reaper.

    All for the block. The cluster is in ``folder/postgres``, or where
    :func:`.postgres.cluster_folder` puts it when the ``postgres`` user cannot reach ``folder``.
    Artifacts go to ``folder/artifacts`` (see ``artifacts``), the server's output to
    ``folder/server.log``. All are kept between runs; every process stops when the block ends.
    ``workers``: see the README's "A tracking server for the team" (2
    suits a 2-core machine). ``reap_after``: the runs whose heartbeat is older than this many
    seconds are ended KILLED (:func:`regression_model_template.io.reaper.reaping`; 0: no
    reaper), each told to ``report`` in a line (default: printed).

    ``host``: the address (or name) the server listens on. Any other than loopback turns on
    MLflow's basic-auth app, its admin from this process's ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (:mod:`.auth`), and HTTPS only: with ``tls_cert`` and
    ``tls_key``, or a self-signed pair made for ``host`` in ``folder/tls`` (:mod:`.tls`; a new
    one is told to ``report``). A pair given on loopback serves HTTPS there too.

    Raises:
        ValueError: the admin's variables are missing, the pair given is unusable, or
            ``replicas`` or ``artifacts`` is not one this can serve.
        RuntimeError: a part did not start (its output ends the message), the artifacts'
            destination cannot be reached, or haproxy (for ``replicas``) cannot be had
            (:class:`.balancer.BalancerUnavailable`), checked before anything starts.
    """
    from regression_model_template.io import reaper

    folder = Path(folder).absolute()
    if replicas < 1:
        raise ValueError(f"replicas must be 1 or more (got {replicas})")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a TLS pair needs both the certificate and the key")
    destination = artifacts_destination(artifacts, folder)
    facing = not is_loopback(host)
    admin = auth.admin_from(os.environ) if facing else None
    pair: tls.TlsPair | None = None
    if tls_cert is not None and tls_key is not None:
        pair = tls.user_pair(tls_cert, tls_key, host)
    elif facing:
        pair = tls.tls_pair(folder, host, report)
    check_destination(destination)  # a wrong bucket fails the start, not the first upload
    if replicas > 1:
        haproxy_program()  # installed, or the error, before anything starts
    auth_env = auth.auth_environment(folder, admin) if admin else None
    certificate = pair.certificate if pair else None
    cluster = cluster_folder(folder)
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(postgres_cluster(cluster))
        if replicas == 1:
            group = None
            url = stack.enter_context(
                MlflowServer(database, destination, port=port, workers=workers,
                             startup_timeout=120.0, output=folder / "server.log",
                             options=GUNICORN, host=host, tls=pair, auth_env=auth_env)
            )  # fmt: skip
        else:
            group, url = _replicas(stack, database, destination, folder, port, workers, replicas,
                                   report, host, pair, auth_env)  # fmt: skip
        stack.enter_context(_trusting(certificate))
        if reap_after:
            stack.enter_context(reaper.reaping(url, reap_after, report))
        yield TeamServer(url, database, cluster, certificate, destination, group)


def _replicas(
    stack: contextlib.ExitStack,
    database: str,
    destination: str,
    folder: Path,
    port: int,
    workers: int,
    count: int,
    report: T.Callable[[str], None],
    host: str,
    pair: tls.TlsPair | None,
    auth_env: T.Mapping[str, str] | None,
) -> tuple[Replicas, str]:
    """Start ``count`` servers on 127.0.0.1, haproxy in front on ``host:port``, their watcher.

    The servers speak plain HTTP on loopback; the balancer serves ``host`` (and TLS). They are
    started one after the other: the first one makes the databases' tables, which several at
    once would race to make (8 MLflow clients on an empty PostgreSQL: 7 crashed, measured).
    """
    servers = [
        MlflowServer(database, destination, workers=workers, startup_timeout=120.0,
                     output=folder / f"server-r{index}.log", options=GUNICORN,
                     auth_env=auth_env, public=(host, port))
        for index in range(1, count + 1)
    ]  # fmt: skip
    for server in servers:
        stack.enter_context(server)
    front = stack.enter_context(balancer(folder / "balancer", host, port, [s.port for s in servers],
                                         tls=pair))  # fmt: skip
    return stack.enter_context(Replicas(servers, front, report)), front.url


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
