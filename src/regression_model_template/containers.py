"""The container: configuration -> services -> lifecycles -> wiring.

``Container`` reads its configuration from four layers, lowest to highest precedence:

1. the services' own defaults;
2. a YAML profile from the ``containers/`` folder (``local`` by default, or ``RMT_PROFILE``,
   or ``profile=`` a name or a path); ``${VAR}`` and ``${VAR:default}`` are expanded;
3. environment variables ``RMT_<SECTION>__<FIELD>`` and MLflow's own ``MLFLOW_TRACKING_URI``,
   ``MLFLOW_REGISTRY_URI`` and ``MLFLOW_EXPERIMENT_NAME``;
4. an explicit dict: ``Container(config={...})`` or ``container.config.from_dict({...})``.

Setting one value keeps every other value from the lower layers. The merged configuration is
validated as a whole before any service starts (:class:`ConfigError` lists every bad path).

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
import difflib
import functools
import inspect
import os
import re
import threading
import typing as T
from pathlib import Path

import pydantic
import yaml
from dependency_injector import containers, providers
from dependency_injector import wiring as di_wiring
from loguru import logger

from regression_model_template.io.services import (
    AlertsService,
    LoggerService,
    MlflowService,
    Service,
    ServiceError,
    mask_uri,
)
from regression_model_template.jobs import JobsConfig

__all__ = [
    "SECTIONS",
    "SERVICES",
    "ConfigError",
    "ConfigValue",
    "Container",
    "effective_config",
    "inject",
    "lifespan",
    "profile_path",
    "validate_config",
]

# %% CONFIGURATION

#: The configuration sections of the services, and the model that validates each.
SERVICES: dict[str, type[Service]] = {
    "logger": LoggerService,
    "alerts": AlertsService,
    "mlflow": MlflowService,
}
#: Every configuration section: the services' and the bundled jobs' settings.
SECTIONS: dict[str, type[pydantic.BaseModel]] = {**SERVICES, "jobs": JobsConfig}

#: MLflow's own environment variables, honoured like ``RMT_MLFLOW__<FIELD>``.
MLFLOW_VARIABLES = {
    "MLFLOW_TRACKING_URI": "tracking_uri",
    "MLFLOW_REGISTRY_URI": "registry_uri",
    "MLFLOW_EXPERIMENT_NAME": "experiment_name",
}

ENV_PREFIX = "RMT_"
PROFILE_VARIABLE = "RMT_PROFILE"
DEFAULT_PROFILE = "local"

# Profiles are looked up in the working directory's containers/ folder, then in the
# repository's own (present for a source checkout or an editable install).
PROFILE_FOLDERS = (Path("containers"), Path(__file__).resolve().parents[2] / "containers")

Tree = dict[str, T.Any]

# ${VAR} or ${VAR:default} inside a profile.
_ENV_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<default>[^}]*))?\}")


class ConfigError(ValueError):
    """The configuration cannot build the services: every problem, one per line.

    Attributes:
        problems: ``"section.field: what is wrong"`` lines.

    Example:
        >>> print(ConfigError(["logger.levl: unknown key (did you mean 'level'?)"]))
        invalid configuration:
          logger.levl: unknown key (did you mean 'level'?)
    """

    def __init__(self, problems: T.Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in self.problems))


class ConfigValue(T.NamedTuple):
    """One effective setting: its value (secrets masked) and the layer it comes from.

    ``source`` is ``default``, ``profile <path>``, ``environment <VARIABLE>`` or ``explicit``.

    Example:
        >>> ConfigValue("INFO", "environment RMT_LOGGER__LEVEL").source
        'environment RMT_LOGGER__LEVEL'
    """

    value: T.Any
    source: str


class _Layer(T.NamedTuple):
    """A configuration layer: a tree of values and where each leaf came from."""

    values: Tree
    sources: dict[str, str]  # dotted path -> source label


def profile_path(profile: str | os.PathLike[str]) -> Path:
    """Resolve a profile name (``local``, ``server``) or a path to an existing YAML file.

    Raises:
        ConfigError: no such profile; the message lists the profiles that exist.

    Example:
        >>> profile_path("local").name
        'local.yaml'
    """
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml") or len(candidate.parts) > 1:
        if candidate.is_file():
            return candidate
        raise ConfigError([f"profile: no such file {str(candidate)!r}"])
    for folder in PROFILE_FOLDERS:
        path = folder / f"{profile}.yaml"
        if path.is_file():
            return path
    known = sorted({p.stem for folder in PROFILE_FOLDERS for p in folder.glob("*.yaml")})
    hint = _suggest(str(profile), known)
    folders = ", ".join(str(f) for f in PROFILE_FOLDERS)
    raise ConfigError(
        [
            f"profile: no profile named {str(profile)!r}{hint} (looked in {folders}; known: "
            f"{', '.join(known) or 'none'})"
        ]
    )


def _load_profile(path: Path, environ: T.Mapping[str, str]) -> Tree:
    """Read a YAML profile, expanding ``${VAR}`` / ``${VAR:default}`` in its values."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"profile {path}: cannot read it: {exc}"]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"profile {path}: expected a mapping of sections, got {kind}"])
    missing: dict[str, str] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            continue  # reported by validate_config
        for field, value in values.items():
            if isinstance(value, str) and "${" in value:
                values[field] = _expand(section, field, value, environ, missing)
    if missing:
        raise ConfigError(
            [
                f"{where}: environment variable {name} is not set (profile {path})"
                for name, where in missing.items()
            ]
        )
    return data


