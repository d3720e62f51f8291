"""The server's artifacts destination: a folder or an S3 bucket (a real moto server here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from regression_model_template.server.artifacts import (
    artifacts_destination,
    check_destination,
)
from regression_model_template.server.processes import free_port
from regression_model_template.server.tracking_server import MlflowServer
from regression_model_template.testing import clean_environ
from tests.s3_server import MotoS3, moto_server, served_artifact

EXTRA = "pip install 'regression-model-template[s3]'"


# %% the value of --artifacts-destination


def test_no_value_is_the_folders_artifacts(tmp_path: Path) -> None:
    assert artifacts_destination(None, tmp_path) == str(tmp_path / "artifacts")


def test_a_relative_folder_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert artifacts_destination("data/artifacts", Path("/elsewhere")) == str(
        tmp_path / "data" / "artifacts"
    )


@pytest.mark.parametrize("scheme", ["s3", "S3"])
def test_an_s3_uri_is_kept_in_one_spelling(scheme: str) -> None:
    # (MLflow reads S3:// as s3://: so must the bucket check, not as a folder named "S3:")
    uri = artifacts_destination(f"{scheme}://team-bucket/mlflow", Path("/srv"))

    assert uri == "s3://team-bucket/mlflow"


@pytest.mark.parametrize(
    ("value", "cause"),
    [
        ("", "is empty"),
        ("gs://bucket/x", "the scheme gs:// is not supported"),
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://bucket/x?versioning=1", "has no ? or #"),
        ("s3://AKID:hidden-secret@bucket/x", "credentials do not go into the S3 URI"),
    ],
)
def test_a_bad_value_is_refused_naming_the_option_and_the_cause(value: str, cause: str) -> None:
    with pytest.raises(ValueError, match="--artifacts-destination") as refused:
        artifacts_destination(value, Path("/srv"))
    assert cause in str(refused.value)
    assert "hidden-secret" not in str(refused.value)


def test_s3_without_boto3_says_how_to_install_it(tmp_path: Path) -> None:
    # boto3 is installed here: `sys.modules["boto3"] = None` makes Python act as if it were not
    # (import raises ImportError, find_spec answers None). nox's `installed` session checks the
    # real case: the wheel installed without extras has no boto3.
    script = textwrap.dedent(
        """
        import sys
        sys.modules["boto3"] = None
        from pathlib import Path
        from regression_model_template.server import artifacts
        for call in (
            lambda: artifacts.artifacts_destination("s3://bucket/x", Path(".")),
            lambda: artifacts.check_destination("s3://bucket/x"),
        ):
            try:
                call()
            except (ValueError, RuntimeError) as error:
                print(type(error).__name__, error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=clean_environ(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith("ValueError --artifacts-destination s3://bucket/x")
    assert lines[1].startswith("RuntimeError --artifacts-destination s3://bucket/x")
    assert lines[0].endswith(f"an S3 destination needs boto3: {EXTRA}")
    assert "an S3 destination needs boto3" in lines[1]
    assert lines[1].endswith(EXTRA)


# %% a folder destination


def test_a_missing_folder_is_created_and_written(tmp_path: Path) -> None:
    folder = tmp_path / "team" / "artifacts"
    check_destination(str(folder))
    assert folder.is_dir()
    assert list(folder.iterdir()) == []  # the check leaves nothing behind


def test_a_folder_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")  # fails for root too, unlike permissions
    with pytest.raises(RuntimeError, match="--artifacts-destination") as refused:
        check_destination(str(tmp_path / "a-file" / "artifacts"))
    assert "cannot be created or written" in str(refused.value)


# %% an S3 destination, checked against a real S3-compatible server (moto)


@pytest.fixture
def aws_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """None of the developer's AWS settings: no variables, no ~/.aws files, no metadata service."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.startswith("MLFLOW_S3_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never 169.254.169.254
    return monkeypatch


def _use(s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3.environ.items():
        monkeypatch.setenv(name, value)


def _refused(uri: str) -> str:
    """check_destination's error for ``uri``; it names the option and shows no secret."""
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    with pytest.raises(RuntimeError, match=f"--artifacts-destination {uri}") as refused:
        check_destination(uri)
    message = str(refused.value)
    assert not secret or secret not in message
    return message


def test_an_existing_bucket_passes(moto_s3: MotoS3, aws_settings: pytest.MonkeyPatch) -> None:
    _use(moto_s3, aws_settings)
    check_destination(f"s3://{moto_s3.bucket}/team/artifacts")


def test_a_missing_bucket_is_named(moto_s3: MotoS3, aws_settings: pytest.MonkeyPatch) -> None:
    _use(moto_s3, aws_settings)
    message = _refused("s3://no-such-bucket/x")
    assert f"the bucket no-such-bucket does not exist at {moto_s3.endpoint_url}" in message


def test_no_credentials_is_said(moto_s3: MotoS3, aws_settings: pytest.MonkeyPatch) -> None:
    aws_settings.setenv("MLFLOW_S3_ENDPOINT_URL", moto_s3.endpoint_url)
    aws_settings.setenv("AWS_DEFAULT_REGION", "us-east-1")
    message = _refused(f"s3://{moto_s3.bucket}/x")
    assert "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message


def test_refused_credentials_are_said_without_the_secret(
    tmp_path: Path, aws_settings: pytest.MonkeyPatch
) -> None:
    with moto_server(tmp_path, refuse_credentials=True) as s3:
        _use(s3, aws_settings)
        message = _refused(f"s3://{s3.bucket}/x")
    assert f"{s3.endpoint_url} refused access to the bucket {s3.bucket} (403)" in message


def test_an_unreachable_endpoint_is_said(aws_settings: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    aws_settings.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    aws_settings.setenv("AWS_ACCESS_KEY_ID", "key")
    aws_settings.setenv("AWS_SECRET_ACCESS_KEY", "a-secret-never-shown")
    aws_settings.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert f"cannot reach {endpoint}" in _refused("s3://bucket/x")


def test_a_secret_written_into_the_endpoint_is_masked(aws_settings: pytest.MonkeyPatch) -> None:
    # given a user who put the secret key into the endpoint's URL by mistake
    secret = "a-secret-never-shown"
    aws_settings.setenv("AWS_ACCESS_KEY_ID", "key")
    aws_settings.setenv("AWS_SECRET_ACCESS_KEY", secret)
    aws_settings.setenv("AWS_DEFAULT_REGION", "us-east-1")
    aws_settings.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://key:{secret}@127.0.0.1:{free_port()}")
    # when the destination is checked, then the error shows the endpoint, masked
    assert "***" in _refused("s3://bucket/x")  # (_refused checks the secret is not in it)


# %% end to end: a tracking server storing a training job's artifacts in the bucket

_CLIENT = """
import json, sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
from sklearn.linear_model import LinearRegression

mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("artifacts-in-s3")
Path("notes.txt").write_text("trained on moto")
with mlflow.start_run() as run:
    mlflow.log_artifact("notes.txt")
    figure, axes = plt.subplots()
    axes.plot([0, 1, 2], [0, 2, 4])
    mlflow.log_figure(figure, "plots/fit.png")
    model = LinearRegression().fit([[0.0], [1.0], [2.0]], [0.0, 2.0, 4.0])
    info = mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
loaded = mlflow.sklearn.load_model(info.model_uri)  # downloaded through the server
print(json.dumps({
    "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
    "artifact_uri": run.info.artifact_uri, "model_id": info.model_id,
    "prediction": float(loaded.predict([[3.0]])[0]),
}))
"""


@pytest.mark.server
@pytest.mark.slow
def test_a_training_job_stores_its_artifacts_in_s3_through_the_server(
    tmp_path: Path, mlflow_store: str, moto_s3: MotoS3, aws_settings: pytest.MonkeyPatch
) -> None:
    # given a tracking server whose artifacts go to the bucket, with the storage's credentials
    # in its environment only (it inherits this process's)
    _use(moto_s3, aws_settings)
    destination = f"s3://{moto_s3.bucket}/team/artifacts"
    check_destination(destination)  # as the stack does before starting the server
    log = tmp_path / "server.log"
    with MlflowServer(mlflow_store, destination, output=log, startup_timeout=120) as url:
        # when a job with no AWS credentials or endpoint logs a file, a plot and a model
        (tmp_path / "job").mkdir()
        (tmp_path / "job" / "client.py").write_text(_CLIENT)
        environ = {k: v for k, v in clean_environ().items() if not k.startswith("AWS_")}
        # where it tried S3 itself, it would fail here instead of asking the internet
        environ.update(
            AWS_EC2_METADATA_DISABLED="true", HTTPS_PROXY=f"http://127.0.0.1:{free_port()}"
        )
        environ.update(NO_PROXY="127.0.0.1,localhost")
        job = subprocess.run(
            [sys.executable, "client.py", url],
            cwd=tmp_path / "job",
            env=environ,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert job.returncode == 0, job.stdout + job.stderr
        result = json.loads(job.stdout.strip().splitlines()[-1])
        served = served_artifact(url, result["run_id"], "notes.txt")
        plot_served = served_artifact(url, result["run_id"], "plots/fit.png")

    # then the artifacts went through the server (proxied) into the bucket under the prefix
    assert result["artifact_uri"].startswith("mlflow-artifacts:")
    run_folder = f"team/artifacts/{result['experiment_id']}/{result['run_id']}/artifacts"
    keys = moto_s3.keys("team/artifacts/")
    assert f"{run_folder}/notes.txt" in keys
    assert f"{run_folder}/plots/fit.png" in keys
    model_keys = [key for key in keys if result["model_id"] in key]
    assert any(key.endswith("/MLmodel") for key in model_keys), keys
    assert moto_s3.read(f"{run_folder}/notes.txt") == b"trained on moto"
    # and the server serves them back, the model included (the job loaded it to predict)
    assert served == b"trained on moto"
    assert plot_served == moto_s3.read(f"{run_folder}/plots/fit.png")
    assert plot_served.startswith(b"\x89PNG")
    assert result["prediction"] == pytest.approx(6.0)
    # and the storage's secret is nowhere in the server's output
    assert moto_s3.environ["AWS_SECRET_ACCESS_KEY"] not in log.read_text(errors="replace")
