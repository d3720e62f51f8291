"""Values checked at the call by MLflow's own rules, before they enter a run's spool.

The background writer sends what the spool holds with ``log_batch``: a value the store would
refuse there fails the whole batch, long after the line that logged it. So ``log_metrics`` /
``log_params`` check each value when it is handed over, with the functions MLflow itself
validates with, and convert it to what the spool and the store take:

- metric names and parameter keys: ``str``, and valid MLflow names (letters, digits and
  ``_-. :/`` only, a path that does not resolve to another name, at most 250 characters);
- metric values: any number (Python or numpy; what MLflow converts, as MLflow converts it:
  ``float(value)``, a one-element array or tensor by its item) becomes a ``float``; NaN and
  infinities are kept (the store decides how to write them);
- steps: an integer (``int``, a numpy integer, anything with ``__index__``) within 64 bits,
  stored as ``int`` (raw MLflow writes a numpy step into SQLite as 8 raw bytes); None is 0;
- parameter values: ``str(value)``, cut to MLflow's 6,000 characters with MLflow's warning,
  or refused when ``MLFLOW_TRUNCATE_LONG_VALUES=false`` (MLflow's own setting).

What fails raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` (what raw MLflow raises)
naming the metric or parameter and MLflow's reason. A call is checked whole before anything is
spooled: one bad value refuses the whole call, and the caller can fix it and call again.

MLflow's private functions relied on (tests/io/test_values.py pins their behaviour):
``mlflow.utils.validation._validate_metric`` and ``_validate_param``, and
``mlflow.tracking.metric_value_conversion_utils.convert_metric_value_to_float_if_possible``.
mlflow is imported by the time a writer exists, so importing them at the call costs a lookup.
"""

from __future__ import annotations

import numbers
import operator
import reprlib
import typing as T

if T.TYPE_CHECKING:
    from mlflow.exceptions import MlflowException

__all__ = ["metric_rows", "param_rows"]

# Number types whose float() cannot fail (numpy scalars, float subclasses), met so far: a
# training loop logs the same few types at every step.
_FLOAT_TYPES: set[type] = set()

# Steps are 64-bit integers in every store (SQL BIGINT, protobuf int64).
_STEP_MIN, _STEP_MAX = -(2**63), 2**63 - 1


def metric_rows(
    metrics: T.Mapping[str, T.Any], step: T.Any, timestamp: int, known: set[str]
) -> list[list[T.Any]]:
    """The spool rows ``[key, value, timestamp, step]`` of one ``log_metrics`` call.

    ``known``: names that passed MLflow's name rules already (the caller keeps the set); a
    training loop repeats its names every step, so each name is checked once.

    Raises:
        MlflowException: a name, a value or the step MLflow would refuse (nothing is returned).

    Example:
        >>> import numpy as np
        >>> metric_rows({"loss": np.float32(0.5)}, np.int64(3), 1000, set())
        [['loss', 0.5, 1000, 3]]
        >>> metric_rows({"acc@top1": 0.5}, 0, 1000, set())
        Traceback (most recent call last):
        ...
        mlflow.exceptions.MlflowException: metric 'acc@top1' refused: Invalid value "acc@top1" ...
    """
    step = metric_step(step)
    rows = []
    for key, value in metrics.items():
        if key not in known:
            _check_metric_name(key, timestamp)
            known.add(key)
        if value.__class__ is not float:
            value = _metric_value(key, value, timestamp, step)
        rows.append([key, value, timestamp, step])
    return rows


def metric_step(step: T.Any) -> int:
    """``step`` as an ``int``: None is 0; an integer of any kind within 64 bits.

    Raises:
        MlflowException: ``step`` is not an integer (a float, a string) or exceeds 64 bits.

    Example:
        >>> import numpy as np
        >>> metric_step(np.int64(7)), metric_step(None), metric_step(-1)
        (7, 0, -1)
        >>> metric_step(1.5)
        Traceback (most recent call last):
        ...
        mlflow.exceptions.MlflowException: step 1.5 refused: a step is an integer (MLflow ...
    """
    if step is None:
        return 0
    if step.__class__ is not int:
        try:
            step = operator.index(step)  # numpy integers, bool, 0-d integer tensors
        except TypeError:
            raise _refused(
                f"step {_show(step)}",
                f"a step is an integer (MLflow stores it as a 64-bit integer), "
                f"not {type(step).__name__}",
            ) from None
    if not _STEP_MIN <= step <= _STEP_MAX:
        raise _refused(f"step {step}", "a step is a 64-bit integer: this one does not fit")
    return T.cast(int, step)