def _expand(
    section: str, field: str, value: str, environ: T.Mapping[str, str], missing: dict[str, str]
) -> T.Any:
    """Expand references in one value; a value that is a single reference gets its type."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        if name in environ:
            return environ[name]
        if default is None:
            missing.setdefault(name, f"{section}.{field}")
            return ""
        return default

    expanded = _ENV_REFERENCE.sub(substitute, value)
    if _ENV_REFERENCE.fullmatch(value):
        return parse_value(section, field, expanded)
    return expanded


def _env_layer(environ: T.Mapping[str, str]) -> _Layer:
    """Collect ``RMT_<SECTION>__<FIELD>`` and MLflow's variables from ``environ``."""
    values: Tree = {}
    sources: dict[str, str] = {}
    found: list[tuple[str, str, str, str]] = [
        ("mlflow", field, name, environ[name])
        for name, field in MLFLOW_VARIABLES.items()
        if environ.get(name)
    ]
    malformed: list[str] = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == PROFILE_VARIABLE:
            continue
        section, sep, field = name[len(ENV_PREFIX) :].lower().partition("__")
        if not sep or not section or not field:
            malformed.append(f"{name}: not a setting (expected {ENV_PREFIX}<SECTION>__<FIELD>)")
            continue
        found.append((section, field, name, raw))
    if malformed:  # a misspelt variable is an error, never silently ignored
        raise ConfigError(malformed)
    for section, field, name, raw in found:
        values.setdefault(section, {})[field] = parse_value(section, field, raw)
        sources[f"{section}.{field}"] = f"environment {name}"
    return _Layer(values, sources)


def parse_value(section: str, field: str, raw: str) -> T.Any:
    """Read a value given as text (environment, --set): text for text settings, else YAML.

    Example:
        >>> parse_value("alerts", "max_wait", "5"), parse_value("alerts", "app_name", "5")
        (5, '5')
    """
    model = SECTIONS.get(section)
    info = model.model_fields.get(field) if model else None
    if info is not None and info.annotation in (str, str | None):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _leaves(tree: T.Mapping[str, T.Any], prefix: str = "") -> T.Iterator[tuple[str, T.Any]]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and prefix == "":
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


def _merge(base: Tree, top: T.Mapping[str, T.Any]) -> Tree:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _layers(
    profile: str | os.PathLike[str] | T.Literal[False] | None,
    environ: T.Mapping[str, str],
    explicit: T.Mapping[str, T.Any] | None,
) -> list[_Layer]:
    """Read every layer above the defaults, lowest precedence first."""
    layers: list[_Layer] = []
    name = environ.get(PROFILE_VARIABLE) if profile is None else profile
    path: Path | None = None
    if name:
        path = profile_path(name)
    elif name is None:
        # The default profile is optional: without it, the services' defaults apply.
        with contextlib.suppress(ConfigError):
            path = profile_path(DEFAULT_PROFILE)
    if path is not None:
        data = _load_profile(path, environ)
        layers.append(_Layer(data, {p: f"profile {path}" for p, _ in _leaves(data)}))
    layers.append(_env_layer(environ))
    if explicit:
        layers.append(_Layer(dict(explicit), {p: "explicit" for p, _ in _leaves(explicit)}))
    return layers


def validate_config(data: T.Mapping[str, T.Any] | None) -> dict[str, pydantic.BaseModel]:
    """Validate a whole configuration tree and return the services it describes.

    Raises:
        ConfigError: every unknown section or key (with a close-match suggestion), wrong
            type and invalid value, one ``section.field: problem`` line each.

    Example:
        >>> validate_config({"loger": {}, "mlflow": {"tracking_uir": "sqlite:///m.db"}})
        Traceback (most recent call last):
        ...
        regression_model_template.containers.ConfigError: invalid configuration:
          loger: unknown section (did you mean 'logger'?)
          mlflow.tracking_uir: unknown key (did you mean 'tracking_uri'?)
    """
    data = data or {}
    problems: list[str] = []
    services: dict[str, pydantic.BaseModel] = {}
    for section in data:
        if section not in SECTIONS:
            problems.append(f"{section}: unknown section{_suggest(section, list(SECTIONS))}")
    for section, model in SECTIONS.items():
        values = data.get(section) or {}
        if not isinstance(values, T.Mapping):
            problems.append(f"{section}: expected a mapping of settings, got {values!r}")
            continue
        try:
            services[section] = model.model_validate(dict(values))
        except pydantic.ValidationError as exc:
            problems.extend(_describe(section, model, exc))
    if problems:
        raise ConfigError(problems)
    return services


