"""Alerts that reach a person: real receivers on 127.0.0.1 for apprise's channels.

A real HTTP server (json://, form://, ntfy://) and a real SMTP server (aiosmtpd, mailto://)
started by the tests; no traffic leaves the machine. The desktop is made unavailable (no
display nor session bus) so that the URLs are the only channels.
"""

from __future__ import annotations

import time
import typing as T

import pytest

from regression_model_template.io.services import AlertsService
from regression_model_template.testing import free_port
from tests.conftest import LogCapture, Receiver, notify_timed

DESKTOP_VARIABLES = ("DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY")
MARGIN = 1.5  # seconds of slack over a configured bound, for a noisy machine


@pytest.fixture(autouse=True)
def headless(monkeypatch: pytest.MonkeyPatch) -> None:
    """No desktop: the URLs are the only channels."""
    for name in DESKTOP_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def alerts(*urls: str, **settings: T.Any) -> AlertsService:
    return AlertsService.model_validate({"app_name": "demo", "urls": list(urls), **settings})


# %% what arrives


@pytest.mark.parametrize("level", ["info", "success", "warning", "failure"])
def test_a_json_webhook_receives_title_message_and_level(receiver: Receiver, level: str) -> None:
    service = alerts(receiver.url("json"))
    with service:
        service.notify("Training", "rmse=53.8", level=level)  # type: ignore[arg-type]

    [request] = receiver.requests
    assert request.path == "/hook"
    payload = request.json()
    assert (payload["title"], payload["message"], payload["type"]) == (
        "Training",
        "rmse=53.8",
        level,
    )


def test_a_form_webhook_and_ntfy_receive_the_alert(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    service = alerts(receiver.url("form", "/form"), receiver.url("ntfy", "/jobs"))
    with service:
        service.notify("Evaluation", "r2=0.45", level="warning")

    by_path = {request.path: request for request in receiver.requests}
    assert by_path["/form"].form()["title"] == "Evaluation"
    assert by_path["/form"].form()["type"] == "warning"
    ntfy = by_path["/"].json()  # ntfy posts to the server's root, naming the topic
    assert (ntfy["topic"], ntfy["title"], ntfy["message"]) == ("jobs", "Evaluation", "r2=0.45")
    assert capsys.readouterr().out == ""  # delivered: no console line


def test_an_email_arrives_with_the_title_as_subject() -> None:
    from email import message_from_bytes

    from aiosmtpd.controller import Controller

    received: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server: T.Any, session: T.Any, envelope: T.Any) -> str:
            received.append(envelope.content)
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        url = f"mailto://127.0.0.1:{port}?from=job@example.com&to=me@example.com"
        service = alerts(url, max_wait=10)
        with service:
            service.notify("training failed", "ValueError: bad input", level="failure")
    finally:
        controller.stop()

    [raw] = received
    mail = message_from_bytes(raw)
    assert mail["Subject"] == "training failed"
    assert mail["To"] == "me@example.com"
    payloads = [part.get_payload(decode=True) for part in mail.walk()]
    texts = [payload.decode() for payload in payloads if isinstance(payload, bytes)]
    assert any("ValueError: bad input" in text for text in texts)


# %% failures: the console, once-per-cause warnings, bounded time


@pytest.mark.parametrize("failure", ["http-500", "refused"])
def test_a_failing_channel_falls_back_to_the_console_with_the_reason(
    receiver: Receiver, failure: str, capsys: pytest.CaptureFixture[str], captured_logs: LogCapture
) -> None:
    receiver.status = 500
    port = receiver.port if failure == "http-500" else free_port()
    service = alerts(f"json://127.0.0.1:{port}/hook")

    with service:
        service.notify("a", "1", level="failure")
        service.notify("b", "2")

    assert capsys.readouterr().out == "[demo] FAILURE a: 1\n[demo] b: 2\n"
    [warning] = captured_logs.messages("WARNING")  # one per channel and cause, not one per alert
    assert warning.startswith(f"Alerts cannot use json://127.0.0.1:{port}/***: ")
    expected = "500" if failure == "http-500" else "onnection"
    assert expected in warning


def test_one_failing_channel_among_several_does_not_reach_the_console(
    receiver: Receiver, capsys: pytest.CaptureFixture[str], captured_logs: LogCapture
) -> None:
    refused = f"json://127.0.0.1:{free_port()}/down"
    service = alerts(refused, receiver.url())

    with service:
        service.notify("Training", "done", level="success")

    assert len(receiver.requests) == 1
    assert capsys.readouterr().out == ""
    [warning] = captured_logs.messages("WARNING")
    assert "127.0.0.1" in warning and "/down" not in warning  # the path is masked


