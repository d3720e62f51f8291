"""The command line, run in a subprocess as a user would, in a fresh working directory."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from regression_model_template import cli, jobs
from regression_model_template.containers import SECTIONS
from regression_model_template.testing import clean_environ, free_port
from tests.conftest import Receiver

# Variables that would send alerts to a desktop instead of the console.
DESKTOP = ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY")
SECRET_URI = "https://user:s3cret@mlflow.example.com"


def _environ(**extra: str) -> dict[str, str]:
    environ = clean_environ(**extra)
    for name in DESKTOP:
        environ.pop(name, None)
    return environ


def _cli(cwd: Path, *args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    return _python(cwd, "-m", "regression_model_template", *args, **environ)


def _python(cwd: Path, *args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=_environ(**environ),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh working directory where `run training` ran once (on the embedded default)."""
    path = tmp_path_factory.mktemp("workdir")
    training = _cli(path, "run", "training")
    (path / "training.stdout").write_text(training.stdout)
    (path / "training.stderr").write_text(training.stderr)
    (path / "training.rc").write_text(str(training.returncode))
    return path


# %% help, and what it imports


def test_help_exits_0_and_names_the_commands(tmp_path: Path) -> None:
    result = _cli(tmp_path, "--help")

    assert result.returncode == 0, result.stderr
    for command in ("run", "config", "check"):
        assert command in result.stdout
    run_help = _cli(tmp_path, "run", "--help")
    assert run_help.returncode == 0
    assert "training, evaluation" in run_help.stdout
    assert "--set SECTION.FIELD=VALUE" in run_help.stdout


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = _cli(tmp_path, "--version")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"regression-model-template {version('regression-model-template')}\n"


def test_help_imports_neither_mlflow_sklearn_nor_apprise(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        import regression_model_template.cli as cli
        try:
            cli.main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        heavy = sorted(m for m in ("mlflow", "sklearn", "apprise") if m in sys.modules)
        assert not heavy, heavy
        print("light")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_environ(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert _last_line(result.stdout) == "light"


def test_the_command_line_offers_every_job() -> None:
    assert tuple(jobs.JOBS) == cli.JOB_NAMES


# %% run


def test_run_training_on_the_embedded_default(workdir: Path) -> None:
    from mlflow.tracking import MlflowClient

    stdout = (workdir / "training.stdout").read_text()
    stderr = (workdir / "training.stderr").read_text()
    assert (workdir / "training.rc").read_text() == "0", stderr

    # Where the results are: the run id, the metrics, and the command that opens them.
    match = re.search(r"^run (\w{32}): rmse=(\S+) mae=(\S+) r2=(\S+)$", stdout, re.MULTILINE)
    assert match, stdout
    run_id = match.group(1)
    assert "model regression_model_template version 1" in stdout
    assert "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db" in stdout
    # The store is where the printed command looks, and holds the run and the model.
    store = workdir / "mlruns" / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["rmse"] == pytest.approx(float(match.group(2)), rel=1e-3)
    champion = client.get_model_version_by_alias("regression_model_template", "champion")
    assert champion.run_id == run_id
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(workdir / "mlruns")
    assert "predicted_vs_actual.png" in {p.name for p in artifacts.iterdir()}


def test_logs_written_into_a_pipe_carry_no_colour_codes(workdir: Path) -> None:
    # `make run 2>&1 | tee run.log`: the local profile's logs go to stderr, here a pipe
    stderr = (workdir / "training.stderr").read_text()
    assert "| INFO     |" in stderr
    assert "\x1b[" not in stderr


def test_run_evaluation_after_training(workdir: Path) -> None:
    result = _cli(workdir, "run", "evaluation")

    assert result.returncode == 0, result.stderr
    assert re.search(r"^run \w{32}: rmse=\S+ mae=\S+ r2=\S+$", result.stdout, re.MULTILINE)
    assert "mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db" in result.stdout


def test_a_failing_job_exits_1_with_one_line(tmp_path: Path, _mlflow_template_store: Path) -> None:
    # An empty store (schema ready, to stay fast): evaluation before any model is registered.
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(_mlflow_template_store, tmp_path / "mlruns" / "mlflow.db")

    result = _cli(tmp_path, "run", "evaluation")

    assert result.returncode == 1
    last = _last_line(result.stderr)
    assert re.fullmatch(r"error: job evaluation failed: MlflowException: .*not found", last), last
    assert "Traceback" not in last
    # The alert went to the console (no desktop here), on one line, as a failure.
    alert = "[regression_model_template] FAILURE evaluation failed: MlflowException: "
    assert alert in result.stdout


# %% bad input: exit 2, one clear line, no traceback


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "nope"], "invalid choice: 'nope' (choose from 'training', 'evaluation')"),
        (
            ["run", "training", "--set", "loger.level=INFO"],
            "loger: unknown section (did you mean 'logger'?)",
        ),
        (
            ["config", "show", "--set", "logger.levl=INFO"],
            "logger.levl: unknown key (did you mean 'level'?)",
        ),
        (["run", "training", "--set", "logger.level"], "--set 'logger.level': expected SECTION"),
        (["check", "--set", "level=INFO"], "--set 'level=INFO': expected SECTION.FIELD=VALUE"),
        (["run", "training", "--profile", "nope"], "no profile named 'nope'"),
        (["config", "show", "--profile", "missing.yaml"], "no such file 'missing.yaml'"),
        (["run", "training", "--set", "jobs.alpha=-1"], "jobs.alpha: Input should be"),
    ],
    ids=[
        "unknown-job",
        "misspelt-section",
        "misspelt-key",
        "set-without-value",
        "set-without-section",
        "unknown-profile",
        "missing-profile-file",
        "invalid-value",
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result = _cli(tmp_path, *args)

    assert result.returncode == 2, result.stderr
    # The last line says what is wrong; above it at most a heading or argparse's usage.
    assert expected in _last_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 4, result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "mlruns").exists()  # nothing ran


