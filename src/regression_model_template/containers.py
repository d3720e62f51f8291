"""The container: configuration -> services -> lifecycles -> wiring.

``Container`` loads its configuration layers (defaults < profile < environment < explicit
dict, see :mod:`regression_model_template.config`) and builds each service from the merged,
wholly validated configuration: a mistake anywhere is one :class:`ConfigError` listing every
bad path, whichever service is asked for first.

``lifespan(container)`` (or ``container.init_resources()`` / ``shutdown_resources()``) starts
logger -> alerts -> mlflow and stops them in reverse order, with rollback when a start fails.
Jobs declare what they need with ``Provide[Container.<service>]`` markers and :func:`inject`.

Example:
    >>> import tempfile
    >>> store = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    >>> container = Container(
    ...     config={"alerts": {"enable": False}, "mlflow": {"tracking_uri": store}},
    ...     profile=None,
    ...     environ={},
    ... )
    >>> with lifespan(container):
    ...     container.alerts_service().notify("Hello", "services are up")
    [regression_model_template] Hello: services are up
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import typing as T

import pydantic
from dependency_injector import containers, providers
from dependency_injector import wiring as di_wiring
from loguru import logger

# Configuration names are re-exported: they were first published from this module.
from regression_model_template.config import (
    SECTIONS,
    SERVICES,
    ConfigError,
    ConfigValue,
    JobsConfig,
    Layer,
    effective_values,
    parse_value,
    profile_path,
    read_layers,
    validate_config,
)
from regression_model_template.io.errors import translated_errors
from regression_model_template.io.masking import client_secrets
from regression_model_template.io.services import (
    AlertsService,
    LoggerService,
    MlflowService,
    Service,
    ServiceError,
)

__all__ = [
    "SECTIONS",
    "SERVICES",
    "ConfigError",
    "ConfigValue",
    "Container",
    "UnwiredError",
    "effective_config",
    "inject",
    "lifespan",
    "parse_value",
    "profile_path",
    "validate_config",
]

# %% CONTAINER


S = T.TypeVar("S", bound=pydantic.BaseModel)


def _section(model: type[S], name: str, tree: T.Mapping[str, T.Any] | None) -> S:
    """Validate the whole configuration, then return the model of one section.

    Validating everything, not just ``name``, lists every mistake at once: the user does not
    fix the logger section only to meet the mlflow section's error next.
    """
    section = validate_config(tree)[name]
    assert isinstance(section, model)
    return section


def _client_secrets() -> list[str]:
    """The credentials MLflow's client sends (``MLFLOW_TRACKING_PASSWORD``, ``..._TOKEN``).

    Read from ``os.environ`` whatever ``environ`` the container was given: MLflow reads them
    there itself, at each request.
    """
    return client_secrets(os.environ)


def _logger_service(tree: T.Mapping[str, T.Any] | None) -> LoggerService:
    """The logger section's service, masking the credentials MLflow sends in every line."""
    service = _section(LoggerService, "logger", tree)
    service.mask(_client_secrets())
    return service


def _alerts_service(tree: T.Mapping[str, T.Any] | None) -> AlertsService:
    """The alerts section's service, masking the credentials MLflow sends in every alert."""
    service = _section(AlertsService, "alerts", tree)
    service.mask(_client_secrets())
    return service


def _mlflow_service(
    tree: T.Mapping[str, T.Any] | None, logger_service: LoggerService, alerts_service: AlertsService
) -> MlflowService:
    """The mlflow section's service, its runs' logs written like the logger's lines.

    The run's ``run.log`` uses the LoggerService's format and level, and masks the alert URLs'
    secrets and the credentials MLflow sends as well as the MlflowService's own (its messages
    mask them too): the services never see each other, the container hands the values over.
    """
    service = _section(MlflowService, "mlflow", tree)
    secrets = [*alerts_service.secrets(), *_client_secrets()]
    service.log_runs_like(logger_service.format, logger_service.level, secrets)
    return service


def _services(
    config: T.Mapping[str, T.Any] | None, *services: providers.Provider[Service]
) -> T.Iterator[list[Service]]:
    """Resource: validate the whole configuration, start services in order, stop in reverse."""
    validate_config(config)
    with _started([provider() for provider in services]) as started:
        yield started


class _LayeredContainer(containers.DynamicContainer):
    """The container instances: they remember their configuration layers.

    dependency-injector stores loaded configuration as an override, so its own
    ``reset_override()`` would also drop the configuration; here it reloads the layers.
    """

    config_layers: list[Layer]

    def reset_override(self) -> None:
        """Reset every override, then reload the configuration layers."""
        super().reset_override()
        for layer in getattr(self, "config_layers", []):
            self.config.from_dict(layer.values)  # type: ignore[attr-defined]


