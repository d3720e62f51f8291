"""Replicas of ``mlflow server`` behind the balancer: kept running, restarted one at a time.

Written by hand because it is the stack's own policy, not a server: haproxy already takes a
replica that stops answering out of rotation; what it cannot do is start the replica again,
or restart them in turn without a job noticing (drain, wait for the requests in flight, stop,
start, wait until the balancer has it back, then the next).
"""

from __future__ import annotations

import threading
import time
import typing as T

if T.TYPE_CHECKING:
    from regression_model_template.server.balancer import Balancer
    from regression_model_template.server.tracking_server import MlflowServer

__all__ = ["Replicas"]

#: How often the replicas are looked at (a dead one is restarted within this).
CHECK_EVERY = 0.2
#: The longest wait for a drained replica's requests in flight: as long as a request may take
#: (gunicorn's timeout in ``tracking_server.GUNICORN``, a 10-minute model upload). Past
#: this the replica is stopped anyway (SIGTERM, then SIGKILL 10 s later).
DRAIN_SECONDS = 600.0
#: The longest wait for the balancer to have a restarted replica back in rotation.
BACK_SECONDS = 30.0
#: The pause before starting again a replica whose restart failed.
RETRY_SECONDS = 5.0


class Replicas:
    """Watch the started ``servers`` behind ``balancer`` for the block, from a thread.

    A replica whose process exits (a crash, the kernel's OOM killer, a ``kill -9``) is out of
    rotation at once (the balancer sees its connections refused) and is started again here,
    on the same port; each restart is told to ``report`` in a line. :meth:`restart` restarts
    them all, one at a time. Used by :func:`regression_model_template.server.stack.team_server`;
    ``servers[i]`` is the balancer's backend ``i``.
    """

    def __init__(
        self,
        servers: T.Sequence[MlflowServer],
        balancer: Balancer,
        report: T.Callable[[str], None],
    ) -> None:
        self._servers = list(servers)
        self._balancer = balancer
        self._report = report
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._asked = self._done = 0  # rolling restarts asked for, and done
        self._thread = threading.Thread(target=self._watch, name="rmt-replicas", daemon=True)

    def __enter__(self) -> Replicas:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        for server in self._servers:  # cuts short a start under way: its wait fails fast
            server.stop()
        self._thread.join()
        for server in self._servers:  # anything the thread started meanwhile
            server.stop()
        with self._changed:
            self._changed.notify_all()

    @property
    def count(self) -> int:
        """How many replicas there are (running or being started again)."""
        return len(self._servers)

    def groups(self) -> list[int]:
        """The process-group id of each replica started (what ``kill -9 -- -ID`` ends).

        Example (a test killing a replica)::

            os.killpg(stack.replicas.groups()[0], signal.SIGKILL)
        """
        return [s.process.pid for s in self._servers if s.process is not None]

    def serving(self) -> bool:
        """Whether the stack serves: the balancer runs, and the replicas are looked after."""
        return self._thread.is_alive() and self._balancer.alive()

    def up(self) -> int:
        """How many replicas the balancer has in rotation now."""
        return sum(self._balancer.is_up(index) for index in range(len(self._servers)))

    def restart(self, wait: bool = True) -> None:
        """Restart every replica, one at a time, the others serving meanwhile.

        Each is drained first (no new request goes to it; those in flight finish, for up to
        ``DRAIN_SECONDS``, 600 s), stopped, started, and put back once the balancer has it in
        rotation; a replica that does not come back ends the round there, the others left
        serving (reported). ``wait``: return when the round is over (False: at once, as the
        ``server`` command's SIGHUP does). Asked again while one is under way, it runs once
        more after it.
        """
        with self._changed:
            self._asked += 1
            asked = self._asked
            while wait and self._done < asked and self._thread.is_alive():
                self._changed.wait(1.0)

    def _watch(self) -> None:
        while not self._stopping.wait(CHECK_EVERY):
            try:
                self._look()
            except Exception as error:  # never a silent end: the replicas would go unwatched
                self._report(f"replicas: {type(error).__name__}: {error}; looking again")
                self._stopping.wait(RETRY_SECONDS)
        with self._changed:  # a restart() waiting ends too
            self._changed.notify_all()

    def _look(self) -> None:
        for index, server in enumerate(self._servers):
            code = server.exited()
            if (code is not None or server.process is None) and not self._stopping.is_set():
                self._revive(index, "was down" if code is None else f"exited ({code})")
        with self._changed:
            asked = self._asked
        if asked > self._done:
            try:
                self._roll()
            finally:
                with self._changed:
                    self._done = asked
                    self._changed.notify_all()

    def _revive(self, index: int, why: str) -> bool:
        """Start replica ``index`` again; False (and reported) when it fails."""
        server, began = self._servers[index], time.monotonic()
        server.stop()  # what is left of its process group (its workers may outlive it)
        if self._stopping.is_set():
            return False
        try:
            server.start(tied=True)  # this thread lives as long as the replicas
        except RuntimeError as error:
            if not self._stopping.is_set():
                first = str(error).splitlines()[0]
                self._report(f"replica r{index + 1} did not start again ({first}); next try "
                             f"in {RETRY_SECONDS:g} s, its output in {server.log}")  # fmt: skip
                self._stopping.wait(RETRY_SECONDS)
            return False
        if why:
            self._report(f"replica r{index + 1} {why}: restarted in "
                         f"{time.monotonic() - began:.1f} s")  # fmt: skip
        return True

    def _roll(self) -> None:
        for index in range(len(self._servers)):
            if self._stopping.is_set() or not self._restart_one(index):
                return

    def _restart_one(self, index: int) -> bool:
        """Drain, restart and put back replica ``index``; False when it is not back."""
        began = time.monotonic()
        self._balancer.drain(index)
        self._until(lambda: self._balancer.active(index) == 0, DRAIN_SECONDS)
        started = self._revive(index, "")
        self._balancer.ready(index)
        if started and self._until(lambda: self._balancer.is_up(index), BACK_SECONDS):
            self._report(f"rolling restart: replica r{index + 1} back in "
                         f"{time.monotonic() - began:.1f} s")  # fmt: skip
            return True
        if not self._stopping.is_set():
            self._report(f"rolling restart stopped: replica r{index + 1} is not back in rotation "
                         "(the others are left as they are; see its output)")  # fmt: skip
        return False

    def _until(self, condition: T.Callable[[], bool], seconds: float) -> bool:
        """Wait for ``condition`` (at most ``seconds``, or until the block ends); its value."""
        deadline = time.monotonic() + seconds
        while not (met := condition()) and time.monotonic() < deadline:
            if self._stopping.wait(0.1):
                return False
        return met