# %% config


def test_config_show_lists_every_setting_with_its_source_and_masks_secrets(
    tmp_path: Path,
) -> None:
    result = _cli(
        tmp_path, "config", "show", "--set", "logger.level=WARNING", MLFLOW_TRACKING_URI=SECRET_URI
    )

    assert result.returncode == 0, result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    expected = {f"{s}.{f}" for s, model in SECTIONS.items() for f in model.model_fields}
    assert set(lines) == expected
    for line in lines.values():
        assert re.search(r"  # (default|profile \S+|environment \w+|explicit)$", line), line
    masked = '"https://user:***@mlflow.example.com"  # environment MLFLOW_TRACKING_URI'
    assert lines["mlflow.tracking_uri"].endswith(masked)
    assert lines["logger.level"].endswith('"WARNING"  # explicit')
    assert re.search(r"# profile .*local\.yaml$", lines["mlflow.experiment_name"])
    assert lines["jobs.alpha"].endswith("1.0  # default")


def test_config_schema_is_json_with_every_section(tmp_path: Path) -> None:
    result = _cli(tmp_path, "config", "schema")

    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert set(schema["properties"]) == {"logger", "alerts", "mlflow", "jobs"}
    assert "tracking_uri" in schema["properties"]["mlflow"]["properties"]
    assert schema["properties"]["mlflow"]["additionalProperties"] is False


# %% check


def test_check_reports_one_line_per_service(workdir: Path) -> None:
    result = _cli(workdir, "check")

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["logger", "ok:"],
        ["alerts", "ok:"],
        ["mlflow", "ok:"],
    ]
    assert "sqlite:///mlruns/mlflow.db is reachable and writable" in lines[2]


