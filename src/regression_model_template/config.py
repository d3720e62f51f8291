"""Configuration: sources -> merge -> validate -> effective values with their source.

The configuration is a tree of sections (``logger``, ``alerts``, ``mlflow``, ``jobs``), read
from layers, lowest to highest precedence:

1. the models' own defaults;
2. a YAML profile: ``./containers/<name>.yaml`` of the working directory, else the profile of
   that name bundled with the package (``local`` by default, or ``RMT_PROFILE``, or a name or
   path given explicitly); ``${VAR}`` and ``${VAR:default}`` are expanded;
3. environment variables ``RMT_<SECTION>__<FIELD>`` and MLflow's own ``MLFLOW_TRACKING_URI``,
   ``MLFLOW_REGISTRY_URI`` and ``MLFLOW_EXPERIMENT_NAME``;
4. an explicit dict (``Container(config=...)``, ``--set`` on the command line).

Setting one value keeps every other value from the lower layers. :func:`validate_config`
checks the merged tree as a whole and lists every bad path in one :class:`ConfigError`.
The container (``containers.py``) loads the layers and builds the services from them.

Example:
    >>> layers = read_layers(False, {"RMT_LOGGER__LEVEL": "info"}, {"jobs": {"alpha": 0.5}})
    >>> tree = merge_layers(layers)
    >>> tree
    {'logger': {'level': 'info'}, 'jobs': {'alpha': 0.5}}
    >>> validate_config(tree)["logger"].level
    'INFO'
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import typing as T
from importlib import resources
from pathlib import Path

import pydantic
import yaml

from regression_model_template.io.masking import mask_setting
from regression_model_template.io.services import AlertsService, LoggerService, MlflowService

__all__ = [
    "SECTIONS",
    "SERVICES",
    "ConfigError",
    "ConfigValue",
    "JobsConfig",
    "Layer",
    "effective_values",
    "merge_layers",
    "parse_value",
    "profile_path",
    "read_layers",
    "validate_config",
]


class JobsConfig(pydantic.BaseModel):
    """Settings of the bundled jobs: the configuration section ``jobs``.

    Defined here, with the other sections' models, so that the whole configuration is
    validated before any job module is imported; ``regression_model_template.jobs``
    re-exports it.

    Attributes:
        test_size: share of the dataset held out for testing (same split for both jobs).
        random_state: seed of the train/test split.
        alpha: L2 regularisation strength of the ridge regression.
        model_alias: registry alias that ``training`` moves and ``evaluation`` loads.
        model_version: a registered version for ``evaluation`` to load instead of the alias.

    Example:
        >>> JobsConfig(alpha=0.5).alpha
        0.5
    """

    model_config = pydantic.ConfigDict(strict=True, frozen=True, extra="forbid")

    test_size: float = pydantic.Field(default=0.2, gt=0, lt=1)
    random_state: int = 42
    alpha: float = pydantic.Field(default=1.0, ge=0)
    model_alias: str = "champion"
    model_version: int | None = pydantic.Field(default=None, ge=1)


#: The configuration sections of the services, and the model that validates each.
SERVICES: dict[str, type[pydantic.BaseModel]] = {
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

#: The package that carries the bundled profiles (built from the repository's containers/).
BUNDLED_PROFILES = "regression_model_template.profiles"

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


class Layer(T.NamedTuple):
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
    folders = profile_folders()
    for folder in folders:
        path = folder / f"{profile}.yaml"
        if path.is_file():
            return path
    known = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
    hint = _suggest(str(profile), known)
    looked = ", ".join(str(f) for f in folders)
    raise ConfigError(
        [
            f"profile: no profile named {str(profile)!r}{hint} (looked in {looked}; known: "
            f"{', '.join(known) or 'none'})"
        ]
    )


def profile_folders() -> list[Path]:
    """Where profiles are looked up by name, in order: ``./containers``, then the bundled ones.

    The bundled profiles are package data (``importlib.resources``), so they are found from a
    wheel as from a checkout.

    Example:
        >>> working_directory, bundled = profile_folders()
        >>> working_directory
        PosixPath('containers')
        >>> sorted(profile.name for profile in bundled.glob("*.yaml"))
        ['local.yaml', 'server.yaml']
    """
    # A regular package installed on disk (wheel or editable): its folder is a plain path.
    return [Path("containers"), Path(str(resources.files(BUNDLED_PROFILES)))]


def load_profile(path: Path, environ: T.Mapping[str, str]) -> Tree:
    """Read a YAML profile, expanding ``${VAR}`` / ``${VAR:default}`` in its values."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [
                f"profile {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                f"{exc.start}): save it as UTF-8"
            ]
        ) from None
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
            elif isinstance(value, list):  # e.g. alerts.urls: ["${SLACK_URL}", ...]
                values[field] = [
                    _expand(section, field, item, environ, missing, text=True)
                    if isinstance(item, str) and "${" in item
                    else item
                    for item in value
                ]
    if missing:
        raise ConfigError(
            [
                f"{where}: environment variable {name} is not set (profile {path})"
                for name, where in missing.items()
            ]
        )
    return data


