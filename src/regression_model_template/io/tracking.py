"""A started MlflowService: MLflow pointed at its stores, the metric writer, the open runs.

:class:`TrackingSession` is what ``MlflowService.start()`` opens and ``stop()`` closes. It
also decides how each run ends (:func:`end_status`) and what SIGTERM does.

A job killed by SIGTERM (``kill``, a scheduler, a container stop) would die on the spot with
its run RUNNING and its buffered values lost. While an MlflowService runs, SIGTERM instead
raises :class:`Terminated` in the main thread: the stack unwinds, the run ends KILLED, the
services stop, and the process still exits with code 143. A repeated SIGTERM while it unwinds
is ignored (:mod:`.stop_signals`), so it cannot cut that short.

Example:
    >>> end_status(None), end_status(ValueError()), end_status(KeyboardInterrupt())
    ('FINISHED', 'FAILED', 'KILLED')
    >>> end_status(SystemExit(0)), end_status(SystemExit(2)), end_status(Terminated())
    ('FINISHED', 'FAILED', 'KILLED')
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import typing as T

from loguru import logger

from regression_model_template.io import reaper, run_logs, stores
from regression_model_template.io.batching import StoreUnreachable, WriteError
from regression_model_template.io.errors import ServiceError
from regression_model_template.io.reaper import HEARTBEAT, REAPED, RETURNED
from regression_model_template.io.stop_signals import Terminated, stop_once

if T.TYPE_CHECKING:
    from pathlib import Path

    from mlflow import ActiveRun
    from mlflow.tracking import MlflowClient

    from regression_model_template.io.batching import BatchWriter

Errors = T.Callable[[str, str], contextlib.AbstractContextManager[None]]

__all__ = ["Terminated", "TrackingSession", "end_status"]


def end_status(error: BaseException | None) -> str:
    """Return the status of a run whose block ended with ``error`` (None: it returned)."""
    if error is None:
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt | Terminated):
        return "KILLED"
    if isinstance(error, SystemExit):
        return "FINISHED" if error.code in (0, None) else "FAILED"
    return "FAILED"


class TrackingSession:
    """What a started MlflowService holds: its metric writer and the runs it has open.

    Opened by ``MlflowService.start()`` (:meth:`open`) and closed by ``stop()``. Closing writes
    what is still buffered, ends the runs left open KILLED, and gives back what the session
    changed in the process: the SIGTERM handler and the environment variables MLflow writes.
    Each run's log (:mod:`.run_logs`) is captured while it is open and uploaded at its end.
    """

    def __init__(
        self,
        writer: BatchWriter,
        errors: Errors,
        restore: contextlib.ExitStack,
        store: str,
        end_timeout: float = 60.0,
        client: MlflowClient | None = None,
        run_log: RunLogOptions | None = None,
        redact: T.Callable[[str], str] = str,
    ) -> None:
        self.writer = writer
        self._errors = errors
        self._restore = restore
        self._store = store
        self._end_timeout = end_timeout
        self._client = client
        self._run_log = run_log
        self._redact = redact
        self._open: list[str] = []
        self._gave_up: float | None = None  # the deadline of the last end the store missed
        self.experiment_id = ""  # the experiment runs are started in
        self.last_run_id: str | None = None  # the run started most recently

    @classmethod
    def open(
        cls,
        tracking_uri: str,
        registry_uri: str,
        *,
        experiment_name: str,
        autolog: T.Mapping[str, T.Any],
        writer: T.Mapping[str, T.Any],
        redact: T.Callable[[str], str],
        errors: Errors,
        store: str,
        end_timeout: float = 60.0,
        run_log: RunLogOptions | None = None,
    ) -> TrackingSession:
        """Point MLflow's globals at the stores, select the experiment, set autolog.

        Args:
            tracking_uri: the tracking store.
            registry_uri: the model registry.
            experiment_name: created (beside a SQLite store) or selected.
            autolog: ``mlflow.autolog``'s arguments.
            writer: the :class:`.batching.BatchWriter`'s options.
            redact: masks the store's credentials in messages.
            errors: turns a dependency's exception into a ServiceError (setting, what).
            store: the tracking store, credentials masked, for messages.
            end_timeout: seconds the end of a run waits for the store to take its values.
            run_log: how each run's log is captured (its ``max_bytes`` None: not captured).

        Raises:
            ServiceError: MLflow refused a store or the autolog settings; nothing is left
                changed in the process.
        """
        import mlflow
        from mlflow.tracking import MlflowClient

        with contextlib.ExitStack() as restore:  # undone now if opening fails, else by close()
            restore.enter_context(stores.mlflow_environ())
            restore.enter_context(stop_once(signal.SIGTERM))
            restore.callback(_restore_mlflow_globals, *_mlflow_globals())
            with errors("tracking_uri", f"cannot use the tracking store {store}"):
                client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
                mlflow.set_tracking_uri(tracking_uri)
                mlflow.set_registry_uri(registry_uri)
                stores.ensure_experiment(client, tracking_uri, experiment_name)
                experiment = mlflow.set_experiment(experiment_name)
            with errors("autolog_disable", "cannot configure autolog"):
                mlflow.autolog(**autolog)
            # Imported after mlflow: its exit hook then flushes before MLflow ends runs.
            from regression_model_template.io.batching import BatchWriter

            batch_writer = BatchWriter(
                client, store=store, redact=redact, exit_timeout=end_timeout, **writer
            )
            session = cls(
                batch_writer,
                errors,
                restore.pop_all(),
                store,
                end_timeout,
                client=client,
                run_log=run_log,
                redact=redact,
            )
            session.experiment_id = experiment.experiment_id
            return session

    @contextlib.contextmanager
    def run(self, **start_run: T.Any) -> T.Iterator[ActiveRun]:
        """``mlflow.start_run(**start_run)``, nested when a run is active; end it by its outcome."""
        import mlflow

        # The first heartbeat goes with the start: a job killed in its first seconds has one.
        tags = {**(start_run.pop("tags", None) or {}), HEARTBEAT: str(int(time.time() * 1000))}
        with self._errors("tracking_uri", f"cannot start a run on {self._store}"):
            run = mlflow.start_run(nested=mlflow.active_run() is not None, tags=tags, **start_run)
        self._open.append(run.info.run_id)
        self.last_run_id = run.info.run_id
        try:
            folder = self.writer.open_run(run.info.run_id).folder
            self._capture(run.info.run_id, folder)
        except ServiceError:
            mlflow.end_run("FAILED")
            self._open.remove(run.info.run_id)
            self.writer.finish_run(run.info.run_id, discard=True)
            raise
        try:
            yield run
        except BaseException as error:
            self._finish(run.info.run_id, end_status(error), error)
            raise
        self._finish(run.info.run_id, "FINISHED", None)

    def _capture(self, run_id: str, folder: Path) -> None:
        """Tag the process's records with ``run_id``; capture them into its spool folder."""
        options = self._run_log or RunLogOptions()
        log = None
        if options.max_bytes is not None:
            try:
                log = run_logs.RunLog(folder, options.max_bytes, options.style.secrets)
            except OSError as exc:  # a full disk: the run goes on, its values through memory
                logger.warning("The log of run {} is not kept: {}", run_id, exc)
        run_logs.router.open(run_id, log, options.style)

    def _upload_log(self, run_id: str, deadline: float) -> bool:
        """Upload the run's log from its spool folder; False: it stays there, for ``recover``.

        One try, which waits until ``deadline`` (at least a second).
        """
        if self._client is None:
            return True
        folder = self.writer.spool_dir / run_id
        try:
            with _http_until(deadline):
                run_logs.upload(self._client, run_id, folder)
        except Exception as exc:
            cause = self._redact(f"{type(exc).__name__}: {exc}").splitlines()[0]
            fate = f"it waits in {folder}; `regression-model-template recover` uploads it"
            logger.warning("The log of run {} was not uploaded ({}): {}", run_id, cause, fate)
            return False
        return True

    def active_run_id(self) -> str:
        """The run values go to: the calling thread's active run, else the newest open one."""
        import mlflow

        active = mlflow.active_run()
        if active is not None:
            return str(active.info.run_id)
        if self._open:  # another thread's run: MLflow's active run is per thread
            return self._open[-1]
        raise ServiceError("MlflowService", "run", "no active run: log inside run_context()")

    def close(self) -> None:
        """Write spooled values, end runs left open KILLED, restore the process's state.

        Waits at most ``end_timeout`` in all, and no more once an end of a run found the store
        not answering (that end's time is spent).

        Raises:
            ServiceError: values could not be written (they are kept in the spool).
        """
        deadline = time.monotonic() + self._end_timeout
        if self._gave_up is not None:
            deadline = min(deadline, self._gave_up)
        for run_id in self._open:
            run_logs.router.close(run_id, "The run ended KILLED (left open at stop)")
            self.writer.end_run(run_id, "KILLED")
        reached = False
        try:
            self.writer.close(max(0.0, deadline - time.monotonic()))
            reached = True
        finally:
            try:
                while self._open:
                    run_id = self._open.pop()
                    uploaded = reached and self._upload_log(run_id, deadline)
                    ended = self._end(run_id, "KILLED", deadline, quick=not reached)
                    if ended:
                        logger.warning("Ended run {} left open at stop: KILLED", run_id)
                    self.writer.finish_run(run_id, keep=not (ended and uploaded))
                self._end_other_runs(deadline, quick=not reached)
            finally:
                self._restore.close()

    def _end_other_runs(self, deadline: float, quick: bool) -> None:
        """End runs the job started itself (``mlflow.start_run``) and left open: KILLED.

        They are in this service's store, which MLflow will not point at any more.
        """
        import mlflow

        while (active := mlflow.active_run()) is not None:
            logger.warning("Ended run {} left open at stop: KILLED", active.info.run_id)
            if not self._end(active.info.run_id, "KILLED", deadline, quick=quick):
                break

    def _finish(self, run_id: str, status: str, error: BaseException | None) -> None:
        """Record the end, write the run's values, then end it in the store.

        A value the store refused (set aside; the others are written) makes the run FAILED and
        is reported. The whole end (values, log, status) takes at most ``end_timeout``, and a
        second or so more for the last call: what the store did not take by then stays in the
        spool, for ``recover``.
        """
        if run_id not in self._open:
            return  # close() inside the block already ended it
        deadline = time.monotonic() + self._end_timeout
        self._open.remove(run_id)
        run_logs.router.close(run_id, run_logs.ending(status, error))
        problem: ServiceError | None = None
        try:
            self.writer.end_run(run_id, status)
            self.writer.flush(self._end_timeout)
            self._gave_up = None
        except StoreUnreachable as unreachable:
            self._gave_up = deadline
            self._end(run_id, status, deadline, quick=True)
            folder = self.writer.finish_run(run_id, keep=True)
            problem = ServiceError(
                "MlflowService",
                "end_timeout",
                f"run {run_id} ended {status}, but the tracking store did not take its last "
                f"values within {self._end_timeout:g} s ({unreachable.cause}). They, its log "
                f"and the status wait in {folder}: send them with "
                "`regression-model-template recover`",
            )
        except ServiceError as stopped:  # the writer stopped: what is left stays in the spool
            self._end(run_id, "FAILED" if status == "FINISHED" else status, deadline)
            self.writer.finish_run(run_id, keep=True)
            problem = stopped
        else:
            refused = self.writer.refusals(run_id)
            if refused is not None:
                status = "FAILED" if status == "FINISHED" else status
                problem = WriteError(f"run {run_id} ended {status}: {refused}")
            ended = uploaded = False
            try:  # the log before the end: a FINISHED run has its log
                uploaded = self._upload_log(run_id, deadline)
            finally:  # even when Ctrl-C stops the upload, the run is ended
                try:
                    self._end(run_id, status, deadline)
                    ended = True
                    self._note_return(run_id, status, deadline)
                finally:  # a status or a log that did not reach the store stays in the spool
                    self.writer.finish_run(run_id, keep=not (ended and uploaded))
        if problem is not None:
            if error is None:
                raise problem
            error.add_note(str(problem))

    def _note_return(self, run_id: str, status: str, deadline: float) -> None:
        """Tag a run the reaper had ended (its job was silent) with its job's own end."""
        if self._client is None:
            return
        try:
            with _http_until(deadline):  # a store that hangs now cannot hold the exit
                if REAPED not in self._client.get_run(run_id).data.tags:
                    return
                when = reaper.stamp(time.time())
                said = (
                    f"its job came back after the reaper ended it, and ended it {status} at {when}"
                )
                self._client.set_tag(run_id, RETURNED, said)
        except Exception as exc:  # only a note: the run has ended with its status
            logger.debug("Run {}: the reaped run's return was not tagged: {}", run_id, exc)

    def _end(self, run_id: str, status: str, deadline: float, quick: bool = False) -> bool:
        """End ``run_id`` if it is the active run; return whether the store took the status.

        One try, which waits until ``deadline`` (at least a second) whatever MLflow's HTTP
        settings say. ``quick``: the store is known to be unreachable; a failure is not raised.

        Raises:
            ServiceError: the store did not take the status (not ``quick``); it waits in the
                run's spool folder, for ``recover``.
        """
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != run_id:
            return False  # already ended by the block itself
        # MLflow pops its active run before it writes the status: the job goes on cleanly
        try:
            with _http_until(deadline):
                mlflow.end_run(status)
        except Exception as exc:
            if quick:
                return False
            if time.monotonic() < deadline:  # an answer, not a silence: say what it was
                with self._errors("tracking_uri", f"cannot end run {run_id} as {status}"):
                    raise
            self._gave_up = deadline  # silent: what follows does not wait for it again
            cause = self._redact(f"{type(exc).__name__}: {exc}").splitlines()[0]
            raise ServiceError(
                "MlflowService",
                "end_timeout",
                f"run {run_id} ended {status}, but the tracking store did not take its status "
                f"within {self._end_timeout:g} s ({cause}). It waits in "
                f"{self.writer.spool_dir / run_id}: send it with "
                "`regression-model-template recover`",
            ) from exc
        return True


