"""Stop signals stop the process once: a repeat while it unwinds is ignored.

Asked to stop (SIGTERM from ``kill``, a scheduler or a container stop; SIGINT from Ctrl-C for
the ``server`` command), the process unwinds its stack: the run ends KILLED, its values are
written, the services stop. Supervisors and impatient users often send the signal again. Raising
a second time would cut the unwinding short, in the middle of a flush or of a run's end, and
leave the run RUNNING or values unsent.

Inside :func:`stop_once` the first of its signals raises in the main thread (SIGTERM:
:class:`Terminated`, exit code 143; SIGINT: ``KeyboardInterrupt``). Every later one, until the
block ends, is ignored, and the first repeat says so in one line on stderr. SIGKILL still ends
the process at once; what it leaves in the spool, ``regression-model-template recover`` sends.
``MlflowService`` holds SIGTERM this way while it runs, and the ``server`` command holds both.

Example:
    >>> import signal
    >>> def job() -> None:
    ...     with stop_once(signal.SIGTERM):
    ...         try:
    ...             signal.raise_signal(signal.SIGTERM)  # a scheduler stops the job
    ...         finally:  # the stack unwinds: the run ends, its values are written
    ...             signal.raise_signal(signal.SIGTERM)  # the scheduler insists: ignored
    ...             print("unwound")
    >>> try:
    ...     job()
    ... except Terminated as stop:
    ...     print("exit code", stop.code)
    unwound
    exit code 143
    >>> signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back at the end of the block
    True
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import types
import typing as T

__all__ = ["Terminated", "stop_once"]


class Terminated(SystemExit):
    """Raised in the main thread by the first SIGTERM in a block of :func:`.stop_signals.stop_once`.

    Example:
        >>> Terminated().code
        143
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


# What the first of each signal raises.
_RAISES: dict[signal.Signals, type[BaseException]] = {
    signal.SIGTERM: Terminated,
    signal.SIGINT: KeyboardInterrupt,
}

# The handlers a process has when nobody installed one: the system's, and Python's for SIGINT.
_DEFAULTS = (signal.SIG_DFL, signal.default_int_handler)


class _Stop:
    """The handler of one :func:`stop_once` block: the first signal raises, repeats are ignored.

    It runs in the main thread between two bytecodes, maybe while that thread holds a lock
    (loguru's, a stream's): it takes none. It only sets flags and writes with ``os.write``.
    """

    def __init__(self) -> None:
        self.stopping = False
        self._said = False

    def __call__(self, signum: int, frame: types.FrameType | None) -> None:
        name = signal.Signals(signum)
        if not self.stopping:
            self.stopping = True  # before raising: a repeat arriving now is already ignored
            raise _RAISES[name]()
        if not self._said:
            self._said = True
            line = f"regression_model_template: {name.name} again while stopping: ignored\n"
            with contextlib.suppress(OSError):  # no stderr (closed): nothing to say it on
                os.write(2, line.encode())


def stop_once(*signals: signal.Signals) -> contextlib.AbstractContextManager[None]:
    """Inside the block, the first of ``signals`` raises; later ones are ignored.

    SIGTERM raises :class:`Terminated`, SIGINT ``KeyboardInterrupt``. Each signal is taken
    over only in the main thread and only from its default handler: a handler the
    application installed itself (or SIG_IGN, as a background job has for SIGINT) is left
    alone. At the end of the block each signal gets its handler back, unless something else
    replaced this one meanwhile.

    Raises:
        ValueError: a signal other than SIGTERM and SIGINT.
    """
    unknown = [sig.name for sig in signals if sig not in _RAISES]
    if unknown:
        raise ValueError(f"stop_once takes SIGTERM and SIGINT, not {', '.join(unknown)}")
    return _stopping(signals)


@contextlib.contextmanager
def _stopping(signals: T.Sequence[signal.Signals]) -> T.Iterator[None]:
    stop = _Stop()
    taken: dict[signal.Signals, T.Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            handler = signal.getsignal(sig)
            if handler in _DEFAULTS:
                signal.signal(sig, stop)
                taken[sig] = handler
    try:
        yield
    finally:
        for sig, handler in taken.items():
            if signal.getsignal(sig) is stop:
                signal.signal(sig, handler)
