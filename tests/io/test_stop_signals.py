"""Stop signals stop the process once: a repeat while it unwinds cannot cut the unwinding short.

Real signals only: raised in this process for :func:`stop_once` itself, and sent to a child
job logging into a SQLite store under ``tmp_path``, whose unwinding takes its time because a
second connection holds the store's write lock, as another job writing to the same file does.
The ``server`` command's stop is in ``tests/integration/test_server_stop.py``.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from regression_model_template.io import spool as spool_files
from regression_model_template.io.stop_signals import Terminated, stop_once
from tests.conftest import CHILD_TIMEOUT, child_job, run_log, wait_until, whole_lines

# %% in this process


def test_the_first_signal_raises_and_repeats_are_ignored_and_said_once(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # given SIGTERM with its default handler, and a block of stop_once
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    raised = []
    with pytest.raises(Terminated) as stop, stop_once(signal.SIGTERM):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # else it would kill
        try:
            # when SIGTERM comes, then again twice while the block unwinds
            signal.raise_signal(signal.SIGTERM)
        except Terminated as first:
            raised.append(first)
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            raise

    # then only the first raised, the repeats were said once on stderr, the default is back
    assert raised == [stop.value] and stop.value.code == 143
    assert capfd.readouterr().err == (
        "regression_model_template: SIGTERM again while stopping: ignored\n"
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_ctrl_c_raises_keyboard_interrupt_once() -> None:
    # given Ctrl-C as in a terminal (a test worker may have it ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        raised = []
        with (
            pytest.raises(KeyboardInterrupt) as stop,
            stop_once(signal.SIGINT, signal.SIGTERM),
        ):
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # else it would kill
            try:
                # when Ctrl-C comes, then again, then SIGTERM, while the block unwinds
                signal.raise_signal(signal.SIGINT)
            except KeyboardInterrupt as first:
                raised.append(first)
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGTERM)  # a stop of another kind: ignored too
                raise

        # then only the first raised, and each signal has its handler back
        assert raised == [stop.value]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def _application_handler(signum: int, frame: types.FrameType | None) -> None:
    pass


@pytest.mark.parametrize("before", [_application_handler, signal.SIG_IGN])
def test_a_handler_the_application_installed_is_left_alone(before: signal.Handlers) -> None:
    previous = signal.signal(signal.SIGTERM, before)
    try:
        with stop_once(signal.SIGTERM):
            assert signal.getsignal(signal.SIGTERM) is before
            signal.raise_signal(signal.SIGTERM)  # handled (or ignored) as the application said
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_nothing_is_installed() -> None:
    seen = []

    def in_a_thread() -> None:
        with stop_once(signal.SIGTERM):
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]


def test_a_signal_it_cannot_stop_on_is_refused_at_the_call() -> None:
    with pytest.raises(ValueError, match=r"^stop_once takes SIGTERM and SIGINT, not SIGHUP$"):
        stop_once(signal.SIGHUP)


# %% a job in a child process

REPEATS = 3  # SIGTERMs after the first

_LOGS_UNTIL_TERMINATED = """
fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
with service:
    with service.run_context(RunConfig(name="terminated", log_system_metrics=False)) as run:
        os.write(fd, f"{run.info.run_id}\\n".encode())
        service.log_params({"alpha": 0.5})
        step = 0
        while True:
            service.log_metrics({"loss": step / 7}, step=step)
            step += 1
            os.write(fd, f"{step}\\n".encode())  # this many log_metrics calls have returned
            if step % 100 == 0:
                time.sleep(0.002)  # a training loop does some work between its values
"""


@contextlib.contextmanager
def _store_busy(store: str) -> Iterator[None]:
    """Hold the SQLite store's write lock, as another job's write does, until the block ends."""
    busy = sqlite3.connect(store.removeprefix("sqlite:///"), isolation_level=None)
    try:
        busy.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        busy.close()  # rolls back: the store is free again


def _last_record(folder: Path) -> dict[str, object]:
    """The last whole record of the run's spool (empty when there is none yet)."""
    records = [record for _, record in spool_files.read_records(folder, 0)]
    return records[-1] if records else {}


@pytest.mark.slow
def test_sigterm_again_while_the_job_unwinds_is_ignored(tmp_path: Path, mlflow_store: str) -> None:
    # given a job logging in a loop, stopped by SIGTERM while its store is busy with another
    # writer, so that its unwinding waits for the store with values still to write
    spool_dir = tmp_path / "spool"
    log = tmp_path / "job.log"
    with child_job(tmp_path, "job", _LOGS_UNTIL_TERMINATED, mlflow_store, spool_dir) as (
        process,
        progress,
    ):
        wait_until(lambda: len(whole_lines(progress)) > 1000, process, "1,000 values", log)
        run_id = whole_lines(progress)[0]
        folder = spool_dir / run_id
        with _store_busy(mlflow_store):
            process.send_signal(signal.SIGTERM)
            wait_until(
                lambda: _last_record(folder) == {"end": "KILLED"},
                process,
                "the run's end, recorded in its spool",
                log,
            )
            assert process.poll() is None  # unwinding: waiting for the store to take the values

            # when SIGTERM comes again during the unwinding, a few times (an impatient supervisor)
            for _ in range(REPEATS):
                process.send_signal(signal.SIGTERM)
                time.sleep(0.5)  # time for the repeat to act, were it not ignored

        # then the job still unwinds to its end, and exits as a terminated process does
        code = process.wait(CHILD_TIMEOUT)
    output = log.read_text(errors="replace")
    assert code == 128 + signal.SIGTERM, output

    # and the run is KILLED with every value whose call returned, its log, and no spool left
    returned = int(whole_lines(progress)[-1])
    client = MlflowClient(mlflow_store)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.params == {"alpha": "0.5"}
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert [value for value, count in Counter(history).items() if count > 1] == []
    assert set(history) >= {(step, step / 7) for step in range(returned)}
    text = run_log(client, run_id, tmp_path)
    assert text is not None and text.endswith("The run ended KILLED (Terminated)\n"), text
    assert not folder.exists()  # nothing left for `recover`
    assert "left open at stop" not in output, output  # it ended where it should, not at stop()
    assert output.count("SIGTERM again while stopping: ignored") == 1, output  # said once
