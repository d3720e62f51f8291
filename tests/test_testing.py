"""The pytest plugin, used from a test project as a user would (through pytester)."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

# A user's own job, written as the README shows: it receives the services by injection.
USER_JOBS = """
    from dependency_injector.wiring import Provide
    from loguru import logger

    from regression_model_template.containers import Container, inject
    from regression_model_template.io.services import AlertsService, MlflowService


    @inject
    def scoring(
        score: float,
        alerts: AlertsService = Provide[Container.alerts_service],
        mlflow_service: MlflowService = Provide[Container.mlflow_service],
    ) -> str:
        with mlflow_service.run_context(MlflowService.RunConfig(name="scoring")) as run:
            mlflow_service.log_metrics({"score": score})
        logger.info("scored {}", score)
        alerts.notify("scoring", f"score={score} experiment={mlflow_service.experiment_name}")
        return run.info.run_id


    @inject
    def experiment(mlflow_service: MlflowService = Provide[Container.mlflow_service]) -> str:
        return mlflow_service.experiment_name
"""

CONFTEST = """
    import pytest


    @pytest.fixture
    def service_container_packages() -> list[str]:
        return ["my_project"]
"""

USER_TESTS = """
    import mlflow
    from loguru import logger

    from regression_model_template.containers import lifespan
    from regression_model_template.io.services import MlflowService
    from regression_model_template.testing import Alert

    from my_project import jobs

    LOGS_OF_TEST_A = []


    def test_scoring_alerts_logs_and_tracks(service_container, alerts_outbox, logger_caplog):
        assert alerts_outbox == []
        with lifespan(service_container):
            run_id = jobs.scoring(0.9)
        assert alerts_outbox == [Alert("scoring", "score=0.9 experiment=tests")]
        assert "scored 0.9" in logger_caplog.messages
        run = service_container.mlflow_service().client().get_run(run_id)
        assert (run.info.status, run.data.metrics) == ("FINISHED", {"score": 0.9})


    def test_scoring_with_one_provider_overridden(service_container, alerts_outbox):
        with service_container.mlflow_service.override(MlflowService(
            tracking_uri=service_container.mlflow_service().tracking_uri,
            experiment_name="scoring-test",
        )):
            with lifespan(service_container):
                run_id = jobs.scoring(0.5)
        assert alerts_outbox == [("scoring", "score=0.5 experiment=scoring-test", "info")]
        client = service_container.mlflow_service().client()
        run = client.get_run(run_id)
        assert client.get_experiment(run.info.experiment_id).name == "scoring-test"
        assert service_container.mlflow_service().experiment_name == "tests"


    def test_a_overrides_and_leaves_everything_running(service_container, alerts_outbox, tmp_path):
        # No `with`: the override, the started services and an open run outlive the test body.
        service_container.mlflow_service.override(MlflowService(
            tracking_uri=service_container.mlflow_service().tracking_uri, experiment_name="leaky",
        ))
        service_container.init_resources()
        mlflow.start_run()
        LOGS_OF_TEST_A.append(tmp_path / "logs" / "job.log")
        logger.info("from test a")
        jobs.scoring(0.1)
        assert jobs.experiment() == "leaky"
        assert len(alerts_outbox) == 1


    def test_b_sees_the_original(service_container, alerts_outbox, tmp_path):
        assert alerts_outbox == []
        assert mlflow.active_run() is None
        assert service_container.mlflow_service().experiment_name == "tests"
        assert jobs.experiment() == "tests"
        with lifespan(service_container):
            assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
            jobs.scoring(0.2)
        assert alerts_outbox == [("scoring", "score=0.2 experiment=tests", "info")]
        # Each test logs to its own file: test a's sink was removed when it ended.
        [log_of_test_a] = LOGS_OF_TEST_A
        assert "from test a" in log_of_test_a.read_text()
        assert "scored 0.2" not in log_of_test_a.read_text()
        assert "scored 0.2" in (tmp_path / "logs" / "job.log").read_text()


    def test_c_unwired_after_the_tests(service_container):
        service_container.unwire()
        try:
            jobs.experiment()
        except Exception as error:
            assert type(error).__name__ == "UnwiredError"
        else:
            raise AssertionError("the job ran unwired")
"""


def test_the_fixtures_from_a_user_project(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    pytester.mkpydir("my_project")
    pytester.makepyfile(**{"my_project/jobs": textwrap.dedent(USER_JOBS)})
    pytester.makeconftest(textwrap.dedent(CONFTEST))
    pytester.makepyfile(test_scoring=textwrap.dedent(USER_TESTS))

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-v")

    result.assert_outcomes(passed=5)
    # The tests ran in the order the isolation tests rely on.
    result.stdout.fnmatch_lines(
        [
            "*test_a_overrides_and_leaves_everything_running PASSED*",
            "*test_b_sees_the_original PASSED*",
        ]
    )
    # Nothing was written to the user's project: every store lives in a tmp_path.
    assert not (pytester.path / "mlruns").exists()
    assert not (pytester.path / "mlflow.db").exists()
