"""Alerts: ``notify`` stays within its bound when a backend hangs or refuses."""

from __future__ import annotations

import contextlib
import os
import time
import typing as T
from pathlib import Path

from benchmarks.common import Context, Row, row, timed


def run(context: Context) -> list[Row]:
    return bench_alerts(context.folder)


def bench_alerts(folder: Path) -> list[Row]:
    from regression_model_template.io.services import AlertsService
    from regression_model_template.io.stores import environ_restored

    script = folder / "bin" / "notify-send"
    script.parent.mkdir(exist_ok=True)
    script.write_text("#!/bin/sh\nsleep 5\n")
    script.chmod(0o755)
    with environ_restored(("PATH", "DISPLAY")):
        os.environ["PATH"] = f"{script.parent}{os.pathsep}{os.environ['PATH']}"
        os.environ["DISPLAY"] = ":99"
        alerts = AlertsService(max_wait=1.0)
        with alerts, open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            elapsed = timed(lambda: alerts.notify("bench", "hanging backend"))
    return [
        row(
            "alerts: notify with a hanging backend (bound 1.0 s)",
            elapsed,
            "s",
            None,
            1.1,
            "<= bound + 0.1 s",
        ),
        row(
            "alerts: notify to 3 URLs, one hanging, one refused (bound 1.0 s)",
            _notify_three_channels(),
            "s",
            None,
            1.1,
            "<= bound + 0.1 s",
        ),
    ]


def _notify_three_channels() -> float:
    """One alert to a webhook that answers, one that hangs 5 s and a refused port (127.0.0.1)."""
    import http.server
    import threading

    from regression_model_template.io.services import AlertsService
    from regression_model_template.io.stores import environ_restored
    from regression_model_template.testing import free_port

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/hang":
                time.sleep(5)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: T.Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    urls = [f"json://127.0.0.1:{port}/ok", f"json://127.0.0.1:{port}/hang"]
    urls.append(f"json://127.0.0.1:{free_port()}/refused")
    try:
        with environ_restored(("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")):
            for name in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS"):
                os.environ.pop(name, None)
            alerts = AlertsService.model_validate({"urls": urls, "max_wait": 1.0})
            with alerts:
                return timed(lambda: alerts.notify("bench", "three channels"))
    finally:
        server.shutdown()
        server.server_close()
