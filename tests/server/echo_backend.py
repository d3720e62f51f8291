"""A tiny HTTP backend for the balancer's tests: ``python echo_backend.py PORT NAME``.

- ``GET /health``: 200.
- ``GET /any``: 200 and JSON naming this backend and the headers it received.
- ``GET /hold?file=PATH``: answers once PATH exists (a request kept in flight).
- ``GET|POST /die?name=N``: the backend named N exits without answering (a crash mid-request).
- ``POST /any``: 200 and JSON naming this backend and the body's length.
"""

from __future__ import annotations

import http.server
import json
import os
import sys
import time
import typing as T
import urllib.parse
from pathlib import Path

NAME = ""


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's gunicorn
    wbufsize = 65536  # headers and body in one write (no Nagle delay per request)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        self._die_when_asked(url.path, query)
        if url.path == "/hold":
            while not Path(query["file"]).exists():
                time.sleep(0.02)
        headers = {name: self.headers.get(name) for name in self.SHOWN}
        self._answer({"name": NAME, "path": url.path, "headers": headers})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        url = urllib.parse.urlsplit(self.path)
        self._die_when_asked(url.path, dict(urllib.parse.parse_qsl(url.query)))
        self._answer({"name": NAME, "length": len(body)})

    SHOWN = ("Host", "X-Forwarded-For", "X-Forwarded-Proto")

    def _die_when_asked(self, path: str, query: dict[str, str]) -> None:
        if path == "/die" and query.get("name") == NAME:
            os._exit(3)

    def _answer(self, payload: dict[str, T.Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: T.Any) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: T.Any, client_address: T.Any) -> None:
        pass  # haproxy closes its health checks with a reset: not worth a traceback


if __name__ == "__main__":
    NAME = sys.argv[2]
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
