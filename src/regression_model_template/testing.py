"""pytest plugin: fixtures to test jobs against the container in a few lines.

Installed with the package (entry point ``pytest11``), so any project that depends on
``regression-model-template`` gets these fixtures without a ``conftest.py``:

- ``service_container``: a fresh, wired :class:`regression_model_template.containers.Container`
  per test: MLflow on a SQLite store under ``tmp_path`` (spool in ``tmp_path/spool``), alerts
  recorded instead of shown, logs written to ``tmp_path/logs/job.log``. Unwired and shut down
  after the test.
- ``alerts_outbox``: the alerts sent during the test, in order, as
  ``Alert(title, message, level)``.
- ``logger_caplog``: loguru records in pytest's ``caplog``.
- ``service_container_packages``: override it to wire your own job packages.
- ``mlflow_store``: the URI of a fresh SQLite tracking store under ``tmp_path``.

Helpers: :func:`local_mlflow_server` (a real ``mlflow server`` on 127.0.0.1), :func:`free_port`,
:func:`clean_environ` (an environment for subprocesses without your shell's settings),
:func:`mlflow_globals_restored` and :func:`other_host` (a network namespace: another machine on
a private link, to test a server from outside).

Example (a test in your project)::

    from regression_model_template.containers import lifespan

    def test_my_job_alerts(service_container, alerts_outbox):
        with lifespan(service_container):
            my_job()  # an @inject function wired to the container
        assert alerts_outbox[-1].title == "my_job"
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import typing as T
from dataclasses import dataclass
from pathlib import Path

import pydantic
import pytest
from dependency_injector import providers
from loguru import logger

from regression_model_template.containers import Container
from regression_model_template.io.services import AlertsService
from regression_model_template.io.stores import MLFLOW_GLOBALS, environ_restored
from regression_model_template.server.processes import free_port
from regression_model_template.server.tracking_server import mlflow_server

__all__ = [
    "TEST_NETWORK",
    "Alert",
    "OtherHost",
    "OtherHostUnavailable",
    "RecordingAlertsService",
    "clean_environ",
    "free_port",
    "local_mlflow_server",
    "mlflow_globals_restored",
    "other_host",
]


class Alert(T.NamedTuple):
    """One alert sent during a test: its title, message and level.

    Example:
        >>> Alert("Training", "rmse=53.1", "success").level
        'success'
    """

    title: str
    message: str
    level: str = "info"


class RecordingAlertsService(AlertsService):
    """Alerts kept in an outbox list instead of being shown or printed.

    Example:
        >>> outbox: list[Alert] = []
        >>> alerts = RecordingAlertsService.recording_into(outbox)
        >>> with alerts:
        ...     alerts.notify("Training", "done")
        >>> outbox
        [Alert(title='Training', message='done', level='info')]
    """

    _outbox: list[Alert] = pydantic.PrivateAttr(default_factory=list)

    @classmethod
    def recording_into(cls, outbox: list[Alert]) -> RecordingAlertsService:
        """Return a service that appends each alert to ``outbox``.

        Example:
            >>> RecordingAlertsService.recording_into([]).channel
            'console'
        """
        service = cls(enable=False)
        service._outbox = outbox
        return service

    def start(self) -> None:
        """Nothing to choose: alerts are recorded.

        Example:
            >>> RecordingAlertsService().start()
        """

    def notify(self, title: str, message: str, level: str = "info") -> None:
        """Record the alert (every call: repeats are not folded here).

        Example:
            >>> RecordingAlertsService().notify("title", "message", level="warning")
        """
        self._outbox.append(Alert(title, message, level))


@pytest.fixture(scope="session")
def _mlflow_template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created once: building the schema takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path: Path, _mlflow_template_store: Path) -> str:
    """The URI of a fresh SQLite tracking store in ``tmp_path/mlruns`` (schema already built)."""
    path = tmp_path / "mlruns" / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_mlflow_template_store, path)
    return f"sqlite:///{path}"


@pytest.fixture
def alerts_outbox() -> list[Alert]:
    """The alerts sent through ``service_container`` during the test, in order."""
    return []


@pytest.fixture
def service_container_packages() -> list[str]:
    """Packages to wire into ``service_container`` besides the bundled jobs.

    Override it in your ``conftest.py``: ``return ["my_project.jobs"]``.
    """
    return []


@pytest.fixture
def service_container(
    tmp_path: Path,
    mlflow_store: str,
    alerts_outbox: list[Alert],
    service_container_packages: list[str],
) -> T.Iterator[Container]:
    """A fresh, wired container isolated in ``tmp_path``; shut down and unwired afterwards."""
    container = Container(
        config={
            "logger": {"sink": str(tmp_path / "logs" / "job.log"), "colorize": False},
            "mlflow": {
                "tracking_uri": mlflow_store,
                "experiment_name": "tests",
                "spool_dir": str(tmp_path / "spool"),
            },
        },
        profile=False,
        environ={},
    )
    container.alerts_service.override(
        providers.Object(RecordingAlertsService.recording_into(alerts_outbox))
    )
    if service_container_packages:
        container.wire(packages=service_container_packages)
    with mlflow_globals_restored():
        try:
            yield container
        finally:
            container.services.shutdown()
            container.unwire()


@contextlib.contextmanager
def mlflow_globals_restored() -> T.Iterator[None]:
    """Undo what code run inside leaves in MLflow's globals: open runs, URIs, environment.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``;
    without this, one test's store would leak into the next test's configuration.

    Example:
        >>> import os
        >>> _ = os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        >>> with mlflow_globals_restored():
        ...     os.environ["MLFLOW_EXPERIMENT_ID"] = "7"
        >>> "MLFLOW_EXPERIMENT_ID" in os.environ
        False
    """
    with environ_restored(MLFLOW_GLOBALS):
        saved = {name: os.environ.get(name) for name in MLFLOW_GLOBALS}
        try:
            yield
        finally:
            if "mlflow" in sys.modules:
                import mlflow

                while mlflow.active_run() is not None:
                    mlflow.end_run("KILLED")
                mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # type: ignore[arg-type]
                mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])  # type: ignore[arg-type]


@pytest.fixture
def logger_caplog(caplog: pytest.LogCaptureFixture) -> T.Iterator[pytest.LogCaptureFixture]:
    """Pytest's ``caplog``, receiving loguru records too (``caplog.messages``, ``.records``)."""
    handler_id = logger.add(caplog.handler, format="{message}", level=0)
    try:
        yield caplog
    finally:
        logger.remove(handler_id)


