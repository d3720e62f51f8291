"""The basic-auth app's files and environment: the admin from the variables, secrets kept."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from regression_model_template.server.auth import (
    AUTH_CACHE_SECONDS,
    Admin,
    admin_from,
    auth_environment,
)

PASSWORD = "s3cret-admin-pass"


@pytest.mark.parametrize(
    "environ",
    [{}, {"MLFLOW_TRACKING_USERNAME": "alice"}, {"MLFLOW_TRACKING_PASSWORD": PASSWORD}],
    ids=["neither", "no-password", "no-user"],
)
def test_the_admin_needs_both_variables_and_the_error_names_both(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError) as error:
        admin_from(environ)

    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in str(error.value)
    assert PASSWORD not in str(error.value)


def test_a_password_mlflow_would_refuse_is_refused_before_the_server_starts() -> None:
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_PASSWORD must be at least 12") as error:
        admin_from({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "short-pw"})

    assert "short-pw" not in str(error.value)


def test_the_admin_comes_from_the_variables_and_hides_its_password() -> None:
    admin = admin_from({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": PASSWORD})

    assert admin == ("alice", PASSWORD)
    assert PASSWORD not in repr(admin) and PASSWORD not in str(admin)


def test_the_apps_files_are_private_and_hold_no_password(tmp_path: Path) -> None:
    env = auth_environment(tmp_path, Admin("alice", PASSWORD))

    home = tmp_path / "auth"
    assert home.stat().st_mode & 0o777 == 0o700
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert ini == home / "basic_auth.ini"
    for private in (ini, home / "secret_key"):
        assert private.stat().st_mode & 0o777 == 0o600
    settings = configparser.ConfigParser()
    settings.read(ini)
    assert settings["mlflow"]["database_uri"] == f"sqlite:///{home / 'users.db'}"
    assert settings["mlflow"]["admin_username"] == "alice"
    assert PASSWORD not in ini.read_text()  # it reaches the server in its environment only
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == "alice"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == PASSWORD


def test_the_secret_key_is_made_once_and_kept(tmp_path: Path) -> None:
    first = auth_environment(tmp_path, Admin("alice", PASSWORD))["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    again = auth_environment(tmp_path, Admin("bob", PASSWORD))["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    elsewhere = auth_environment(tmp_path / "other", Admin("alice", PASSWORD))

    assert len(first) >= 32
    assert again == first  # every worker and every restart signs with the same key
    assert elsewhere["MLFLOW_FLASK_SERVER_SECRET_KEY"] != first


def test_mlflow_reads_the_ini_and_caches_checked_passwords(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.server.auth.config import read_auth_config

    env = auth_environment(tmp_path, Admin("alice", PASSWORD))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", env["MLFLOW_AUTH_CONFIG_PATH"])

    config = read_auth_config()  # as the server's auth app reads it

    assert config.default_permission == "READ"
    assert config.database_uri == f"sqlite:///{tmp_path / 'auth' / 'users.db'}"
    # without a cache every request pays a password hash (432 ms measured from another host)
    assert config.auth_cache_ttl_seconds == AUTH_CACHE_SECONDS > 0
