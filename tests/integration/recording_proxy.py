"""A recording HTTP proxy for tests: what a tracking server receives, seen from in front of it.

MLflow's SQL stores ignore an exact duplicate in ``log_batch``, so a metric sent twice reads back
once: reading the store cannot tell whether a value was sent once. :class:`RecordingProxy`
listens on 127.0.0.1, forwards every request to the real server, and records each ``log-batch``
call on its way (run, metrics, params, when it came and when it was answered). It can also hold
calls before they reach the server:

- :meth:`RecordingProxy.hold_until_in_flight`: each call waits until ``count`` calls are in
  flight at once (or a bounded wait passes): overlap becomes a fact the test observes;
- :meth:`RecordingProxy.hold_call`: one call (the first to come once a condition holds) is held
  until the test forwards it or drops it (the store never receives it), e.g. while the test
  kills the client;
- :meth:`RecordingProxy.hang`: every request, whatever its path, is read and never answered
  until :meth:`RecordingProxy.release` (a wedged server, a partition: connections are accepted,
  nothing comes back).

The proxy is a test tool at the network boundary: the code under test only sees a URL.

Example:
    >>> import json, urllib.request, http.server, threading
    >>> class Upstream(http.server.BaseHTTPRequestHandler):
    ...     def do_POST(self):
    ...         self.rfile.read(int(self.headers["Content-Length"]))
    ...         self.send_response(200)
    ...         self.send_header("Content-Length", "2")
    ...         self.end_headers()
    ...         self.wfile.write(b"{}")
    ...     def log_message(self, *args):
    ...         pass
    >>> upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    >>> _ = threading.Thread(target=upstream.serve_forever, daemon=True).start()
    >>> body = {"run_id": "r1", "metrics": [{"key": "loss", "value": 0.5,
    ...         "timestamp": "1700000000000", "step": "3"}]}
    >>> with RecordingProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
    ...     request = urllib.request.Request(
    ...         proxy.url + LOG_BATCH, json.dumps(body).encode(), method="POST")
    ...     urllib.request.urlopen(request).status
    ...     proxy.metrics()
    200
    [('r1', 'loss', 0.5, 1700000000000, 3)]
    >>> upstream.shutdown(); upstream.server_close()
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import threading
import time
import typing as T
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["LOG_BATCH", "Call", "HeldCall", "Metric", "RecordingProxy"]

LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
# Headers of one connection, not of the request: the proxy's two connections have their own.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
UPSTREAM_TIMEOUT = 300.0  # seconds: longer than MLflow's own (120 s), so the client gives up first

Metric = tuple[str, str, float, int, int]  # run id, key, value, timestamp (ms), step


@dataclass
class Call:
    """One ``log-batch`` request, as it came to the proxy."""

    run_id: str
    metrics: list[Metric]
    params: list[tuple[str, str, str]]  # run id, key, value
    started: float  # time.monotonic() when it came
    ended: float | None = None  # when it was answered (or dropped)
    status: int | None = None  # the server's answer; None: the server never received it


@dataclass
class HeldCall:
    """The first log-batch call to come while ``when(proxy)`` holds, held until the test decides."""

    when: T.Callable[[RecordingProxy], bool]
    arrived: threading.Event = field(default_factory=threading.Event)
    call: Call | None = None
    _decided: threading.Event = field(default_factory=threading.Event)
    _forward: bool = True

    def wait(self, timeout: float) -> Call:
        """Wait until the call is held; return it.

        Raises:
            TimeoutError: it did not come within ``timeout`` seconds.
        """
        if not self.arrived.wait(timeout):
            raise TimeoutError(f"no log-batch call to hold came within {timeout:g} s")
        assert self.call is not None
        return self.call

    def forward(self) -> None:
        """Let it go on to the server."""
        self._forward = True
        self._decided.set()

    def drop(self) -> None:
        """Never send it to the server: its connection is closed without an answer."""
        self._forward = False
        self._decided.set()


class RecordingProxy:
    """Forward every request to ``upstream``; record the log-batch calls; hold some of them.

    A context manager: listening on 127.0.0.1 (a free port) inside the block, stopped after it
    (held calls are let go, so no thread is left waiting).
    """

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Condition()
        self._calls: list[Call] = []
        self.in_flight = 0  # log-batch calls received and not answered yet
        self.max_in_flight = 0  # the most there were at once
        self._hold_count = 1  # each call waits until this many are in flight...
        self._hold_timeout = 0.0  # ...or this many seconds passed
        self._held: list[HeldCall] = []
        self._refusing: int | None = None  # the HTTP status log-batch calls get instead
        self._hanging = False  # every request waits for release() (hang())
        self._released = 0  # release() calls so far: a request held before one is let go
        self._drop_held = False  # what the last release() did with the held requests
        self.hung = 0  # requests held by hang() so far
        self._closed = False
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="recording-proxy", daemon=True
        )

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closed = True
            self._hanging, self._drop_held = False, True
            self._released += 1
            for held in self._held:
                held.drop()
            self._lock.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # -- what the test sets

    def hold_until_in_flight(self, count: int, timeout: float) -> None:
        """From now on, each log-batch call waits until ``count`` are in flight, at most
        ``timeout`` seconds, before it goes to the server (``count`` 1: no wait)."""
        with self._lock:
            self._hold_count, self._hold_timeout = count, timeout
            self._lock.notify_all()

    def hold_call(self, when: T.Callable[[RecordingProxy], bool] = lambda proxy: True) -> HeldCall:
        """Hold the first log-batch call that comes while ``when(self)`` holds (default: the
        next one) until the test forwards or drops it."""
        with self._lock:
            held = HeldCall(when)
            self._held.append(held)
            return held

    def refuse_log_batch(self, status: int | None) -> None:
        """From now on, answer log-batch calls with ``status`` (e.g. 401, as a server whose
        credentials expired does) instead of forwarding them; None: forward them again."""
        with self._lock:
            self._refusing = status

    def hang(self) -> None:
        """From now on, read every request and answer none, until :meth:`release`."""
        with self._lock:
            self._hanging = True

    def release(self, drop: bool = False) -> None:
        """Answer requests again; the held ones go on to the server, as after SIGCONT.

        ``drop``: close the held requests' connections without an answer instead (the server
        never receives them), as when a wedged server is restarted.
        """
        with self._lock:
            self._hanging, self._drop_held = False, drop
            self._released += 1
            self._lock.notify_all()

    def reset_max_in_flight(self) -> None:
        """Count the most calls in flight at once from now."""
        with self._lock:
            self.max_in_flight = self.in_flight

    # -- what the test reads

    def calls(self) -> list[Call]:
        """The log-batch calls so far, in the order they came."""
        with self._lock:
            return list(self._calls)

    def metrics(self, run_id: str | None = None) -> list[Metric]:
        """Every metric value the server received (held and dropped calls left out)."""
        return [
            metric
            for call in self.calls()
            if call.status is not None and run_id in (None, call.run_id)
            for metric in call.metrics
        ]

    def params(self, run_id: str | None = None) -> list[tuple[str, str, str]]:
        """Every parameter the server received (held and dropped calls left out)."""
        return [
            param
            for call in self.calls()
            if call.status is not None and run_id in (None, call.run_id)
            for param in call.params
        ]

    def duplicates(self, run_id: str | None = None) -> dict[Metric, int]:
        """Metric values the server received more than once, with how many times."""
        counts = Counter(self.metrics(run_id))
        return {metric: count for metric, count in counts.items() if count > 1}

    def wait_until(self, condition: T.Callable[[RecordingProxy], bool], timeout: float) -> None:
        """Wait until ``condition(self)`` holds, checked at each change of the calls.

        Raises:
            TimeoutError: it did not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not condition(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"the proxy did not see that within {timeout:g} s")
                self._lock.wait(min(remaining, 0.5))

    # -- the proxy itself

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the server itself offers

            def _any(self) -> None:
                body = _read_body(self)
                if not proxy._wait_while_hanging():
                    self.close_connection = True  # dropped: no answer at all
                    return
                if urllib.parse.urlsplit(self.path).path == LOG_BATCH and self.command == "POST":
                    proxy._log_batch(self, body)
                else:
                    _answer(self, *proxy._forward(self, body))

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

            def log_message(self, *args: T.Any) -> None:
                pass

        return Handler

    def _log_batch(self, handler: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        call = _parse_log_batch(body)
        with self._lock:
            refusing = self._refusing
        if refusing is not None:  # not recorded: the server never had it
            _answer(handler, refusing, [("Content-Type", "text/plain")], b"Unauthorized")
            return
        with self._lock:
            held = next((h for h in self._held if h.call is None and h.when(self)), None)
            if held is not None:
                held.call = call
            self._calls.append(call)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._lock.notify_all()
        try:
            if held is not None:
                held.arrived.set()
                held._decided.wait()
                if not held._forward:
                    handler.close_connection = True  # no answer: the store never had it
                    return
            else:
                self._wait_for_company()
            answer = self._forward(handler, body)
            call.status = answer[0]
            _answer(handler, *answer)
        finally:
            with self._lock:
                call.ended = time.monotonic()
                self.in_flight -= 1
                self._lock.notify_all()

    def _wait_while_hanging(self) -> bool:
        """Hold the request while the proxy hangs; False: drop it (never answered)."""
        with self._lock:
            if not self._hanging:
                return True
            self.hung += 1
            released = self._released
            self._lock.notify_all()
            while self._released == released:
                self._lock.wait()
            return not self._drop_held

    def _wait_for_company(self) -> None:
        with self._lock:
            deadline = time.monotonic() + self._hold_timeout
            while not self._closed and self.in_flight < self._hold_count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._lock.wait(remaining)

    def _forward(
        self, handler: http.server.BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self._upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, kept, data
        except OSError as error:
            return 502, [("Content-Type", "text/plain")], f"proxy: {error}".encode()
        finally:
            connection.close()


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(handler.rfile.readline().split(b";")[0], 16):
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _answer(
    handler: http.server.BaseHTTPRequestHandler,
    status: int,
    headers: list[tuple[str, str]],
    data: bytes,
) -> None:
    with contextlib.suppress(OSError):  # the client may be gone (killed)
        handler.send_response(status)
        for key, value in headers:
            if key.lower() not in ("date", "server"):  # send_response wrote its own
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)


def _parse_log_batch(body: bytes) -> Call:
    """The run, metrics and params of a log-batch body (MLflow's protobuf JSON)."""
    request = json.loads(body or b"{}")
    run_id = str(request.get("run_id") or request.get("run_uuid") or "")
    metrics = [
        (run_id, m["key"], float(m["value"]), int(m.get("timestamp", 0)), int(m.get("step", 0)))
        for m in request.get("metrics", [])
    ]
    params = [(run_id, p["key"], p.get("value", "")) for p in request.get("params", [])]
    return Call(run_id, metrics, params, started=time.monotonic())