class Container(containers.DeclarativeContainer):
    """The three services, configured from layers, started in order, injected into jobs.

    Args:
        config: explicit settings, the highest layer (merged: other values are kept).
        profile: a profile name or YAML path; None reads ``RMT_PROFILE``, else ``local`` if
            it exists; False loads no profile.
        environ: the environment to read (default: ``os.environ``).
        **overriding_providers: providers to override, as with dependency-injector.

    Example:
        >>> container = Container(config={"logger": {"level": "INFO"}}, environ={})
        >>> container.logger_service().level
        'INFO'
        >>> container.mlflow_service().experiment_name
        'regression_model_template'
    """

    instance_type = _LayeredContainer

    # Wire the bundled jobs. Wire your own package with `container.wire(packages=["my_jobs"])`.
    # keep_cache: the methods already inspected are not inspected again when a job re-wires.
    wiring_config = containers.WiringConfiguration(
        packages=["regression_model_template.jobs"], keep_cache=True
    )

    # -- configuration: sections `logger`, `alerts`, `mlflow`, `jobs` (see SECTIONS)
    config = providers.Configuration(strict=False)

    # -- services: one instance each, validated by their pydantic models
    logger_service = providers.ThreadSafeSingleton(_logger_service, config)
    alerts_service = providers.ThreadSafeSingleton(_alerts_service, config)
    mlflow_service = providers.ThreadSafeSingleton(
        _mlflow_service, config, logger_service, alerts_service
    )

    # -- settings of the bundled jobs
    jobs_config = providers.ThreadSafeSingleton(_section, JobsConfig, "jobs", config)

    # -- lifecycle: init_resources() starts logger -> alerts -> mlflow; shutdown stops them
    services = providers.Resource(
        _services, config, logger_service.provider, alerts_service.provider, mlflow_service.provider
    )

    def __new__(
        cls,
        config: T.Mapping[str, T.Any] | None = None,
        *,
        profile: str | os.PathLike[str] | T.Literal[False] | None = None,
        environ: T.Mapping[str, str] | None = None,
        **overriding_providers: T.Any,
    ) -> Container:
        """Build the container and load its configuration layers (see the class docstring)."""
        layers = read_layers(profile, os.environ if environ is None else environ, config)
        container = super().__new__(cls, **overriding_providers)
        container.config_layers = layers
        for layer in layers:
            container.config.from_dict(layer.values)
        return container


def effective_config(container: Container) -> dict[str, ConfigValue]:
    """Return every setting's effective value (secrets masked) and the layer it comes from.

    Example:
        >>> container = Container(config={"logger": {"level": "INFO"}}, profile=False, environ={})
        >>> settings = effective_config(container)
        >>> settings["logger.level"]
        ConfigValue(value='INFO', source='explicit')
        >>> settings["alerts.enable"]
        ConfigValue(value=True, source='default')
    """
    return effective_values(container.config(), getattr(container, "config_layers", []))


# %% LIFECYCLES

_LIFESPAN_LOCK = threading.RLock()
_LIFESPAN_DEPTH: dict[int, int] = {}


@contextlib.contextmanager
def _started(services: T.Sequence[Service]) -> T.Iterator[list[Service]]:
    """Start services in order; stop in reverse, all of them, reporting every failure."""
    started: list[Service] = []
    try:
        for service in services:
            name = type(service).__name__
            # Whatever a start raises is that service failing: a ServiceError naming it.
            with translated_errors(name, "start", "failed", service.secrets()):
                service.start()
            started.append(service)
            logger.info("Started {}", name)
            logger.debug("{!r}", service)  # settings, secrets masked
    except BaseException as error:
        # The service and the cause: its settings are in `config show`, not in this line.
        failed = type(services[len(started)]).__name__
        named = isinstance(error, ServiceError) and error.service == failed
        logger.error("Could not start {}", error if named else f"{failed}: {error!r}")
        for failure in _stop_all(started):
            error.add_note(f"while rolling back: {failure}")
        raise
    try:
        yield started
    finally:
        failures = _stop_all(started)
        if failures:
            summary = "; ".join(str(f) for f in failures)
            raise ServiceError(
                "Container", "stop", f"{len(failures)} service(s) failed to stop: {summary}"
            ) from ExceptionGroup("stop failures", failures)