def _expand(
    section: str,
    field: str,
    value: str,
    environ: T.Mapping[str, str],
    missing: dict[str, str],
    text: bool = False,
) -> T.Any:
    """Expand references in one value; a value that is a single reference gets its type.

    ``text``: the value is an item of a list, kept as text.
    """

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        if environ.get(name) or (name in environ and default is None):
            return environ[name]  # set and not empty (empty: the default, as in a shell's :-)
        if default is None:
            missing.setdefault(name, f"{section}.{field}")
            return ""
        return default

    expanded = _ENV_REFERENCE.sub(substitute, value)
    if _ENV_REFERENCE.fullmatch(value) and not text:
        return parse_value(section, field, expanded)
    return expanded


def _env_layer(environ: T.Mapping[str, str]) -> Layer:
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
    return Layer(values, sources)


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


def read_layers(
    profile: str | os.PathLike[str] | T.Literal[False] | None,
    environ: T.Mapping[str, str],
    explicit: T.Mapping[str, T.Any] | None,
) -> list[Layer]:
    """Read every layer above the defaults, lowest precedence first."""
    layers: list[Layer] = []
    name = environ.get(PROFILE_VARIABLE) if profile is None else profile
    path: Path | None = None
    if name:
        path = profile_path(name)
    elif name is None:
        # The default profile is optional: without it, the services' defaults apply.
        with contextlib.suppress(ConfigError):
            path = profile_path(DEFAULT_PROFILE)
    if path is not None:
        data = load_profile(path, environ)
        layers.append(Layer(data, {p: f"profile {path}" for p, _ in _leaves(data)}))
    layers.append(_env_layer(environ))
    if explicit:
        layers.append(Layer(dict(explicit), {p: "explicit" for p, _ in _leaves(explicit)}))
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
        regression_model_template.config.ConfigError: invalid configuration:
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


def merge_layers(layers: T.Iterable[Layer]) -> Tree:
    """Merge layers, later ones winning value by value.

    Example:
        >>> merge_layers([Layer({"a": {"x": 1, "y": 2}}, {}), Layer({"a": {"y": 3}}, {})])
        {'a': {'x': 1, 'y': 3}}
    """
    tree: Tree = {}
    for layer in layers:
        tree = _merge(tree, layer.values)
    return tree


def effective_values(
    tree: T.Mapping[str, T.Any] | None, layers: T.Sequence[Layer]
) -> dict[str, ConfigValue]:
    """Return every setting's effective value (secrets masked) and the layer it comes from.

    ``tree`` is the merged configuration in use; a value in it that no layer gave is
    ``explicit`` (set later, e.g. with ``config.from_dict``).

    Example:
        >>> layers = read_layers(False, {}, {"logger": {"level": "INFO"}})
        >>> settings = effective_values(merge_layers(layers), layers)
        >>> settings["logger.level"], settings["alerts.enable"]
        (ConfigValue(value='INFO', source='explicit'), ConfigValue(value=True, source='default'))
    """
    tree = tree or {}
    result: dict[str, ConfigValue] = {}
    for section, model in validate_config(tree).items():
        current = tree.get(section) or {}
        for field, value in model.model_dump().items():
            path = f"{section}.{field}"
            source = "default"
            if field in current:
                source = "explicit"
                for layer in reversed(layers):
                    if path in layer.sources and layer.values[section][field] == current[field]:
                        source = layer.sources[path]
                        break
            result[path] = ConfigValue(mask_setting(path, value), source)
    return result