# %% helpers for tests that run subprocesses or a real tracking server

#: Environment prefixes of settings that would leak from a user's shell into a test.
LEAKY_PREFIXES = ("MLFLOW_", "RMT_")


def clean_environ(**extra: str) -> dict[str, str]:
    """Return this process's environment without MLflow's or this package's settings, plus extra.

    Telemetry is always off. In-process MLflow use writes ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_EXPERIMENT_ID`` into ``os.environ``: a subprocess gets only what a test gives it.

    Example:
        >>> environ = clean_environ(RMT_LOGGER__LEVEL="INFO")
        >>> environ["RMT_LOGGER__LEVEL"], environ["MLFLOW_DISABLE_TELEMETRY"]
        ('INFO', 'true')
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY_PREFIXES)}
    environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    environ.update(extra)
    return environ


@contextlib.contextmanager
def local_mlflow_server(
    root: Path, startup_timeout: float = 60.0, port: int | None = None
) -> T.Iterator[str]:
    """Run a real ``mlflow server`` on 127.0.0.1 for the block; yield its URL.

    SQLite store and proxied artifacts under ``root``, one worker (ready in ~10 s), started
    and stopped by :func:`regression_model_template.server.tracking_server.mlflow_server`, in an
    environment without your shell's MLflow settings (:func:`clean_environ`).

    ``port``: the port to listen on (default: a free one). Starting again with the same ``root``
    and ``port`` brings back the same server, as after an outage.

    Raises:
        RuntimeError: the server exited or did not answer ``/health`` within
            ``startup_timeout`` seconds; the message ends with its output.
    """
    with mlflow_server(
        f"sqlite:///{root / 'mlflow.db'}",
        root / "artifacts",
        port=port,
        startup_timeout=startup_timeout,
        env=clean_environ(),
    ) as url:
        yield url


# %% another host: a network namespace on a private link to this one

#: The range set aside for network tests (RFC 2544): :func:`other_host` takes its addresses
#: from it and from no other range.
TEST_NETWORK = ipaddress.IPv4Network("198.18.0.0/15")

_LINK_PREFIX = 24  # one /24 per link: this host's end is .1, the other host's .2
_LINKS = 2 ** (_LINK_PREFIX - TEST_NETWORK.prefixlen)  # 512 links in the range
_NAMESPACE_PREFIX = "rmt-"  # namespaces are named rmt-PID-COUNTER
_counter = itertools.count()
_counter_lock = threading.Lock()


class OtherHostUnavailable(RuntimeError):
    """No network namespace can be made here: not root, no ``ip`` program, or the kernel refuses."""


@dataclass(frozen=True)
class OtherHost:
    """Another host for a test: a network namespace joined to this one by a veth pair.

    Its only route is its link: it reaches :attr:`gateway` (this host's end) and nothing else.

    Example:
        >>> host = OtherHost("rmt-1-0", "198.18.3.2", "198.18.3.1", "rmt3h")
        >>> host.command(["curl", "https://198.18.3.1:5000/health"])[:4]
        ['ip', 'netns', 'exec', 'rmt-1-0']
    """

    name: str  #: the network namespace's name
    address: str  #: the other host's address (the namespace's end of the link)
    gateway: str  #: this host's address on the link: where a server for the other host binds
    device: str  #: this host's end of the veth pair

    def command(self, argv: T.Sequence[str]) -> list[str]:
        """``argv`` run on the other host (for ``subprocess``): prefixed by ``ip netns exec``.

        The command keeps this process's user, files and environment; only its network differs.
        """
        return ["ip", "netns", "exec", self.name, *argv]

    @contextlib.contextmanager
    def cut(self) -> T.Iterator[None]:
        """A network partition for the block: the link is down, then up again.

        Connections are not reset: packets are lost both ways, as when a cable is pulled.
        """
        _ip("link", "set", self.device, "down")
        try:
            yield
        finally:
            _ip("link", "set", self.device, "up")


@contextlib.contextmanager
def other_host() -> T.Iterator[OtherHost]:
    """Make another host for the block: a network namespace and a veth pair to this host.

    The link is a ``/24`` of :data:`TEST_NETWORK` that no interface or route here uses; this
    host's end is ``.1`` (:attr:`OtherHost.gateway`), the namespace's ``.2``; ``lo`` is up in the
    namespace. Parallel test processes get different namespaces and links (the name holds the
    process id; claiming a link creates its device, which fails for the second claimant).
    Everything is removed when the block ends, also when it raises: the processes still running
    in the namespace (killed), the veth pair, the namespace. Namespaces left by a killed test
    process are removed on the next call.

    Needs root and ``ip`` (iproute2); Linux only.

    Example (not run here: it needs root)::

        from regression_model_template.server.stack import team_server

        with other_host() as host, team_server(folder, host=host.gateway) as stack:
            curl = ["curl", "--cacert", str(stack.certificate), f"{stack.url}/health"]
            subprocess.run(host.command(curl), check=True)  # from the other host
            with host.cut():
                ...  # a partition: the other host's packets are lost both ways

    Raises:
        OtherHostUnavailable: not root, no ``ip`` program, or the namespace could not be made
            (the message says which, with ``ip``'s own words).
    """
    _check_can_make_namespaces()
    _remove_orphans()
    with _counter_lock:
        name = f"{_NAMESPACE_PREFIX}{os.getpid()}-{next(_counter)}"
    try:
        _ip("netns", "add", name)
    except RuntimeError as error:
        raise OtherHostUnavailable(f"cannot make a network namespace here: {error}") from None
    host: OtherHost | None = None
    try:
        host = _link(name)
        _ip("link", "set", "lo", "up", namespace=name)
        yield host
    finally:
        _remove(name, host.device if host is not None else None)


def _check_can_make_namespaces() -> None:
    if not sys.platform.startswith("linux"):
        raise OtherHostUnavailable(f"network namespaces are Linux only (this is {sys.platform})")
    if shutil.which("ip") is None:
        raise OtherHostUnavailable(
            "the `ip` program is not installed (Debian: `apt-get install iproute2`)"
        )
    if os.geteuid() != 0:
        raise OtherHostUnavailable(
            f"making a network namespace needs root; this process runs as uid {os.geteuid()}"
        )


def _link(namespace: str) -> OtherHost:
    """Claim a free ``/24`` of the test range: a veth pair, addressed and up, into ``namespace``."""
    start = (os.getpid() * 7 + int(namespace.rsplit("-", 1)[1])) % _LINKS  # spread the claims
    for offset in range(_LINKS):
        index = (start + offset) % _LINKS
        first = int(TEST_NETWORK.network_address) + index * 2 ** (32 - _LINK_PREFIX)
        network = ipaddress.IPv4Network((first, _LINK_PREFIX))
        if _in_use(network):
            continue
        device, peer = f"rmt{index}h", f"rmt{index}n"
        try:  # the device's name is the claim: a second process fails here ("File exists")
            _ip("link", "add", device, "type", "veth", "peer", "name", peer, "netns", namespace)
        except RuntimeError:
            continue
        gateway, address = str(network[1]), str(network[2])
        _ip("addr", "add", f"{gateway}/{_LINK_PREFIX}", "dev", device)
        _ip("link", "set", device, "up")
        _ip("addr", "add", f"{address}/{_LINK_PREFIX}", "dev", peer, namespace=namespace)
        _ip("link", "set", peer, "up", namespace=namespace)
        return OtherHost(namespace, address, gateway, device)
    raise OtherHostUnavailable(f"every /{_LINK_PREFIX} of {TEST_NETWORK} is in use here")


def _in_use(network: ipaddress.IPv4Network) -> bool:
    """Whether an address or a route of this host overlaps ``network`` (``default`` aside)."""
    words = _ip("-4", "-o", "addr", "show").split() + _ip("-4", "route", "show").split()
    for word in words:
        with contextlib.suppress(ValueError):
            if word.count(".") == 3 and ipaddress.IPv4Network(word, strict=False).overlaps(network):
                return True
    return False


def _remove(namespace: str, device: str | None) -> None:
    """Kill what runs in ``namespace``, then remove the veth pair and the namespace."""
    with contextlib.suppress(RuntimeError):
        for pid in _ip("netns", "pids", namespace).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    if device is not None:
        with contextlib.suppress(RuntimeError):  # gone already when the namespace went first
            _ip("link", "del", device)
    with contextlib.suppress(RuntimeError):
        _ip("netns", "del", namespace)


def _remove_orphans() -> None:
    """Remove the namespaces of test processes that no longer run (killed before cleaning up)."""
    for line in _ip("netns", "list").splitlines():
        name = line.split(" ", 1)[0]
        parts = name.split("-")
        if len(parts) != 3 or f"{parts[0]}-" != _NAMESPACE_PREFIX or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            _remove(name, None)
        except PermissionError:
            pass


def _ip(*args: str, namespace: str | None = None) -> str:
    """``ip ARGS``'s output (run in ``namespace`` when given); ``RuntimeError`` with its words."""
    prefix = ["ip", "netns", "exec", namespace, "ip"] if namespace else ["ip"]
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.stdout}")
    return done.stdout
