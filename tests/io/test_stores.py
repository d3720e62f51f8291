"""Store URIs: every malformed one is a ServiceError naming the setting, never a secret."""

from __future__ import annotations

import fcntl
import os
import typing as T
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from regression_model_template.io import stores
from regression_model_template.io.masking import mask_uri, uri_secrets
from regression_model_template.io.services import MlflowService, ServiceError
from regression_model_template.io.stores import check_uri
from regression_model_template.testing import mlflow_globals_restored
from tests.conftest import LogCapture

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

SECRET = "s3cretPW"

# URIs assembled from pieces that break parsers (brackets, colons, ports, "%") after a user part.
_piece = st.sampled_from(["[", "]", ":", "::1", "%", "%4", "/", "?", "#", "h", "99999", "-1"])
uri_texts = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda scheme, user, rest: f"{scheme}://{user}{rest}",
        st.sampled_from(["http", "https", "postgresql", "sqlite", "file", "foo"]),
        st.sampled_from(["", f"bob:{SECRET}@", f"{SECRET}@"]),
        st.lists(_piece, max_size=8).map("".join),
    ),
)


# Derandomized: the same 500 cases on every run (the suite stays deterministic).
FUZZ = settings(derandomize=True, max_examples=500, database=None)


@FUZZ
@given(uri=uri_texts)
@example(uri="http://[::1")
@example(uri=f"http://bob:{SECRET}@[::1")
@example(uri=f"https://bob:{SECRET}@host:99999/")
@example(uri="http://host:port/")
@example(uri="http://[zz]/")
def test_check_uri_accepts_or_raises_a_service_error_without_the_secret(uri: str) -> None:
    try:
        parts = check_uri("tracking_uri", uri)
    except ServiceError as error:
        assert error.service == "MlflowService"
        assert error.setting == "tracking_uri"
        assert str(error).startswith("MlflowService.tracking_uri: malformed URI")
        assert not any(secret in str(error) for secret in uri_secrets(uri))
        if "://" in uri and (f":{SECRET}@" in uri or f"//{SECRET}@" in uri):
            assert SECRET not in str(error)
        return
    # accepted: the standard library can read every part of it
    assert parts == urllib.parse.urlsplit(uri)
    _ = parts.port, parts.hostname


@FUZZ
@given(uri=uri_texts)
@example(uri=f"http://bob:{SECRET}@[::1")
def test_masking_never_raises_and_hides_the_password(uri: str) -> None:
    masked = mask_uri(uri)
    assert isinstance(masked, str)
    assert not any(s in masked for s in uri_secrets(uri) if "*" not in s)  # "***" is ours
    if "://" in uri and (f":{SECRET}@" in uri or f"//{SECRET}@" in uri):
        assert SECRET not in masked


@pytest.mark.parametrize(
    ("setting", "uri"),
    [
        ("tracking_uri", "http://[::1"),
        ("tracking_uri", f"https://bob:{SECRET}@mlflow.example.com:99999/"),
        ("registry_uri", f"postgresql://bob:{SECRET}@[db/mlflow"),
    ],
)
def test_a_malformed_uri_fails_start_naming_the_setting(
    setting: str, uri: str, mlflow_store: str
) -> None:
    # given a service whose tracking or registry URI no parser accepts
    service = MlflowService.model_validate({"tracking_uri": mlflow_store, setting: uri})

    # when it starts (and when a client is asked for)
    for attempt in (service.start, service.client):
        with pytest.raises(ServiceError) as caught:
            attempt()

        # then the error names the service and the setting, without the secret or a bare ValueError
        assert caught.value.setting == setting
        assert "malformed URI" in str(caught.value)
        assert SECRET not in str(caught.value)
        assert not isinstance(caught.value.__cause__, ValueError)
    service.stop()