def _stop_all(started: list[Service]) -> list[Exception]:
    failures: list[Exception] = []
    for service in reversed(started):
        name = type(service).__name__
        try:
            logger.info("Stopping {}", name)
            service.stop()
        except Exception as exc:
            logger.error("Could not stop {}: {}", name, exc)
            failures.append(exc)
    started.clear()
    return failures


@contextlib.contextmanager
def lifespan(container: Container) -> T.Iterator[Container]:
    """Start the container's services (logger -> alerts -> mlflow) and stop them on exit.

    The configuration is validated first. When a start fails, the services already started
    are stopped (reverse order) and the start error is raised. On exit every service is
    stopped, even when one stop raises; stop failures are reported together as one
    ``ServiceError``. Entering twice, or from several threads, starts each service once: the
    last exit stops them.

    Example:
        >>> import tempfile
        >>> store = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
        >>> container = Container(config={"mlflow": {"tracking_uri": store}}, environ={})
        >>> with lifespan(container):
        ...     with lifespan(container):  # nested: nothing starts twice
        ...         print(container.mlflow_service().tracking_uri == store)
        True
    """
    key = id(container)
    with _LIFESPAN_LOCK:
        if _LIFESPAN_DEPTH.get(key, 0) == 0:
            container.services.init()
        _LIFESPAN_DEPTH[key] = _LIFESPAN_DEPTH.get(key, 0) + 1
    try:
        yield container
    finally:
        with _LIFESPAN_LOCK:
            _LIFESPAN_DEPTH[key] -= 1
            if _LIFESPAN_DEPTH[key] == 0:
                del _LIFESPAN_DEPTH[key]
                container.services.shutdown()


# %% WIRING

F = T.TypeVar("F", bound=T.Callable[..., T.Any])


def inject(fn: F) -> F:
    """Like dependency-injector's ``@inject``, with a clear error when nothing is wired.

    Without a wired container, dependency-injector passes its ``Provide`` markers themselves
    and the job fails later with ``AttributeError``; this fails at the call instead.

    Example:
        >>> from dependency_injector.wiring import Provide
        >>> @inject
        ... def job(alerts: AlertsService = Provide[Container.alerts_service]) -> None:
        ...     alerts.notify("job", "ran")
        >>> job()
        Traceback (most recent call last):
        ...
        regression_model_template.containers.UnwiredError: job() needs 'alerts', ...
        >>> job(alerts=AlertsService(enable=False))
        [regression_model_template] job: ran
    """
    signature = inspect.signature(fn)
    wanted = [n for n, p in signature.parameters.items() if _is_marker(p.default)]
    injected = frozenset(wanted)  # every one passed as a keyword: the wired path, checked fast

    def check(args: tuple[T.Any, ...], kwargs: dict[str, T.Any]) -> None:
        given = signature.bind_partial(*args, **kwargs).arguments
        for name in wanted:
            if name not in given or _is_marker(given[name]):
                raise UnwiredError(
                    f"{fn.__name__}() needs {name!r}, provided by a container, but no container "
                    f"is wired to {fn.__module__}: build one (Container()) and wire it "
                    f"(container.wire(modules=[{fn.__module__!r}])), or pass {name}=... yourself"
                )

    # One wrapper per kind of function that dependency-injector keeps, so that a framework
    # inspecting the job first (FastAPI, pytest-asyncio) still sees a coroutine function or an
    # async generator function. (A plain generator function is wrapped by dependency-injector
    # itself into a function returning the generator: it works, but is no longer one.)
    checked: T.Callable[..., T.Any]
    if inspect.iscoroutinefunction(fn):

        async def checked(*args: T.Any, **kwargs: T.Any) -> T.Any:
            if not injected <= kwargs.keys():
                check(args, kwargs)
            return await fn(*args, **kwargs)

    elif inspect.isasyncgenfunction(fn):

        async def checked(*args: T.Any, **kwargs: T.Any) -> T.Any:
            if not injected <= kwargs.keys():
                check(args, kwargs)
            async for item in fn(*args, **kwargs):
                yield item

    else:

        def checked(*args: T.Any, **kwargs: T.Any) -> T.Any:
            if not injected <= kwargs.keys():
                check(args, kwargs)
            return fn(*args, **kwargs)

    return T.cast(F, di_wiring.inject(functools.wraps(fn)(checked)))


def _is_marker(value: object) -> bool:
    return isinstance(value, di_wiring._Marker)  # type: ignore[misc]


class UnwiredError(RuntimeError):
    """An ``@inject`` job was called while no container is wired to its module.

    Example:
        >>> str(UnwiredError("training() needs 'mlflow_service'"))
        "training() needs 'mlflow_service'"
    """
