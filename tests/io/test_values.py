"""Values are checked at the call by MLflow's rules: refused there, or stored, never lost later."""

from __future__ import annotations

import math
import typing as T

import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from regression_model_template.io.services import MlflowService

RunConfig = MlflowService.RunConfig


@pytest.fixture
def service(mlflow_store: str) -> T.Iterator[MlflowService]:
    # end_timeout bounds the wait of a writer that stalls (what a non-str key used to cause)
    service = MlflowService(
        tracking_uri=mlflow_store,
        experiment_name="values",
        autolog_disable=True,
        flush_interval=0.2,
        end_timeout=10.0,
    )
    with service:
        yield service


def _run_config(name: str) -> MlflowService.RunConfig:
    return RunConfig(name=name, log_system_metrics=False)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[T.Any, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _status(client: MlflowClient, run_id: str) -> str:
    return str(client.get_run(run_id).info.status)


def _refusal(error: pytest.ExceptionInfo[MlflowException]) -> str:
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"
    return error.value.message


# %% the loops of issue 19


def test_a_numpy_loop_stores_every_value_at_integer_steps(service: MlflowService) -> None:
    # given a training loop written with numpy: int64 steps, float64 and float32 values
    with service.run_context(_run_config("numpy")) as run:
        for step in np.arange(2000):
            service.log_metrics(
                {"loss": np.float64(1.0) / (step + 1), "lr": np.float32(0.5)}, step=step
            )

    # then every value is stored at its step, the steps as integers (not 8 raw bytes)
    client = service.client()
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert len(loss) == 2000
    assert all(type(m.step) is int for m in loss)
    assert sorted((m.step, m.value) for m in loss) == [(s, 1.0 / (s + 1)) for s in range(2000)]
    assert {m.value for m in client.get_metric_history(run.info.run_id, "lr")} == {0.5}
    assert _status(client, run.info.run_id) == "FINISHED"


def test_one_bad_name_is_refused_at_the_call_and_the_loop_goes_on(
    service: MlflowService,
) -> None:
    refusals: list[str] = []

    # given a 3,000-step loop that logs a name MLflow refuses once, at step 1,500
    with service.run_context(_run_config("bad-name")) as run:
        for step in range(3000):
            service.log_metrics({"loss": step * 0.5}, step=step)
            if step == 1500:
                with pytest.raises(MlflowException) as error:  # the job decides what it means
                    service.log_metrics({"acc@top1": 0.5}, step=step)
                refusals.append(_refusal(error))

    # then that call raised with MLflow's reason naming the key, and nothing else was lost
    assert len(refusals) == 1
    assert "acc@top1" in refusals[0]
    assert "Names may only contain" in refusals[0]
    client = service.client()
    assert len(_history(client, run.info.run_id, "loss")) == 3000
    assert _history(client, run.info.run_id, "acc@top1") == []
    assert _status(client, run.info.run_id) == "FINISHED"


def test_a_key_that_is_not_a_string_raises_at_once_and_nothing_stalls(
    service: MlflowService,
) -> None:
    # given a loop that once logs a metric under an int key
    with service.run_context(_run_config("int-key")) as run:
        for step in range(1000):
            service.log_metrics({"loss": step * 0.5}, step=step)
            if step == 500:
                with pytest.raises(MlflowException) as error:
                    service.log_metrics({1: 0.5}, step=step)  # type: ignore[dict-item]

    # then the call raised naming the key, and the run ended (not after end_timeout) with all
    # the other values
    assert "metric 1 refused: a name is a str, not int" in _refusal(error)
    client = service.client()
    assert len(_history(client, run.info.run_id, "loss")) == 1000
    assert _status(client, run.info.run_id) == "FINISHED"


@pytest.mark.parametrize(
    "value", ["abc", None, [0.5, 0.25], np.array([1.0, 2.0])], ids=["text", "none", "list", "array"]
)
def test_a_value_that_is_not_a_number_refuses_the_whole_call(
    service: MlflowService, value: T.Any
) -> None:
    # given a call with a good value and one that is not a number
    with service.run_context(_run_config("not-a-number")) as run:
        service.log_metrics({"loss": 1.0}, step=0)
        with pytest.raises(MlflowException) as error:
            service.log_metrics({"loss": 0.5, "acc": value}, step=1)
        service.log_metrics({"loss": 0.25}, step=2)

    # then it raised naming the key, and nothing of that call was stored, not even the good value
    assert "metric 'acc' refused" in _refusal(error)
    client = service.client()
    assert _history(client, run.info.run_id, "loss") == [(0, 1.0), (2, 0.25)]
    assert _history(client, run.info.run_id, "acc") == []
    assert _status(client, run.info.run_id) == "FINISHED"


def test_numbers_mlflow_converts_are_stored_as_floats(service: MlflowService) -> None:
    # given the values mlflow.log_metric takes besides floats
    values = {
        "int": 3,
        "bool": True,
        "text": "1.5",
        "nan": float("nan"),
        "item": np.array([0.25]),
        "numpy_int": np.int32(7),
    }
    with service.run_context(_run_config("numbers")) as run:
        service.log_metrics(values, step=np.uint8(4))  # type: ignore[arg-type]

    # then each is stored as MLflow stores it, at an integer step
    client = service.client()
    stored = {key: _history(client, run.info.run_id, key) for key in values}
    [(nan_step, nan)] = stored.pop("nan")
    assert (nan_step, math.isnan(nan)) == (4, True)
    assert stored == {
        "int": [(4, 3.0)],
        "bool": [(4, 1.0)],
        "text": [(4, 1.5)],
        "item": [(4, 0.25)],
        "numpy_int": [(4, 7.0)],
    }


@pytest.mark.parametrize("step", [1.5, "3", 2**63], ids=["float", "text", "beyond-64-bits"])
def test_a_step_that_is_not_a_64_bit_integer_is_refused(
    service: MlflowService, step: T.Any
) -> None:
    # given a call at a step that MLflow's stores cannot hold as an integer
    with service.run_context(_run_config("step")) as run, pytest.raises(MlflowException) as error:
        service.log_metrics({"loss": 0.5}, step=step)

    # then it raised naming the step, and nothing was stored
    assert f"step {step!r} refused" in _refusal(error)
    assert _history(service.client(), run.info.run_id, "loss") == []


def test_a_bad_param_name_refuses_the_call_and_the_caller_can_retry(
    service: MlflowService,
) -> None:
    # given a call with a good parameter and one MLflow refuses, then the fixed call
    with service.run_context(_run_config("bad-param")) as run:
        with pytest.raises(MlflowException) as error:
            service.log_params({"alpha": 1, "lr@start": 0.1})
        service.log_params({"alpha": 2, "lr_start": 0.1})
        service.log_metrics({"loss": 0.5})

    # then the first call raised naming the key, and only the fixed call was stored
    assert "param 'lr@start' refused" in _refusal(error)
    client = service.client()
    assert client.get_run(run.info.run_id).data.params == {"alpha": "2", "lr_start": "0.1"}
    assert _status(client, run.info.run_id) == "FINISHED"


def test_a_param_value_over_mlflows_limit_is_cut_or_refused_as_mlflow_says(
    service: MlflowService, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = "x" * 6001
    with service.run_context(_run_config("long-param")) as run:
        # given MLflow's default, the value is cut to 6,000 characters, as mlflow.log_param does
        service.log_params({"cut": long})
        # given MLflow told not to cut, it is refused at the call
        monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")
        with pytest.raises(MlflowException) as error:
            service.log_params({"refused": long})
        service.log_metrics({"loss": 0.5})

    assert "param 'refused' refused" in _refusal(error)
    assert "6000" in _refusal(error)
    client = service.client()
    assert client.get_run(run.info.run_id).data.params == {"cut": "x" * 6000}
    assert _status(client, run.info.run_id) == "FINISHED"


# %% MLflow's private functions that io/values.py relies on: an upgrade that changes them fails here


def test_mlflows_metric_validator_checks_names_and_values() -> None:
    from mlflow.utils import validation

    _validate_metric: T.Callable[..., None] = validation._validate_metric  # untyped in MLflow
    for good in ("loss", "eval/acc:top-1 x.y_z", "a" * 250):
        _validate_metric(good, 0.0, 0, 0)  # does not raise
    for name, reason in [
        ("acc@top1", "Names may only contain"),
        ("a/../b", "must not resolve to other names"),
        ("", "must not resolve to other names"),
        ("a" * 251, "exceeds the maximum length of 250"),
    ]:
        with pytest.raises(MlflowException, match=reason) as error:
            _validate_metric(name, 0.0, 0, 0)
        assert error.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="Missing value"):
        _validate_metric("loss", None, 0, 0)
    with pytest.raises(MlflowException, match='Invalid value "abc"'):
        _validate_metric("loss", "abc", 0, 0)


def test_mlflows_param_validator_checks_keys_and_cuts_long_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.entities import Param
    from mlflow.utils import validation

    _validate_param: T.Callable[..., Param] = validation._validate_param  # untyped in MLflow
    assert _validate_param("alpha", "0.5").value == "0.5"
    assert _validate_param("alpha", "x" * 6001).value == "x" * 6000
    with pytest.raises(MlflowException, match="Names may only contain"):
        _validate_param("lr@start", "1")
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")
    with pytest.raises(MlflowException, match="exceeds the maximum length of 6000"):
        _validate_param("alpha", "x" * 6001)


def test_mlflows_metric_conversion_takes_numbers_and_leaves_the_rest() -> None:
    from mlflow.tracking import metric_value_conversion_utils as conversion

    convert: T.Callable[[T.Any], T.Any] = conversion.convert_metric_value_to_float_if_possible

    converted = [convert(v) for v in (np.float32(0.5), "1.5", np.array([0.25]), True)]
    assert converted == [0.5, 1.5, 0.25, 1.0]
    assert all(type(value) is float for value in converted)
    assert convert("abc") == "abc"
    assert convert(None) is None
    with pytest.raises(MlflowException, match="Failed to convert metric value to float"):
        convert(np.array([1.0, 2.0]))
    with pytest.raises(TypeError):
        convert([0.5])
