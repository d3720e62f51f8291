"""The command line: ``regression-model-template`` (or ``python -m regression_model_template``).

Commands:
    run JOB      run a job (training, evaluation) with the services started around it
    config show  the effective configuration, each value with its source, secrets masked
    config schema  the JSON schema of the configuration
    check        start each service and report what works (--alert: send a test alert)
    recover      send what killed jobs left in the spool, and end their runs
    reap         end KILLED the runs whose heartbeat stopped (their machine is gone)
    server       the team's tracking stack in the foreground: PostgreSQL and mlflow server

Exit codes: 0 success, 1 a job or a check failed, 2 bad command-line input or configuration.

Only the standard library is imported here at start-up: ``--help`` stays fast, and mlflow or
scikit-learn are imported when a job runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
import typing as T

if T.TYPE_CHECKING:
    from regression_model_template.containers import Container

PROG = "regression-model-template"
JOB_NAMES = ("training", "evaluation")  # checked against jobs.JOBS by the tests


class UsageError(Exception):
    """Bad command-line input or configuration: exit code 2."""


class _PrintVersion(argparse.Action):
    """``--version``: the installed distribution's version (read only when asked: ~25 ms)."""

    def __init__(self, option_strings: T.Sequence[str], dest: str, **kwargs: T.Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: T.Any, **kwargs: T.Any) -> None:
        from importlib.metadata import version

        print(f"{PROG} {version('regression-model-template')}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run ML jobs with a logger, alerts and MLflow tracking.",
        epilog="Exit codes: 0 success, 1 a job or check failed, 2 bad input or configuration.",
    )
    parser.add_argument("--version", action=_PrintVersion)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    settings = argparse.ArgumentParser(add_help=False)
    settings.add_argument(
        "--profile",
        help="profile name in containers/ (local, server) or a YAML path; default: $RMT_PROFILE "
        "or local",
    )
    settings.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="set one value, above every other layer (repeatable), e.g. --set logger.level=INFO",
    )

    run = commands.add_parser("run", parents=[settings], help="run a job")
    run.add_argument("job", choices=JOB_NAMES, metavar="JOB", help=", ".join(JOB_NAMES))

    config = commands.add_parser("config", help="show the configuration or its schema")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="WHAT")
    config_commands.add_parser("show", parents=[settings], help="effective values and sources")
    config_commands.add_parser("schema", help="JSON schema of the configuration")

    recover = commands.add_parser(
        "recover", parents=[settings], help="send what killed jobs left in the spool"
    )
    recover.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="also take the runs this store's jobs spooled on host NAME (repeatable): runs of "
        "other hosts sharing the spool folder are left alone, as this host cannot tell whether "
        "their jobs still run; name a host only when its jobs are dead",
    )
    reap = commands.add_parser(
        "reap",
        parents=[settings],
        help="end KILLED the runs whose heartbeat stopped (jobs whose machine is gone)",
    )
    reap.add_argument(
        "--stale-after",
        type=float,
        required=True,
        metavar="SECONDS",
        help="end the RUNNING runs not heard from for SECONDS (keep it well above "
        "mlflow.heartbeat_interval); runs without a heartbeat are never touched",
    )
    server = commands.add_parser(
        "server",
        help="run PostgreSQL and an mlflow server (on 127.0.0.1 by default) until Ctrl-C "
        "(make server)",
    )
    server.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDR",
        help="the address (or name) jobs connect to (127.0.0.1); any other turns on "
        "MLflow's basic auth (admin: $MLFLOW_TRACKING_USERNAME, $MLFLOW_TRACKING_PASSWORD) "
        "and HTTPS only",
    )
    server.add_argument(
        "--tls-cert",
        metavar="PATH",
        help="the server's certificate (PEM), with --tls-key; default on a host other than "
        "loopback: a self-signed pair made for it in FOLDER/tls",
    )
    server.add_argument("--tls-key", metavar="PATH", help="the certificate's private key (PEM)")
    server.add_argument("--port", type=int, default=5000, help="the server's port (5000)")
    server.add_argument(
        "--folder",
        default=".server",
        help="where the artifacts, the logs and (when the postgres user can reach it) the "
        "database are kept (.server)",
    )
    server.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes of each mlflow server (2; see the README)",
    )
    server.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="mlflow servers behind haproxy on PORT (1: one server, no balancer); one that "
        "dies is restarted, and SIGHUP restarts them one at a time",
    )
    server.add_argument(
        "--artifacts-destination",
        metavar="URI",
        help="where the artifacts are kept: a folder (FOLDER/artifacts) or s3://BUCKET/PREFIX "
        "(MLFLOW_S3_ENDPOINT_URL, AWS_* variables; needs the [s3] extra); jobs upload "
        "through the server",
    )
    server.add_argument(
        "--reap-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="end KILLED the runs whose heartbeat is older than SECONDS, as `reap` does "
        "(300; 0 turns the stack's reaper off)",
    )
    check = commands.add_parser("check", parents=[settings], help="start each service, report")
    check.add_argument(
        "--alert",
        action="store_true",
        help="also send a test alert to each alert channel and report delivered or failed",
    )
    return parser