def param_rows(params: T.Mapping[str, T.Any]) -> list[list[str]]:
    """The spool rows ``[key, text]`` of one ``log_params`` call (values as text, like MLflow).

    Parameters are logged a few times per run: every key is checked at every call.

    Raises:
        MlflowException: a key MLflow would refuse, or a value longer than MLflow's limit when
            ``MLFLOW_TRUNCATE_LONG_VALUES`` is false (nothing is returned).

    Example:
        >>> param_rows({"alpha": 0.5, "layers": [64, 32]})
        [['alpha', '0.5'], ['layers', '[64, 32]']]
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_param

    rows = []
    for key, value in params.items():
        if not isinstance(key, str):
            raise _refused(f"param {_show(key)}", _not_a_name(key))
        try:
            # returns the Param, its value cut to the limit (MLflow's default) or refused
            param = _validate_param(key, str(value))  # type: ignore[no-untyped-call]
        except MlflowException as exc:
            raise _refused(f"param {_show(key)}", exc.message) from exc
        rows.append([key, param.value])
    return rows


def _check_metric_name(key: T.Any, timestamp: int) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric

    if not isinstance(key, str):
        raise _refused(f"metric {_show(key)}", _not_a_name(key))
    try:
        # The whole metric check with a value and step known to pass: only the name's rules
        # (characters, path, length) can fail, whatever MLflow adds to them later.
        _validate_metric(key, 0.0, timestamp, 0)  # type: ignore[no-untyped-call]
    except MlflowException as exc:
        raise _refused(f"metric {_show(key)}", exc.message) from exc


def _metric_value(key: str, value: T.Any, timestamp: int, step: int) -> float:
    """``value`` as MLflow converts it, or refused with MLflow's reason."""
    cls = value.__class__
    if cls in _FLOAT_TYPES:
        return float(value)
    if cls is int or isinstance(value, numbers.Real):  # numpy, int, bool: MLflow calls float()
        try:
            converted = float(value)
        except OverflowError as exc:  # an int beyond float's range
            raise _refused(f"metric {_show(key)}", f"value {_show(value)}: {exc}") from None
        if issubclass(cls, float) or cls.__module__ == "numpy":
            _FLOAT_TYPES.add(cls)  # float() of these cannot fail: skip the ABC check next time
        return converted
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.metric_value_conversion_utils import (
        convert_metric_value_to_float_if_possible,
    )
    from mlflow.utils.validation import _validate_metric

    try:
        converted = convert_metric_value_to_float_if_possible(value)
    except MlflowException as exc:  # an array or tensor of more than one item
        raise _refused(f"metric {_show(key)}", exc.message) from exc
    except (TypeError, ValueError, OverflowError) as exc:  # float() refused it
        reason = f"value {_show(value)} is not a number: {exc}"
        raise _refused(f"metric {_show(key)}", reason) from None
    if type(converted) is float:
        return converted
    try:  # MLflow's reason: None is a missing value, "abc" not a double
        _validate_metric(key, converted, timestamp, step)  # type: ignore[no-untyped-call]
    except MlflowException as exc:
        raise _refused(f"metric {_show(key)}", exc.message) from exc
    raise _refused(f"metric {_show(key)}", f"value {_show(value)} is not a number")


def _not_a_name(key: object) -> str:
    return f"a name is a str, not {type(key).__name__}"


def _show(value: object) -> str:
    return reprlib.repr(value)  # a long list or array, shortened


def _refused(what: str, reason: str) -> MlflowException:
    from mlflow.exceptions import MlflowException

    error: MlflowException = MlflowException.invalid_parameter_value(f"{what} refused: {reason}")
    return error