def test_check_exits_1_when_the_tracking_server_does_not_answer(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"

    result = _cli(
        tmp_path,
        "check",
        "--set",
        f"mlflow.tracking_uri={uri}",
        "--set",
        "mlflow.connect_timeout=1",
    )

    assert result.returncode == 1
    lines = dict(line.split(maxsplit=1) for line in result.stdout.strip().splitlines())
    assert lines["logger"].startswith("ok:")
    assert lines["alerts"].startswith("ok:")
    failure = f"FAILED MlflowService.tracking_uri: no answer from the tracking server {uri} "
    assert lines["mlflow"].startswith(failure), lines["mlflow"]
    assert "within 1 s (mlflow.connect_timeout)" in lines["mlflow"]
    assert "Traceback" not in result.stdout + result.stderr


# A dependency that cannot be imported, as in a wheel installed without it (issue 15): Python's
# own way to make an import fail, set before the command line runs.
WITHOUT_PLATFORMDIRS = (
    "import sys; sys.modules['platformdirs'] = None; "
    "from regression_model_template.cli import entry_point; entry_point()"
)


def test_check_names_the_service_when_its_start_raises_anything(tmp_path: Path) -> None:
    # given a tracking service whose start raises a dependency's own error
    result = _python(tmp_path, "-c", WITHOUT_PLATFORMDIRS, "check")

    # then one line for it, with the cause, exit 1, and no traceback
    assert result.returncode == 1, result.stdout + result.stderr
    lines = dict(line.split(maxsplit=1) for line in result.stdout.strip().splitlines())
    assert lines["logger"].startswith("ok:")
    assert lines["alerts"].startswith("ok:")
    assert lines["mlflow"].startswith("FAILED MlflowService.check: failed: ModuleNotFoundError: ")
    assert "platformdirs" in lines["mlflow"]
    assert "Traceback" not in result.stdout + result.stderr


def test_a_start_failure_names_the_service_and_the_cause_not_its_settings(
    tmp_path: Path,
) -> None:
    # given a start that raises a dependency's error, and one that raises a ServiceError
    raw = _python(tmp_path, "-c", WITHOUT_PLATFORMDIRS, "run", "training")
    (tmp_path / "a-file").write_text("")
    unwritable = _cli(tmp_path, "run", "training", "--set", "mlflow.spool_dir=a-file/spool")

    # then each ERROR line names the service and the cause, and not the service's settings
    for result, cause in (
        (raw, "MlflowService.start: failed: ModuleNotFoundError: "),
        (unwritable, "MlflowService.spool_dir: "),
    ):
        assert result.returncode == 1
        (error_line,) = [line for line in result.stderr.splitlines() if "Could not start" in line]
        assert f"Could not start {cause}" in error_line
        assert "tracking_uri" not in error_line
        assert _last_line(result.stderr).startswith(f"error: {cause}")
        assert "Traceback" not in result.stdout + result.stderr


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "regression_model_template", "config", "schema"],
        cwd=tmp_path,
        env=_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # like `| head` exiting before the schema is written

    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 1
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr


# %% alerts to a person


PASSWORD = "pa55w0rdXYZ"
TOKEN = "T0KENabc123"


def _alert_urls(receiver: Receiver) -> dict[str, str]:
    """A webhook with a password, one with a token in its path, a dead one, a malformed one."""
    return {
        "password": f"json://alice:{PASSWORD}@127.0.0.1:{receiver.port}/hook",
        "token": receiver.url("json", f"/hooks/{TOKEN}"),
        "dead": f"json://127.0.0.1:{free_port()}/dead/{TOKEN}",
        "malformed": f"slack://{TOKEN}",
    }


def test_a_failing_job_alerts_failure_to_the_webhook(
    tmp_path: Path, _mlflow_template_store: Path, receiver: Receiver
) -> None:
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(_mlflow_template_store, tmp_path / "mlruns" / "mlflow.db")

    result = _cli(
        tmp_path, "run", "evaluation", RMT_ALERTS__URLS=json.dumps([receiver.url("json")])
    )

    assert result.returncode == 1
    [alert] = [request.json() for request in receiver.requests]
    assert (alert["title"], alert["type"]) == ("evaluation failed", "failure")
    assert alert["message"].startswith("MlflowException: ")
    assert "FAILURE" not in result.stdout  # delivered: no console line