class RunLogOptions(T.NamedTuple):
    """How a session captures each run's log (``max_bytes`` None: only tags the records)."""

    style: run_logs.LogStyle = run_logs.LogStyle("{message}")
    max_bytes: int | None = None


# MLflow's HTTP settings, read at each request: its retries, pauses and per-request timeout
# (the user's, up to 10 retries of 10 minutes each) would hold the end of a run for hours.
_HTTP_TIMEOUT, _HTTP_RETRIES = "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


@contextlib.contextmanager
def _http_until(deadline: float) -> T.Iterator[None]:
    """MLflow's HTTP requests in the block: one try each, waiting until ``deadline``.

    MLflow's timeout is whole seconds: at least one, so that a call made once the time is
    spent still gets its chance against a store that answers.
    """
    timeout = max(1, math.ceil(deadline - time.monotonic()))
    with stores.environ_restored([_HTTP_TIMEOUT, _HTTP_RETRIES]):
        os.environ.update({_HTTP_TIMEOUT: str(timeout), _HTTP_RETRIES: "0"})
        yield


def _mlflow_globals() -> tuple[str | None, str | None]:
    """MLflow's tracking and registry URIs as set in this process (None: MLflow's default)."""
    import mlflow

    is_set = mlflow.is_tracking_uri_set()  # type: ignore[no-untyped-call]
    tracking = mlflow.get_tracking_uri() if is_set else None
    registry = mlflow.get_registry_uri() if os.environ.get("MLFLOW_REGISTRY_URI") else None
    return tracking, registry


def _restore_mlflow_globals(tracking: str | None, registry: str | None) -> None:
    """Give MLflow its URIs back (None resets to the default) and turn off our autolog."""
    import mlflow

    mlflow.set_tracking_uri(tracking)  # type: ignore[arg-type]
    mlflow.set_registry_uri(registry)  # type: ignore[arg-type]
    with contextlib.suppress(Exception):
        mlflow.autolog(disable=True)
