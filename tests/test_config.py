"""Configuration: profiles as users write them, and every mistake reported at once."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from regression_model_template.config import (
    BUNDLED_PROFILES,
    ConfigError,
    load_profile,
    profile_path,
)
from regression_model_template.containers import Container


@pytest.fixture
def profile_with_three_mistakes(tmp_path: Path) -> Path:
    path = tmp_path / "mine.yaml"
    profile = """
logger:
  levl: INFO
alerts:
  enable: [1, 2]
mlflow:
  experimnt_name: demo
"""
    path.write_text(profile, encoding="utf-8")
    return path


@pytest.mark.parametrize("provider", ["logger_service", "alerts_service", "mlflow_service"])
def test_building_any_service_lists_every_mistake_of_every_section(
    profile_with_three_mistakes: Path, provider: str
) -> None:
    # given a profile with one mistake in each service's section
    container = Container(profile=profile_with_three_mistakes, environ={})

    # when any one service is built first
    with pytest.raises(ConfigError) as caught:
        getattr(container, provider)()

    # then the error lists all three mistakes, not only that service's section
    assert caught.value.problems == [
        "logger.levl: unknown key (did you mean 'level'?)",
        "alerts.enable: Input should be a valid boolean",
        "mlflow.experimnt_name: unknown key (did you mean 'experiment_name'?)",
    ]


def test_the_jobs_settings_validate_the_whole_configuration_too(
    profile_with_three_mistakes: Path,
) -> None:
    container = Container(profile=profile_with_three_mistakes, environ={})
    with pytest.raises(ConfigError) as caught:
        container.jobs_config()
    assert len(caught.value.problems) == 3


def test_a_profile_in_another_encoding_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    # given a profile saved in Latin-1 (a euro sign in cp1252 is the byte 0x80)
    path = tmp_path / "latin.yaml"
    path.write_bytes("alerts:\n  app_name: caf\u00e9 \u20ac\n".encode("cp1252"))

    # when it is loaded (directly, and as a container's profile)
    with pytest.raises(ConfigError) as direct:
        load_profile(path, {})
    with pytest.raises(ConfigError) as built:
        Container(profile=path, environ={})

    # then one problem names the file, the byte and the fix; no UnicodeDecodeError escapes
    for caught in (direct, built):
        [problem] = caught.value.problems
        assert problem.startswith(f"profile {path}: not UTF-8 text")
        assert "0xe9" in problem and "save it as UTF-8" in problem
        assert caught.value.__cause__ is None


def test_an_empty_variable_takes_the_default(tmp_path: Path) -> None:
    # CI gives an unset secret as an empty string: ALERT_URLS= must mean "no URL"
    path = tmp_path / "p.yaml"
    path.write_text("alerts:\n  urls: ${ALERT_URLS:[]}\n  app_name: ${APP:}\n", encoding="utf-8")

    tree = load_profile(path, {"ALERT_URLS": "", "APP": ""})

    assert tree == {"alerts": {"urls": [], "app_name": ""}}


def test_profiles_come_from_the_working_directory_then_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a working directory without a containers/ folder
    monkeypatch.chdir(tmp_path)
    # then both profiles are found in the package's data (importlib.resources), as from a wheel
    bundled = resources.files(BUNDLED_PROFILES)
    for name in ("local", "server"):
        path = profile_path(name)
        assert path.read_bytes() == bundled.joinpath(f"{name}.yaml").read_bytes()
    # and a misspelt name lists the bundled profiles
    with pytest.raises(ConfigError, match=r"did you mean 'server'.*known: local, server"):
        profile_path("sever")

    # given the working directory's own containers/server.yaml
    (tmp_path / "containers").mkdir()
    (tmp_path / "containers" / "server.yaml").write_text("mlflow: {}\n", encoding="utf-8")
    # then it wins over the bundled one, and the bundled local profile is still found
    assert profile_path("server").resolve() == tmp_path / "containers" / "server.yaml"
    assert profile_path("local").read_bytes() == bundled.joinpath("local.yaml").read_bytes()
