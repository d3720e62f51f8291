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