def test_check_lists_the_channels_masked_and_check_alert_reports_each(
    tmp_path: Path, receiver: Receiver
) -> None:
    urls = [receiver.url("json", f"/hooks/{TOKEN}"), f"json://127.0.0.1:{free_port()}/x"]
    environ = {"RMT_ALERTS__URLS": json.dumps(urls)}

    listed = _cli(tmp_path, "check", **environ)
    sent = _cli(tmp_path, "check", "--alert", **environ)

    alerts_line = next(line for line in listed.stdout.splitlines() if line.startswith("alerts"))
    assert f"json://127.0.0.1:{receiver.port}/***" in alerts_line
    assert listed.returncode == 0
    assert len(receiver.requests) == 1  # only --alert sent one
    assert sent.returncode == 1
    alerts_line = next(line for line in sent.stdout.splitlines() if line.startswith("alerts"))
    assert alerts_line.startswith("alerts  FAILED AlertsService.urls: not delivered: ")
    assert f"json://127.0.0.1:{receiver.port}/***: delivered" in alerts_line
    assert TOKEN not in listed.stdout + sent.stdout + listed.stderr + sent.stderr


def test_check_alert_without_a_channel_says_no_alert_was_sent_and_why(tmp_path: Path) -> None:
    # given no desktop (the environment has none) and no alert URL
    listed = _cli(tmp_path, "check")
    sent = _cli(tmp_path, "check", "--alert")
    disabled = _cli(tmp_path, "check", "--alert", "--set", "alerts.enable=false")

    def alerts_line(result: subprocess.CompletedProcess[str]) -> str:
        return next(line for line in result.stdout.splitlines() if line.startswith("alerts"))

    # then check --alert says that nothing was sent, and why; plain check does not
    assert sent.returncode == listed.returncode == disabled.returncode == 0
    assert (
        alerts_line(listed)
        == "alerts  ok: alerts print to the console (no desktop, no alerts.urls)"
    )
    assert alerts_line(sent) == (
        "alerts  ok: no test alert sent: nowhere to send it (no desktop, no alerts.urls); "
        "alerts print to the console"
    )
    assert "no test alert sent: nowhere to send it (alerts.enable is false)" in alerts_line(
        disabled
    )


def test_check_fails_on_a_url_apprise_refuses(tmp_path: Path, receiver: Receiver) -> None:
    urls = [receiver.url("json"), f"nosuchscheme://{TOKEN}/x"]

    result = _cli(tmp_path, "check", RMT_ALERTS__URLS=json.dumps(urls))

    assert result.returncode == 1
    line = next(line for line in result.stdout.splitlines() if line.startswith("alerts"))
    assert line.startswith("alerts  FAILED AlertsService.urls: unusable: nosuchscheme://***")
    assert TOKEN not in result.stdout + result.stderr


def test_alert_urls_never_appear_in_anything_the_process_writes(
    tmp_path: Path, _mlflow_template_store: Path, receiver: Receiver
) -> None:
    # given alert URLs with a password and tokens, a log file at TRACE, and a job that fails
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(_mlflow_template_store, tmp_path / "mlruns" / "mlflow.db")
    log = tmp_path / "job.log"
    environ = {
        "RMT_ALERTS__URLS": json.dumps(list(_alert_urls(receiver).values())),
        "RMT_LOGGER__SINK": str(log),
        "RMT_LOGGER__LEVEL": "TRACE",
    }
    # and, in a process of its own, standard logging at DEBUG: apprise's and urllib3's records
    script = textwrap.dedent(
        """
        import logging, os
        from regression_model_template.containers import Container, lifespan
        logging.getLogger().setLevel(logging.DEBUG)
        container = Container()
        with lifespan(container):
            alerts = container.alerts_service()
            print(repr(alerts), alerts, alerts.channels)
            alerts.notify("debug run", "to every channel", level="warning")
        """
    )

    # when every command that touches the alerts runs
    outputs = [
        _cli(tmp_path, "config", "show", **environ),
        _cli(tmp_path, "check", "--alert", **environ),
        _cli(tmp_path, "run", "evaluation", **environ),
        _python(tmp_path, "-c", script, **environ),
    ]

    # then the secrets are in none of them, nor in the log file, nor in the alerts sent
    assert outputs[2].returncode == 1 and receiver.requests  # the job failed and alerted
    assert "apprise" in log.read_text()  # apprise's DEBUG records did reach the log file
    written = [o.stdout + o.stderr for o in outputs] + [log.read_text()]
    written += [request.body.decode() for request in receiver.requests]
    for secret in (PASSWORD, TOKEN):
        leaks = [text for text in written if secret in text]
        assert not leaks, (secret, [text[:2000] for text in leaks])
    [urls_line] = [
        line for line in outputs[0].stdout.splitlines() if line.startswith("alerts.urls")
    ]
    assert f'"json://127.0.0.1:{receiver.port}/***"' in urls_line  # shown masked, with its source
    assert urls_line.endswith("# environment RMT_ALERTS__URLS")


