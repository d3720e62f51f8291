"""What a dead process left in the spool: sent to the store, its runs ended with their status.

A run folder whose lock can be taken belongs to no live process (the kernel dropped the lock
when its owner died). :func:`recover` sends the values the store has not acknowledged (only a
batch whose acknowledgement died with the process goes twice; MLflow's SQL stores ignore an
exact duplicate), ends the run with the
status it recorded, or KILLED when the process died mid-run, and deletes the folder. The run's
log captured up to the crash (:mod:`.run_logs`) is uploaded as its ``run.log`` artifact.

A folder of another store is left alone: the credentials come from the current configuration,
and values never go to a store they were not logged for. The store is matched on what it is
(:func:`.stores.store_identity`: ``sqlite:///mlruns/mlflow.db`` in two projects' folders is two
stores), not on the URI's text. A folder of another host is left alone too (a home folder
shared by several machines): its lock says nothing about a process over there, so only a
person who knows that host's job is dead names it (``hosts``).

Example:
    >>> import tempfile
    >>> from mlflow.tracking import MlflowClient
    >>> store = f"sqlite:///{tempfile.mkdtemp()}/m.db"
    >>> client = MlflowClient(store)
    >>> run_id = client.create_run("0").info.run_id
    >>> spool_dir = Path(tempfile.mkdtemp())
    >>> spool = _spool.RunSpool.create(spool_dir, run_id, store)
    >>> _ = spool.append({"m": [["loss", 0.5, 1700000000000, 3]]})
    >>> spool.close(remove=False)  # as if the process had died here
    >>> [report.summary() for report in recover(spool_dir, store, client)] == [
    ...     f"run {run_id}: 1 value(s) sent, ended KILLED"
    ... ]
    True
    >>> client.get_run(run_id).info.status
    'KILLED'
"""

from __future__ import annotations

import shutil
import socket
import typing as T
from pathlib import Path

from regression_model_template.io import run_logs, stores
from regression_model_template.io import spool as _spool
from regression_model_template.io.uploads import Refused, deliver, failure

if T.TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["Elsewhere", "Recovered", "recover"]


class Elsewhere(T.NamedTuple):
    """A run of this store, spooled on another host, that recovery left alone."""

    run_id: str
    host: str
    folder: Path


class Recovered(T.NamedTuple):
    """What recovery did with one run folder.

    Attributes:
        run_id: the run.
        sent: values sent to the store.
        status: the status the run was ended with (None: not ended).
        waiting: why values or the status are still in the spool (None: nothing is).
        damage: what could not be read (a line cut by the kill), if anything.
        folder: the run's spool folder.
        log_bytes: the size of the run's log uploaded as ``run.log`` (None: none uploaded).
        cut: the size of a last record cut by the kill, dropped (0: none). Its ``log_metrics``
            call had not returned: no value it promised is lost.
        refused: what the store refused for good, set aside (None: nothing). A run that had
            ended FINISHED then ends FAILED, as it would have in the job.
    """

    run_id: str
    sent: int
    status: str | None
    waiting: str | None
    damage: tuple[str, ...]
    folder: Path
    log_bytes: int | None = None
    cut: int = 0
    refused: str | None = None

    def summary(self) -> str:
        """One line for a person."""
        text = f"run {self.run_id}: {self.sent} value(s) sent"
        text += f", its log uploaded ({self.log_bytes:,} bytes)" if self.log_bytes else ""
        text += f", ended {self.status}" if self.status else ""
        text += f"; still waiting in {self.folder}: {self.waiting}" if self.waiting else ""
        text += f"; {self.refused}" if self.refused else ""
        text += "".join(f"; damaged spool, {item}" for item in self.damage)
        if self.cut:
            text += (
                f"; the record being written when the process died was cut ({self.cut} bytes, "
                "its call had not returned): dropped"
            )
        return text