def test_a_slow_channel_is_abandoned_at_max_wait_without_delaying_the_next_alert(
    receiver: Receiver, capsys: pytest.CaptureFixture[str], captured_logs: LogCapture
) -> None:
    receiver.delay = 3.0
    service = alerts(receiver.url(), max_wait=0.5, dedup_seconds=0)

    with service:
        durations = notify_timed(service, ("a", "b"), "slow")

    assert max(durations) < service.max_wait + MARGIN, durations
    assert capsys.readouterr().out == "[demo] a: slow\n[demo] b: slow\n"
    assert len(receiver.requests) == 2  # the second alert was tried again, not skipped
    [warning] = captured_logs.messages("WARNING")
    assert "alerts.max_wait" in warning


def test_the_process_exits_right_after_an_alert_to_a_hanging_channel(
    receiver: Receiver, tmp_path: T.Any
) -> None:
    import subprocess
    import sys

    from regression_model_template.testing import clean_environ

    receiver.delay = 30.0  # far longer than the process may take
    url = receiver.url() + "?rto=60"  # apprise would wait 60 s for the answer
    script = (
        "from regression_model_template.io.services import AlertsService\n"
        f"service = AlertsService(urls=[{url!r}], max_wait=0.5)\n"
        "service.start()\n"
        "service.notify('hanging', 'receiver')\n"
        "print('notified', flush=True)\n"
    )
    environ = clean_environ()
    for name in DESKTOP_VARIABLES:
        environ.pop(name, None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert "notified" in result.stdout
    assert receiver.requests  # the alert was on its way
    assert not receiver.answered.is_set()  # the receiver had not answered when the process ended
    # start-up and imports take a few seconds here; a process held by the send would take 30
    assert elapsed < 15, elapsed


# %% repeats, levels, disabled


def test_repeats_within_the_window_are_sent_once_and_counted_in_the_log(
    receiver: Receiver, captured_logs: LogCapture
) -> None:
    service = alerts(receiver.url(), dedup_seconds=60)

    with service:
        for _ in range(5):
            service.notify("loss is nan", "step 100")
        service.notify("loss is nan", "step 200")  # another message: sent

    assert [r.json()["message"] for r in receiver.requests] == ["step 100", "step 200"]
    assert any(
        "'loss is nan' was repeated 4 more time(s) within 60 s" in m
        for m in captured_logs.messages("INFO")
    )


def test_dedup_zero_sends_every_repeat(receiver: Receiver) -> None:
    service = alerts(receiver.url(), dedup_seconds=0)
    with service:
        for _ in range(3):
            service.notify("same", "alert")
    assert len(receiver.requests) == 3


def test_disabled_alerts_print_with_their_level_and_send_nothing(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    service = alerts(receiver.url(), enable=False)
    with service:
        service.notify("Training", "done", level="success")
        service.notify("Training", "done")

    assert receiver.requests == []
    assert capsys.readouterr().out == "[demo] SUCCESS Training: done\n[demo] Training: done\n"


def test_an_unknown_level_is_sent_as_info_with_one_warning(
    receiver: Receiver, captured_logs: LogCapture
) -> None:
    service = alerts(receiver.url())
    with service:
        service.notify("t", "m", level="urgent")  # type: ignore[arg-type]

    assert receiver.requests[0].json()["type"] == "info"
    assert any("unknown alert level 'urgent'" in m for m in captured_logs.messages("WARNING"))


def test_a_url_apprise_refuses_is_warned_masked_and_skipped(
    receiver: Receiver, captured_logs: LogCapture
) -> None:
    service = alerts("nosuchscheme://T0KENsecret/abc", receiver.url())
    with service:
        assert service.channels == [f"json://127.0.0.1:{receiver.port}/***"]
        service.notify("t", "m")

    assert len(receiver.requests) == 1
    [warning] = captured_logs.messages("WARNING")
    assert "nosuchscheme://***" in warning
    assert "T0KENsecret" not in " ".join(m for _, m in captured_logs.records)


def test_stop_sends_later_alerts_to_the_console(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    service = alerts(receiver.url())
    service.start()
    service.stop()
    service.notify("late", "alert")
    assert receiver.requests == []
    assert capsys.readouterr().out == "[demo] late: alert\n"