def test_a_malformed_set_never_echoes_a_url(tmp_path: Path) -> None:
    result = _cli(tmp_path, "check", "--set", f'alerts.urls:["json://127.0.0.1/{TOKEN}"]')

    assert result.returncode == 2
    assert "expected SECTION.FIELD=VALUE" in result.stderr
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "option",
    [["--port", "0"], ["--port", "70000"], ["--workers", "0"], ["--replicas", "0"]],
)
def test_server_with_an_impossible_port_workers_or_replicas_exits_2_naming_them(
    tmp_path: Path, option: list[str]
) -> None:
    result = _cli(tmp_path, "server", "--folder", str(tmp_path / "stack"), *option)

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(
        "error: --port must be 1-65535, --workers and --replicas at least 1"
    )
    assert not (tmp_path / "stack").exists()  # nothing was started


@pytest.mark.parametrize(
    ("destination", "cause"),
    [("ftp://host/x", "ftp"), ("s3://", "bucket"), ("s3://key:s3cret@bucket/x", "credentials")],
    ids=["scheme", "no-bucket", "credentials-in-it"],
)
def test_server_with_an_unusable_artifacts_destination_exits_2_naming_it(
    tmp_path: Path, destination: str, cause: str
) -> None:
    result = _cli(
        tmp_path, "server", "--folder", str(tmp_path / "stack"),
        "--artifacts-destination", destination,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --artifacts-destination")
    assert cause in result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    assert not (tmp_path / "stack").exists()  # nothing was started


# %% reap


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--stale-after", "0"], "error: --stale-after must be more than 0 seconds (got 0)"),
        (["--stale-after", "-5"], "error: --stale-after must be more than 0 seconds (got -5)"),
        (["--stale-after", "inf"], "error: --stale-after must be more than 0 seconds (got inf)"),
        (["--stale-after", "soon"], "argument --stale-after: invalid float value: 'soon'"),
        ([], "the following arguments are required: --stale-after"),
    ],
    ids=["zero", "negative", "infinite", "not-a-number", "missing"],
)
def test_reap_with_a_bad_stale_after_exits_2_naming_it(
    tmp_path: Path, option: list[str], expected: str
) -> None:
    result = _cli(tmp_path, "reap", *option)

    assert result.returncode == 2, result.stderr
    assert expected in _last_line(result.stderr)
    assert result.stdout == ""
    assert not (tmp_path / "mlruns").exists()  # no store was opened


