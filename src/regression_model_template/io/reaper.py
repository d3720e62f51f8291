"""End the runs of jobs that died with their machine: the heartbeat and its reaper.

A run opened by ``MlflowService.run_context`` carries the tag :data:`HEARTBEAT`: the time, in
epoch milliseconds, its job last said it was alive. It is set when the run starts, and again
every ``mlflow.heartbeat_interval`` seconds by the background writer until the run ends. The
spool recovers a job killed on a machine that comes back; a machine that never comes back
(an evicted pod, a reclaimed spot instance) leaves its run RUNNING for ever. :func:`reap` ends
those runs: KILLED, at the time their job was last heard, with the tag :data:`REAPED` saying
why. Runs without a heartbeat (plain MLflow runs, other tools') are never touched.

Reaping is safe from several machines at once (a cron job on each): each run is read again
just before it is ended, and left alone when it ended meanwhile or its heartbeat is fresh
again. A job that was reaped and comes back (a frozen VM, a healed partition) still writes its
values, ends its run with its own status and tags it :data:`RETURNED`.

Example:
    >>> import tempfile
    >>> from mlflow.tracking import MlflowClient
    >>> client = MlflowClient(f"sqlite:///{tempfile.mkdtemp()}/m.db")
    >>> run_id = client.create_run("0", start_time=0, tags={HEARTBEAT: "1000"}).info.run_id
    >>> [(r.run_id == run_id, r.last_heard.isoformat()) for r in reap(client, stale_after=60)]
    [(True, '1970-01-01T00:00:01+00:00')]
    >>> client.get_run(run_id).info.status, client.get_run(run_id).info.end_time
    ('KILLED', 1000)
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
import typing as T

from regression_model_template.io import stores

if T.TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = ["HEARTBEAT", "REAPED", "RETURNED", "Reaped", "period", "reap", "reaping", "stamp", "utc"]

#: When the run's job was last heard: epoch milliseconds, as text.
HEARTBEAT = "rmt.heartbeat"
#: Set by the reaper on a run it ended: why, when the job was last heard, when it was reaped.
REAPED = "rmt.reaped"
#: Set on a reaped run whose job came back and ended it: with what status, when.
RETURNED = "rmt.returned"

_PAGE = 1000  # runs per search_runs call (the SQL stores' page limit is 50,000)


class Reaped(T.NamedTuple):
    """A run the reaper ended KILLED: its ID, its experiment's name, when its job was last heard."""

    run_id: str
    experiment: str
    last_heard: datetime.datetime  # UTC

    def describe(self, now: float | None = None) -> str:
        """One line for a person: the run, its experiment, when it was last heard.

        Example:
            >>> print(Reaped("ab12", "demo", utc(0)).describe(now=90.0))
            reaped run ab12 (experiment demo): KILLED, last heard 1970-01-01T00:00:00Z, 90 s before
        """
        now = time.time() if now is None else now
        silent = now - self.last_heard.timestamp()
        return (
            f"reaped run {self.run_id} (experiment {self.experiment}): KILLED, last heard "
            f"{stamp(self.last_heard)}, {silent:.0f} s before"
        )