def test_a_start_waiting_for_the_schema_lock_says_so_and_gives_up_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_logs: LogCapture
) -> None:
    # given another process holding the lock of an empty SQLite database (stopped, say)
    database = tmp_path / "mlflow.db"
    monkeypatch.setattr(stores, "SCHEMA_WAIT", 0.5)
    with open(tmp_path / "mlflow.db.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        service = MlflowService(tracking_uri=f"sqlite:///{database}", spool_dir=str(tmp_path))

        # when a job starts on it
        with pytest.raises(ServiceError) as raised:
            service.start()

    # then it said why it waited, and failed naming the setting
    assert any("Waiting for another job creating" in m for m in captured_logs.messages("INFO"))
    assert str(raised.value).startswith("MlflowService.tracking_uri: another process has held")
    assert not database.exists()  # nobody created tables behind the lock
    service.stop()


def test_an_experiment_another_job_creates_meanwhile_is_used_not_an_error(
    tmp_path: Path,
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    class Racing(MlflowClient):
        """Looks the experiment up just before another job creates it."""

        def get_experiment_by_name(self, name: str) -> T.Any:
            MlflowClient(uri).create_experiment(name)  # the other job
            return None

    # when the experiment appears between our lookup and our creation
    stores.ensure_experiment(Racing(uri), uri, "raced")

    # then it is the experiment the job's runs go to (MLflow's own set_experiment returns
    # early in that case without making it active, and runs land in "Default")
    with mlflow_globals_restored():
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment("raced")
        with mlflow.start_run() as run:
            pass
    assert run.info.experiment_id == experiment.experiment_id != "0"


# %% what a store is, however its URI is written


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("http://alice:pw1@mlflow.local:5000/", "http://bob:pw2@MLflow.local:5000"),
        (f"https://{SECRET}@mlflow.example.com/team", "https://mlflow.example.com:443/team/"),
        (
            f"postgresql://bob:{SECRET}@db/mlflow?sslmode=require",
            "postgresql+psycopg2://alice@db:5432/mlflow",
        ),
        (f"http://bob:{SECRET}@[::1]:5000/?token=abc", "http://[::1]:5000"),
    ],
)
def test_uris_that_differ_only_in_credentials_and_spelling_name_one_store(
    one: str, other: str
) -> None:
    # when the identities of two spellings of one store are taken
    identities = {stores.store_identity(one), stores.store_identity(other)}

    # then they are one, and holds none of the credentials
    assert len(identities) == 1
    (identity,) = identities
    for secret in ("pw1", "pw2", SECRET, "abc", "alice", "bob"):
        assert secret not in identity


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("http://mlflow.local:5000", "http://mlflow.local:5001"),
        ("http://mlflow.local/a", "http://mlflow.local/b"),
        ("postgresql://db/mlflow", "postgresql://db/other"),
        ("postgresql:///mlflow?host=/run/a", "postgresql:///mlflow?host=/run/b"),
    ],
)
def test_different_stores_keep_different_identities(one: str, other: str) -> None:
    assert stores.store_identity(one) != stores.store_identity(other)


def test_a_sqlite_file_is_one_store_however_its_path_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a database in a project folder, reached through a symbolic link too
    project = tmp_path / "project"
    (project / "mlruns").mkdir(parents=True)
    (tmp_path / "link").symlink_to(project)
    monkeypatch.chdir(project)

    # when its identity is taken from relative, absolute, ".." and linked spellings
    spellings = [
        "sqlite:///mlruns/mlflow.db",
        f"sqlite:///{project}/mlruns/mlflow.db",
        "sqlite:///../project/mlruns/mlflow.db",
        f"sqlite:///{tmp_path}/link/mlruns/mlflow.db",
        "sqlite:///mlruns/mlflow.db?timeout=5",
    ]
    identities = {stores.store_identity(uri) for uri in spellings}

    # then they are one: the file's absolute path; from another folder the relative one is not
    assert identities == {f"sqlite:///{project.resolve()}/mlruns/mlflow.db"}
    monkeypatch.chdir(tmp_path)
    assert stores.store_identity("sqlite:///mlruns/mlflow.db") not in identities


@FUZZ
@given(uri=uri_texts)
@example(uri=f"sqlite://bob:{SECRET}@host/x")
@example(uri=f"postgresql://bob:{SECRET}@[db/mlflow")
def test_a_store_identity_never_raises_and_never_holds_a_secret(uri: str) -> None:
    identity = stores.store_identity(uri)
    assert not any(secret in identity for secret in uri_secrets(uri) if "*" not in secret)
    # and masking first changes nothing: a spool records the identity of the masked URI
    assert stores.store_identity(mask_uri(uri)) == identity