def recover(
    spool_dir: Path,
    store: str,
    client: MlflowClient,
    redact: T.Callable[[str], str] = str,
    *,
    identity: str | None = None,
    hosts: T.Collection[str] = (),
    elsewhere: list[Elsewhere] | None = None,
) -> list[Recovered]:
    """Send and end every run in ``spool_dir`` that no live process owns and that ``store`` has.

    ``store`` is the tracking store's URI with its credentials masked, as each spool records
    it; ``identity`` its :func:`.stores.store_identity`, computed where the store was opened
    (None: that of ``store``, now). Runs spooled on this host are recovered, and those of the
    ``hosts`` named; a run of this store spooled on another host goes to ``elsewhere`` when
    given. Never raises for what it finds: a store that cannot be reached, a damaged spool,
    a folder of another store are reported.
    """
    identity = identity if identity is not None else stores.store_identity(store)
    here = socket.gethostname()
    reports = []
    for folder in _spool.spooled_runs(Path(spool_dir)):
        info = _spool.run_info(folder)
        if not _of_store(info, store, identity, client, folder.name):
            continue  # another store's: its own configuration will recover it
        host = str(info.get("host", here))  # no host: written here, by an earlier version
        if host != here and host not in hosts:
            if elsewhere is not None:
                elsewhere.append(Elsewhere(folder.name, host, folder))
            continue
        with _spool.orphan(folder) as mine:
            if mine:
                reports.append(_recover_run(folder, client, redact))
    return reports


def _of_store(
    info: T.Mapping[str, T.Any], store: str, identity: str, client: MlflowClient, run_id: str
) -> bool:
    """Whether the spool whose ``run.json`` is ``info`` was logged for this store."""
    if "store_id" in info:
        return bool(info["store_id"] == identity)
    # Written by an earlier version, which recorded the URI's text only. A relative SQLite
    # path names a different file in each working directory: such a spool is this store's
    # only when the store has its run (run IDs are random: no other store has it).
    text = info.get("store", store)
    if text != store:
        return False
    path = stores.sqlite_path(text)
    if path is None or path.is_absolute():
        return True
    try:
        client.get_run(run_id)
    except Exception:
        return False  # another project's (or unreadable now: left for a later recovery)
    return True


def _recover_run(folder: Path, client: MlflowClient, redact: T.Callable[[str], str]) -> Recovered:
    run_id, sent = folder.name, 0
    damage: list[str] = []
    cut: list[int] = []
    refused = Refused()
    offset = _spool.read_sent(folder)
    # The end is recorded after the last values: it can be sent with them while the status
    # itself did not reach the store (a store that stopped answering just then).
    status = _sent_status(folder, offset) or "KILLED"
    log_bytes = None

    def report(status: str | None, waiting: str | None) -> Recovered:
        # the damage is met again by the read that finds nothing more: report it once
        return Recovered(
            run_id,
            sent,
            status,
            waiting,
            tuple(dict.fromkeys(damage)),
            folder,
            log_bytes,
            max(cut, default=0),
            redact(refused.describe()) if refused.count else None,
        )

    try:
        while (batch := _spool.read_batch(folder, offset, damage=damage, cut=cut)).end > offset:
            refusals = deliver(client, run_id, batch, wait=_give_up)
            if refusals:
                where = _spool.set_aside(folder.parent, run_id, (r.record for r in refusals))
                refused.add(refusals, where)
            _spool.write_sent(folder, batch.end)
            sent += batch.values - len(refusals)
            offset, status = batch.end, batch.status or status
        log_bytes = run_logs.upload(client, run_id, folder)
        run = client.get_run(run_id)
        if run.info.status in ("RUNNING", "SCHEDULED"):
            status = "FAILED" if refused.count and status == "FINISHED" else status
            client.set_terminated(run_id, status)
        else:
            status = run.info.status  # it had ended already: keep what the store says
    except Exception as exc:
        return report(None, redact(failure(exc)))
    shutil.rmtree(folder, ignore_errors=True)
    return report(status, None)


def _sent_status(folder: Path, sent: int) -> str | None:
    """The end status recorded in the part of the spool already sent (None: none there)."""
    status = None
    for position, record in _spool.read_records(folder, 0):
        if position > sent:
            break
        status = record.get("end", status)
    return status


def _give_up(error: Exception, refused: bool) -> None:
    """Recovery does not wait for a store that cannot be reached: the values stay spooled."""
    raise error