def test_reap_exits_1_naming_the_store_when_the_server_does_not_answer(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"

    result = _cli(tmp_path, "reap", "--stale-after", "60", MLFLOW_TRACKING_URI=uri)

    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        f"error: MlflowService.tracking_uri: no answer from the tracking server {uri} within "
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_server_with_a_negative_reap_after_exits_2_naming_it(tmp_path: Path, value: str) -> None:
    result = _cli(tmp_path, "server", "--folder", str(tmp_path / "stack"), "--reap-after", value)

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: --reap-after must be 0 (off) or more seconds")
    assert not (tmp_path / "stack").exists()  # nothing was started


# %% server facing a network: bad input refused before anything starts

ADMIN_PASSWORD = "admin-s3cret-password"


@pytest.mark.parametrize(
    "credentials",
    [{}, {"MLFLOW_TRACKING_USERNAME": "alice"}, {"MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}],
    ids=["neither", "no-password", "no-user"],
)
def test_server_on_a_network_address_without_the_admins_variables_exits_2_naming_both(
    tmp_path: Path, credentials: dict[str, str]
) -> None:
    result = _cli(
        tmp_path, "server", "--folder", str(tmp_path / "stack"), "--host", "198.18.9.1",
        **credentials,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1  # one line
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in result.stderr
    assert ADMIN_PASSWORD not in result.stdout + result.stderr
    assert not (tmp_path / "stack").exists()  # nothing was started


def test_server_with_a_password_mlflow_refuses_exits_2_without_showing_it(tmp_path: Path) -> None:
    result = _cli(
        tmp_path, "server", "--folder", str(tmp_path / "stack"), "--host", "198.18.9.1",
        MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD="tiny-pw",
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: MLFLOW_TRACKING_PASSWORD must be at least 12")
    assert "tiny-pw" not in result.stdout + result.stderr
    assert not (tmp_path / "stack").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_server_on_every_address_exits_2_saying_why(tmp_path: Path, host: str) -> None:
    result = _cli(
        tmp_path, "server", "--folder", str(tmp_path / "stack"), "--host", host,
        MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: --host {host} would listen on every address")
    assert "give that address or name" in result.stderr
    assert not (tmp_path / "stack").exists()


@pytest.mark.parametrize("option", ["--tls-cert", "--tls-key"])
def test_server_with_half_a_tls_pair_exits_2(tmp_path: Path, option: str) -> None:
    result = _cli(
        tmp_path, "server", "--folder", str(tmp_path / "stack"), option, str(tmp_path / "x.pem")
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: --tls-cert and --tls-key go together: give both, or neither\n"
    assert not (tmp_path / "stack").exists()


def test_server_with_a_key_of_another_certificate_exits_2_naming_them(tmp_path: Path) -> None:
    from regression_model_template.server.tls import tls_pair

    one, other = tls_pair(tmp_path / "one", "127.0.0.1"), tls_pair(tmp_path / "other", "127.0.0.1")

    result = _cli(
        tmp_path, "server", "--folder", str(tmp_path / "stack"),
        "--tls-cert", str(one.certificate), "--tls-key", str(other.key),
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"error: TLS key {other.key} is not the key of the certificate {one.certificate}\n"
    )
    assert not (tmp_path / "stack").exists()


def test_the_ready_message_says_how_jobs_connect_and_shows_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from regression_model_template.server.stack import TeamServer
    from regression_model_template.server.tls import fingerprint, tls_pair

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    pair = tls_pair(tmp_path, "198.18.9.1")
    stack = TeamServer(
        "https://198.18.9.1:5000",
        "postgresql://postgres:pg-s3cret@127.0.0.1:5432/mlflow",
        tmp_path / "postgres",
        pair.certificate,
    )

    message = cli._ready(stack, str(tmp_path), "198.18.9.1", 300.0)

    assert message.splitlines()[0] == (
        "tracking server ready: https://198.18.9.1:5000 "
        "(database postgresql://postgres:***@127.0.0.1:5432/mlflow)"
    )
    assert f"TLS certificate {pair.certificate} ({fingerprint(pair.certificate)})" in message
    assert (
        f"MLFLOW_TRACKING_URI=https://198.18.9.1:5000 "
        f"MLFLOW_TRACKING_SERVER_CERT_PATH={pair.certificate} "
    ) in message
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in message
    assert "pg-s3cret" not in message and ADMIN_PASSWORD not in message


def test_the_ready_message_masks_a_lone_user_name_and_keeps_the_scheme(tmp_path: Path) -> None:
    from regression_model_template.server.stack import TeamServer

    # a lone user name is taken for a token; "postgres" is also inside "postgresql://"
    uri = "postgresql://postgres@127.0.0.1:5432/mlflow"
    stack = TeamServer("http://127.0.0.1:5000", uri, tmp_path / "postgres")

    message = cli._ready(stack, str(tmp_path), "127.0.0.1", 0.0)

    assert message.splitlines()[0] == (
        "tracking server ready: http://127.0.0.1:5000 "
        "(database postgresql://***@127.0.0.1:5432/mlflow)"
    )
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" not in message and "basic auth" not in message