def utc(seconds: float) -> datetime.datetime:
    """The UTC time of ``seconds`` since the epoch.

    Example:
        >>> utc(1.5).isoformat()
        '1970-01-01T00:00:01.500000+00:00'
    """
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def stamp(moment: datetime.datetime | float) -> str:
    """``moment`` (a UTC time, or seconds since the epoch) as ISO text, to the second.

    Example:
        >>> stamp(0), stamp(utc(90.4))
        ('1970-01-01T00:00:00Z', '1970-01-01T00:01:30Z')
    """
    if not isinstance(moment, datetime.datetime):
        moment = utc(moment)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def reap(client: MlflowClient, stale_after: float, now: float | None = None) -> list[Reaped]:
    """End KILLED every RUNNING run whose heartbeat is older than ``stale_after`` seconds.

    Looks at every run of every active experiment of ``client``'s store. A run's end time is
    the time its job was last heard; the tag :data:`REAPED` says it was ended because its
    heartbeat stopped, when it was last heard and when it was reaped. Runs without the tag
    :data:`HEARTBEAT` are never touched. ``now``: the time to judge by (default: this
    machine's clock; a job's clock ahead or behind shifts when it counts as stale).

    Returns the runs ended, in the order they were ended.

    Raises:
        ValueError: ``stale_after`` is not above 0.
        MlflowException: the store refused a search or a write (runs ended before stay ended).
    """
    if not stale_after > 0:
        raise ValueError(f"stale_after must be more than 0 seconds, not {stale_after!r}")
    judged_at = time.time() if now is None else now
    cutoff = int((judged_at - stale_after) * 1000)
    reaped: list[Reaped] = []
    with stores.quiet_run_links():  # a server's end of run prints a link with the store's URI
        for experiment_id, name in _experiments(client):
            # All pages first: ending runs while paging would shift the pages after them.
            for run in list(_running(client, experiment_id)):
                heard = _heard(run)
                if heard is None or heard > cutoff:
                    continue
                # Another reaper, or the job itself, may have moved first: read it again.
                again = client.get_run(run.info.run_id)
                heard = _heard(again)
                if again.info.status != "RUNNING" or heard is None or heard > cutoff:
                    continue
                last = utc(heard / 1000)
                why = (
                    "ended KILLED by the reaper because its heartbeat stopped: last heard "
                    f"{stamp(last)}, reaped at {stamp(time.time())}"
                )
                # Tag first: a reaper killed between the two leaves a RUNNING run that the
                # next reaper ends, never a KILLED run without a reason.
                if not _tagged(client, run.info.run_id, why):
                    continue  # another reaper is ending it
                client.set_terminated(run.info.run_id, "KILLED", end_time=heard)
                reaped.append(Reaped(run.info.run_id, name, last))
    return reaped


def period(stale_after: float) -> float:
    """Seconds between two reaps of a reaper ending runs silent for ``stale_after`` seconds.

    A fifth of it, at most a minute: a run is ended at most ``stale_after + period`` seconds
    after its job was last heard.

    Example:
        >>> period(300), period(10)
        (60.0, 2.0)
    """
    return min(stale_after / 5, 60.0)


@contextlib.contextmanager
def reaping(
    tracking_uri: str, stale_after: float, report: T.Callable[[str], None]
) -> T.Iterator[None]:
    """Reap the store at ``tracking_uri`` every :func:`period` seconds, for the block.

    A daemon thread calls :func:`reap`; ``report`` receives one line per run ended, and one
    per failed reap (the store down for a moment: the next round tries again).
    """
    from mlflow.tracking import MlflowClient

    if not stale_after > 0:
        raise ValueError(f"stale_after must be more than 0 seconds, not {stale_after!r}")
    client = MlflowClient(tracking_uri=tracking_uri)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period(stale_after)):
            try:
                for run in reap(client, stale_after):
                    report(run.describe())
            except Exception as exc:  # the next round tries again
                report(f"reaper: the reap failed ({type(exc).__name__}: {exc})".splitlines()[0])

    thread = threading.Thread(target=loop, name="mlflow-reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10.0)  # a reap in progress finishes; a hung store is not waited for


def _experiments(client: MlflowClient) -> T.Iterator[tuple[str, str]]:
    """Each active experiment's ID and name, page by page."""
    from mlflow.entities import ViewType

    token: str | None = None
    while True:
        page = client.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, max_results=_PAGE, page_token=token
        )
        for experiment in page:
            yield experiment.experiment_id, experiment.name
        token = page.token
        if not token:
            return


def _running(client: MlflowClient, experiment_id: str) -> T.Iterator[Run]:
    """The experiment's RUNNING runs that have a heartbeat, page by page."""
    from mlflow.entities import ViewType

    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id],
            f"attributes.status = 'RUNNING' and tags.`{HEARTBEAT}` IS NOT NULL",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=_PAGE,
            page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def _tagged(client: MlflowClient, run_id: str, why: str) -> bool:
    """Set the tag :data:`REAPED`; False: another reaper set it at the same moment.

    SQL stores insert a new tag: two reapers inserting it at once make one of them fail on
    the unique key (seen on SQLite).
    """
    from mlflow.exceptions import MlflowException

    try:
        client.set_tag(run_id, REAPED, why)
    except MlflowException:
        if REAPED not in client.get_run(run_id).data.tags:
            raise
        return False
    return True


def _heard(run: Run) -> int | None:
    """When the run's job was last heard (epoch ms), None: no heartbeat (or not a number)."""
    try:
        return int(run.data.tags[HEARTBEAT])
    except (KeyError, ValueError):
        return None