def main(argv: T.Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code.

    Example:
        >>> import contextlib, sys
        >>> with contextlib.redirect_stderr(sys.stdout):
        ...     main(["config", "show", "--set", "loger.level=INFO"])
        error: invalid configuration:
          loger: unknown section (did you mean 'logger'?)
        2
    """
    args = _parser().parse_args(argv)
    try:
        if args.command == "config" and args.config_command == "schema":
            return _schema()
        if args.command == "reap" and not 0 < args.stale_after < math.inf:
            raise UsageError(
                f"--stale-after must be more than 0 seconds (got {args.stale_after:g})"
            )
        if args.command == "server":
            return _serve(
                args.folder,
                args.port,
                args.workers,
                args.reap_after,
                host=args.host,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                replicas=args.replicas,
                artifacts=args.artifacts_destination,
            )
        container = _container(args.profile, args.overrides)
        if args.command == "config":
            return _show(container)
        if args.command == "check":
            return _check(container, send_alert=args.alert)
        if args.command == "recover":
            return _recover(container, args.hosts)
        if args.command == "reap":
            return _reap(container, args.stale_after)
        return _run(args.job, container)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _container(profile: str | None, overrides: list[str]) -> Container:
    from regression_model_template.containers import ConfigError, Container, validate_config

    try:
        container = Container(config=_parse_overrides(overrides), profile=profile)
        validate_config(container.config())
    except ConfigError as error:
        raise UsageError(str(error)) from None
    return container


def _parse_overrides(overrides: list[str]) -> dict[str, dict[str, T.Any]]:
    from regression_model_template.containers import parse_value

    tree: dict[str, dict[str, T.Any]] = {}
    for item in overrides:
        path, sep, raw = item.partition("=")
        section, dot, field = path.strip().partition(".")
        if not sep or not dot or not section or not field:
            shown = item if "://" not in item else item.partition("://")[0] + "://***"
            raise UsageError(
                f"--set {shown!r}: expected SECTION.FIELD=VALUE, e.g. logger.level=INFO"
            )
        tree.setdefault(section, {})[field] = parse_value(section, field, raw)
    return tree


def _schema() -> int:
    from regression_model_template.containers import SECTIONS

    schema = {
        "title": "regression_model_template configuration",
        "type": "object",
        "additionalProperties": False,
        "properties": {name: model.model_json_schema() for name, model in SECTIONS.items()},
    }
    print(json.dumps(schema, indent=2))
    return 0


def _show(container: Container) -> int:
    from regression_model_template.containers import effective_config

    settings = effective_config(container)
    width = max(len(path) for path in settings)
    for path, (value, source) in settings.items():
        print(f"{path:<{width}}  {json.dumps(value)}  # {source}")
    return 0


def _run(job: str, container: Container) -> int:
    from regression_model_template import jobs
    from regression_model_template.io.services import ServiceError

    try:
        result = jobs.run(job, container)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # the job failed: logged, alerted, run FAILED
        cause = container.mlflow_service().redact(f"{type(error).__name__}: {error}")
        print(f"error: job {job} failed: {cause.splitlines()[0]}", file=sys.stderr)
        return 1
    _report(result, container)
    return 0


def _report(result: T.Any, container: Container) -> None:
    """Tell where the results are, and how to open them."""
    service = container.mlflow_service()
    metrics = " ".join(f"{name}={value:.4g}" for name, value in result.metrics.items())
    print(f"run {result.run_id}: {metrics}")
    if hasattr(result, "model_version"):
        print(f"model {service.registry_name} version {result.model_version}")
    uri = service.redact(service.tracking_uri)
    if uri.startswith(("http://", "https://")):
        print(f"open the results: {uri}")
    else:
        print(f"open the results: mlflow ui --backend-store-uri {uri}")


def _check(container: Container, send_alert: bool = False) -> int:
    """Start each service on its own and report; exit 1 when one cannot work."""
    import functools

    from regression_model_template.io.errors import translated_errors
    from regression_model_template.io.services import Service, ServiceError

    checks: list[tuple[str, T.Callable[[], Service], T.Callable[[T.Any], str]]] = [
        ("logger", container.logger_service, _check_logger),
        ("alerts", container.alerts_service, functools.partial(_check_alerts, send=send_alert)),
        ("mlflow", container.mlflow_service, _check_mlflow),
    ]
    failed = 0
    for name, provider, probe in checks:
        service = provider()
        kind = type(service).__name__
        try:  # whatever it raises is this service failing: one line, never a traceback
            with translated_errors(kind, "check", "failed", service.secrets()), service:
                status = probe(service)
        except ServiceError as error:
            status, failed = f"FAILED {error}", failed + 1
        print(f"{name:<7} {status}")
    return 1 if failed else 0


def _recover(container: Container, hosts: T.Sequence[str]) -> int:
    """Send the spooled values of dead processes; exit 1 when some are waiting or refused.

    Runs of other hosts are left, said in one line (they are not waiting on this host).
    """
    from regression_model_template.io.recovery import Elsewhere
    from regression_model_template.io.services import ServiceError

    service = container.mlflow_service()
    elsewhere: list[Elsewhere] = []
    try:
        reports = service.recover(hosts, elsewhere)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for report in reports:
        print(report.summary())
    if elsewhere:
        counts = collections.Counter(run.host for run in elsewhere)
        where = ", ".join(f"{count} of {host}" for host, count in sorted(counts.items()))
        print(
            f"left {len(elsewhere)} run(s) of other hosts in the spool ({where}): "
            "`recover --host NAME` takes a host's runs once its jobs are dead"
        )
    elif not reports:
        print("nothing to recover for this store")
    return 1 if any(report.waiting or report.refused for report in reports) else 0


def _reap(container: Container, stale_after: float) -> int:
    """End the runs whose heartbeat is older than ``stale_after``: one line each; exit 0."""
    from regression_model_template.io import reaper, stores
    from regression_model_template.io.errors import translated_errors
    from regression_model_template.io.services import ServiceError

    service = container.mlflow_service()
    what = f"cannot reap runs in {service.redact(service.tracking_uri)}"
    try:
        stores.probe_server(service.tracking_uri, service.connect_timeout)
        with translated_errors("MlflowService", "tracking_uri", what, service.secrets()):
            reaped = reaper.reap(service.client(), stale_after)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for run in reaped:
        print(run.describe())
    if not reaped:
        heard = f"every RUNNING run with a heartbeat was heard within {stale_after:g} s"
        print(f"nothing to reap: {heard}")
    return 0


def _check_logger(service: T.Any) -> str:
    service.logger().debug("check: the log sink is writable")
    return f"ok: writing to {service.sink}"


def _check_alerts(service: T.Any, send: bool) -> str:
    from regression_model_template.io.services import ServiceError

    channels = service.channels
    if service.refused and not send:
        raise ServiceError("AlertsService", "urls", "unusable: " + "; ".join(service.refused))
    if channels == ["console"] and not service.refused:
        why = "alerts.enable is false" if not service.enable else "no desktop, no alerts.urls"
        if send:
            sent = f"no test alert sent: nowhere to send it ({why})"
            return f"ok: {sent}; alerts print to the console"
        return f"ok: alerts print to the console ({why})"
    if not send:
        return f"ok: alerts go to {', '.join(channels)} (check --alert sends a test alert)"
    deliveries = service.probe(f"{PROG} check", "A test alert from `check --alert`.")
    channels = [d.channel for d in deliveries]
    lines = [f"{d.channel}: {d.failure or 'delivered'}" for d in deliveries]
    failed = [d.channel for d in deliveries if d.failure is not None]
    if failed:
        raise ServiceError("AlertsService", "urls", "not delivered: " + "; ".join(lines))
    return "ok: test alert delivered to " + ", ".join(channels)


def _check_mlflow(service: T.Any) -> str:
    run_config = service.RunConfig(name="check", log_system_metrics=False)
    with service.run_context(run_config) as run:
        service.log_params({"check": "ok"})
    service.client().delete_run(run.info.run_id)
    return f"ok: tracking store {service.redact(service.tracking_uri)} is reachable and writable"


def _serve(
    folder: str,
    port: int,
    workers: int,
    reap_after: float,
    host: str = "127.0.0.1",
    tls_cert: str | None = None,
    tls_key: str | None = None,
    replicas: int = 1,
    artifacts: str | None = None,
) -> int:
    """Run the team stack until Ctrl-C or SIGTERM, or until it stops answering.

    What must answer is the server; with replicas, the balancer (the stack restarts replicas
    itself). With replicas, SIGHUP restarts them one at a time (``Replicas.restart``);
    otherwise, and while the stack starts, it is ignored, with a line saying so.
    """
    import signal
    from pathlib import Path

    from regression_model_template.io.stop_signals import Terminated, stop_once
    from regression_model_template.server import auth, tls
    from regression_model_template.server.artifacts import artifacts_destination
    from regression_model_template.server.stack import team_server
    from regression_model_template.server.tracking_server import is_loopback, running

    if not 0 < port < 65536 or workers < 1 or replicas < 1:
        raise UsageError(
            "--port must be 1-65535, --workers and --replicas at least 1 "
            f"(got {port}, {workers}, {replicas})"
        )
    if not 0 <= reap_after < math.inf:
        raise UsageError(f"--reap-after must be 0 (off) or more seconds (got {reap_after:g})")
    if host in ("0.0.0.0", "::", ""):
        # Every address at once: no certificate, nor MLflow's allowed hosts, could name the
        # one a job uses. Refused rather than guessed.
        raise UsageError(
            f"--host {host or repr(host)} would listen on every address, but the certificate "
            "and MLflow's allowed hosts must name the one jobs connect to: give that address "
            "or name (e.g. --host 198.18.9.1)"
        )
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together: give both, or neither")
    try:
        if not is_loopback(host):
            auth.admin_from(os.environ)
        if tls_cert is not None and tls_key is not None:
            tls.user_pair(Path(tls_cert), Path(tls_key), host)
        artifacts_destination(artifacts, Path(folder))
    except ValueError as error:
        raise UsageError(str(error)) from None
    print(f"starting PostgreSQL and mlflow server in {folder}/ ...", flush=True)
    serving: list[T.Any] = []  # the stack's replicas, once it is ready

    def hangup(*_: object) -> None:  # runs in this thread: it only asks, the stack restarts
        if serving and serving[0] is not None:
            serving[0].restart(wait=False)
        else:
            print("SIGHUP ignored: it restarts replicas (--replicas 2 or more) once ready",
                  file=sys.stderr, flush=True)  # fmt: skip

    # Taken before the stack starts and given back after it stopped: SIGHUP's default would
    # end this process at once, leaving PostgreSQL running.
    previous = signal.signal(signal.SIGHUP, hangup)
    try:
        # A second Ctrl-C (or a supervisor's repeated SIGTERM) must not cut the stop short:
        # that would leave the server's processes behind. stop_once ignores it.
        with (
            stop_once(signal.SIGINT, signal.SIGTERM),
            team_server(
                Path(folder),
                port,
                workers,
                reap_after=reap_after,
                host=host,
                tls_cert=Path(tls_cert) if tls_cert else None,
                tls_key=Path(tls_key) if tls_key else None,
                replicas=replicas,
                artifacts=artifacts,
            ) as stack,
        ):
            serving.append(stack.replicas)
            print(_ready(stack, folder, host, reap_after), flush=True)
            misses = 0  # consecutive /health checks without an answer
            while misses < 3:
                time.sleep(2.0)
                # with replicas the stack restarts them: the balancer must answer
                answers = (
                    stack.replicas.serving()
                    if stack.replicas is not None
                    else running(stack.url, certificate=stack.certificate)
                )
                misses = 0 if answers else misses + 1
            output = "balancer/haproxy.log" if stack.replicas is not None else "server.log"
            print(f"error: the tracking server stopped answering; see {folder}/{output}",
                  file=sys.stderr)  # fmt: skip
            return 1
    except (KeyboardInterrupt, Terminated):
        print("stopped: mlflow server and PostgreSQL", flush=True)
        return 0
    except Exception as error:  # any failure to start: one line, exit 1
        print(f"error: the tracking stack did not start: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGHUP, previous)


def _ready(stack: T.Any, folder: str, host: str, reap_after: float) -> str:
    """The ready message: where the stack is, and how jobs connect (never a password)."""
    from pathlib import Path

    from regression_model_template.io.masking import mask_uri
    from regression_model_template.io.reaper import period
    from regression_model_template.server.tls import fingerprint
    from regression_model_template.server.tracking_server import is_loopback

    outside = stack.cluster.parent != Path(folder).absolute()
    reaping = (
        f"reaper: runs whose heartbeat is older than {reap_after:g} s are ended KILLED "
        f"(checked every {period(reap_after):g} s)"
        if reap_after
        else "reaper: off (--reap-after 0); `reap --stale-after SECONDS` ends stale runs"
    )
    moved = f" (the postgres user could not reach {folder}/)" if outside else ""
    lines = [
        f"tracking server ready: {stack.url} (database {mask_uri(stack.database)})",
        f"  PostgreSQL cluster in {stack.cluster}/{moved}",
    ]
    job = f"MLFLOW_TRACKING_URI={stack.url}"
    if stack.certificate is not None:
        lines.append(f"  TLS certificate {stack.certificate} ({fingerprint(stack.certificate)})")
        job += f" MLFLOW_TRACKING_SERVER_CERT_PATH={stack.certificate}"
    if not is_loopback(host):
        lines.append(
            "  basic auth: jobs also set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(a user's; the admin adds users, see the README)"
        )
    lines.append(f"  artifacts in {mask_uri(stack.artifacts)} (jobs upload through the server)")
    if stack.replicas is not None:
        lines.append(
            f"  {stack.replicas.count} replicas behind haproxy (logs "
            f"{folder}/server-r*.log); `kill -HUP {os.getpid()}` restarts them one at a time"
        )
    lines += [f"  {job} {PROG} run training --profile server", f"  {reaping}", "Ctrl-C stops it."]
    return "\n".join(lines)


def entry_point() -> None:
    """Console script: exit with ``main()``'s code."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`... | head`): no traceback; stop Python's exit flush failing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)