def _describe(
    section: str, model: type[pydantic.BaseModel], error: pydantic.ValidationError
) -> list[str]:
    """One line per pydantic error, without echoing input values (they may be secrets)."""
    lines = []
    for item in error.errors():
        path = ".".join([section, *(str(p) for p in item["loc"])])
        if item["type"] == "extra_forbidden":
            key = str(item["loc"][-1])
            lines.append(f"{path}: unknown key{_suggest(key, list(model.model_fields))}")
        else:
            lines.append(f"{path}: {item['msg']}")
    return lines


def _suggest(word: str, choices: T.Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_SECRET_KEY = ("password", "secret", "token", "webhook", "api_key")


def _mask(path: str, value: T.Any) -> T.Any:
    if isinstance(value, str):
        if any(word in path.lower() for word in _SECRET_KEY):
            return "***"
        return mask_uri(value) if "://" in value else value
    return value


# %% CONTAINER


S = T.TypeVar("S", bound=pydantic.BaseModel)


def _build(model: type[S], section: str, values: Tree | None) -> S:
    """Build one service from its configuration section, as a ConfigError when invalid."""
    try:
        return model.model_validate(values or {})
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(section, model, exc)) from None


def _services(
    config: Tree | None, *services: providers.Provider[Service]
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

    config_layers: list[_Layer]

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
    wiring_config = containers.WiringConfiguration(packages=["regression_model_template.jobs"])

    # -- configuration: sections `logger`, `alerts`, `mlflow`, `jobs` (see SECTIONS)
    config = providers.Configuration(strict=False)

    # -- services: one instance each, validated by their pydantic models
    logger_service = providers.ThreadSafeSingleton(_build, LoggerService, "logger", config.logger)
    alerts_service = providers.ThreadSafeSingleton(_build, AlertsService, "alerts", config.alerts)
    mlflow_service = providers.ThreadSafeSingleton(_build, MlflowService, "mlflow", config.mlflow)

    # -- settings of the bundled jobs
    jobs_config = providers.ThreadSafeSingleton(_build, JobsConfig, "jobs", config.jobs)

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
        layers = _layers(profile, os.environ if environ is None else environ, config)
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
    tree = container.config() or {}
    services = validate_config(tree)
    layers: list[_Layer] = getattr(container, "config_layers", [])
    result: dict[str, ConfigValue] = {}
    for section, service in services.items():
        current = tree.get(section) or {}
        for field, value in service.model_dump().items():
            path = f"{section}.{field}"
            source = "default"
            if field in current:
                source = "explicit"  # set after construction, e.g. config.from_dict
                for layer in reversed(layers):
                    if path in layer.sources and layer.values[section][field] == current[field]:
                        source = layer.sources[path]
                        break
            result[path] = ConfigValue(_mask(path, value), source)
    return result


# %% LIFECYCLES

_LIFESPAN_LOCK = threading.RLock()
_LIFESPAN_DEPTH: dict[int, int] = {}


@contextlib.contextmanager
def _started(services: T.Sequence[Service]) -> T.Iterator[list[Service]]:
    """Start services in order; stop in reverse, all of them, reporting every failure."""
    started: list[Service] = []
    try:
        for service in services:
            service.start()
            started.append(service)
            logger.info("Started {}", type(service).__name__)
            logger.debug("{!r}", service)  # settings, secrets masked
    except BaseException as error:
        logger.error("Could not start {}: {}", services[len(started)], error)
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
    wanted_keys = frozenset(wanted)

    @functools.wraps(fn)
    def checked(*args: T.Any, **kwargs: T.Any) -> T.Any:
        if wanted_keys <= kwargs.keys():  # the wired path: every dependency injected
            return fn(*args, **kwargs)
        given = signature.bind_partial(*args, **kwargs).arguments
        for name in wanted:
            if name not in given or _is_marker(given[name]):
                raise UnwiredError(
                    f"{fn.__name__}() needs {name!r}, provided by a container, but no container "
                    f"is wired to {fn.__module__}: build one (Container()) and wire it "
                    f"(container.wire(modules=[{fn.__module__!r}])), or pass {name}=... yourself"
                )
        return fn(*args, **kwargs)

    return T.cast(F, di_wiring.inject(checked))


def _is_marker(value: object) -> bool:
    return isinstance(value, di_wiring._Marker)  # type: ignore[misc]


class UnwiredError(RuntimeError):
    """An ``@inject`` job was called while no container is wired to its module.

    Example:
        >>> str(UnwiredError("training() needs 'mlflow_service'"))
        "training() needs 'mlflow_service'"
    """
