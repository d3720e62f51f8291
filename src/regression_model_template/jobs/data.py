"""The dataset and metrics shared by the jobs (scikit-learn's diabetes data: no download)."""

from __future__ import annotations

import typing as T

from regression_model_template.jobs import JobsConfig


def load_split(config: JobsConfig) -> tuple[T.Any, T.Any, T.Any, T.Any]:
    """Return ``x_train, x_test, y_train, y_test``: the seeded split both jobs use.

    Example:
        >>> x_train, x_test, y_train, y_test = load_split(JobsConfig(test_size=0.25))
        >>> len(x_test), len(x_train)
        (111, 331)
    """
    from sklearn.datasets import load_diabetes
    from sklearn.model_selection import train_test_split

    features, target = load_diabetes(return_X_y=True, as_frame=True)
    return T.cast(
        tuple[T.Any, T.Any, T.Any, T.Any],
        tuple(
            train_test_split(
                features, target, test_size=config.test_size, random_state=config.random_state
            )
        ),
    )


def describe_split(x_train: T.Any, x_test: T.Any) -> str:
    """One line on the data a job uses: its size and how it was split.

    Example:
        >>> print(describe_split(*load_split(JobsConfig(test_size=0.25))[:2]))
        diabetes data (scikit-learn): 442 rows x 10 columns, split 331 train / 111 test
    """
    rows, columns = len(x_train) + len(x_test), x_train.shape[1]
    return (
        f"diabetes data (scikit-learn): {rows} rows x {columns} columns, "
        f"split {len(x_train)} train / {len(x_test)} test"
    )


def describe_settings(config: JobsConfig) -> str:
    """The job's settings as one line, ``name=value`` each.

    Example:
        >>> describe_settings(JobsConfig(alpha=0.5))
        'alpha=0.5 model_alias=champion model_version=None random_state=42 test_size=0.2'
    """
    return " ".join(f"{name}={value}" for name, value in sorted(config.model_dump().items()))


def describe_metrics(metrics: T.Mapping[str, float]) -> str:
    """Metrics as one line, 4 significant digits each.

    Example:
        >>> describe_metrics({"rmse": 53.7812, "r2": 0.45408})
        'rmse=53.78 r2=0.4541'
    """
    return " ".join(f"{name}={value:.4g}" for name, value in metrics.items())


def regression_metrics(actual: T.Any, predicted: T.Any) -> dict[str, float]:
    """Return rmse, mae and r2.

    Example:
        >>> regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
        {'rmse': 0.5773502691896257, 'mae': 0.3333333333333333, 'r2': 0.5}
    """
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    return {
        "rmse": float(mean_squared_error(actual, predicted) ** 0.5),
        "mae": float(mean_absolute_error(actual, predicted)),
        "r2": float(r2_score(actual, predicted)),
    }
