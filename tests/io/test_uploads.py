"""Spooled batches as log_batch calls: run ``size`` at a time, every one finished on return."""

from __future__ import annotations

import threading

import pytest

from regression_model_template.io.uploads import Uploaders


@pytest.fixture
def uploaders() -> Uploaders:
    return Uploaders(2)


def test_run_returns_only_once_every_call_has_returned(uploaders: Uploaders) -> None:
    # given a call on the helper thread that is still running when the caller's call returns
    finished: list[str] = []
    gate = threading.Event()

    def slow() -> None:
        gate.wait(10)
        finished.append("slow")

    timer = threading.Timer(0.3, gate.set)
    timer.start()

    # when both run
    uploaders.run([lambda: finished.append("fast"), slow])

    # then run() returned after both: a flush that returns means the store has every value
    assert sorted(finished) == ["fast", "slow"]
    timer.join()
    uploaders.close()


def test_each_calls_error_is_given_after_all_have_run(uploaders: Uploaders) -> None:
    finished: list[int] = []
    error = RuntimeError("refused")

    def refused() -> None:
        raise error

    errors = uploaders.run([lambda: finished.append(1), refused, lambda: finished.append(2)])

    assert errors == [None, error, None]
    assert sorted(finished) == [1, 2]
    uploaders.close()


def test_one_uploader_runs_every_call_in_the_callers_thread() -> None:
    threads: list[str] = []
    uploaders = Uploaders(1)

    uploaders.run([lambda: threads.append(threading.current_thread().name)] * 3)

    assert threads == [threading.current_thread().name] * 3
