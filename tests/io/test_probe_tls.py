"""The start-time probe asks a tracking server the way MLflow's client will: TLS and credentials.

A real HTTPS server on 127.0.0.1 (``http.server`` with an ``ssl`` context) with a self-signed
pair made here, answering 200, or 401 to a request without the right user and password.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import ipaddress
import ssl
import threading
import typing as T
from dataclasses import dataclass
from pathlib import Path

import pytest

from regression_model_template.io import stores
from regression_model_template.io.services import ServiceError

PASSWORD = "pr0be-Pa55w0rd"
USER = "alice"
CLIENT_VARIABLES = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)


def self_signed_pair(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate valid for the IP address ``host``, and its key, in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.crt", folder / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Server:
    """A running server: its URL, its certificate (None: plain HTTP), what it was sent."""

    url: str
    certificate: Path | None
    authorizations: list[str | None]


@contextlib.contextmanager
def answering_server(
    folder: Path, *, tls: bool = True, users: T.Mapping[str, str] | None = None
) -> T.Iterator[Server]:
    """Serve on 127.0.0.1 for the block: 200, or 401 without one of ``users`` (when given)."""
    received: list[str | None] = []
    accepted = {
        "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        for user, password in (users or {}).items()
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            authorization = self.headers.get("Authorization")
            received.append(authorization)
            refused = users is not None and authorization not in accepted
            body = b"You are not authenticated." if refused else b"ok"
            self.send_response(401 if refused else 200)
            if refused:
                self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: T.Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    certificate = None
    if tls:
        certificate, key = self_signed_pair(folder)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    try:
        yield Server(f"{scheme}://127.0.0.1:{server.server_address[1]}", certificate, received)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(autouse=True)
def _no_client_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test sets MLflow's client variables itself; no ~/.mlflow/credentials either."""
    for name in CLIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_an_untrusted_certificate_says_so_and_names_the_variable(tmp_path: Path) -> None:
    # given an HTTPS server with a self-signed certificate nobody trusts, when the probe asks it
    with answering_server(tmp_path) as server, pytest.raises(ServiceError) as error:
        stores.probe_server(server.url, timeout=10)

    # then the message says the certificate is not trusted and how to trust it
    message = str(error.value)
    assert message.startswith(
        f"MlflowService.tracking_uri: cannot connect to the tracking server {server.url}: "
        "its certificate is not trusted (self-signed certificate)"
    ), message
    assert "set MLFLOW_TRACKING_SERVER_CERT_PATH to the server's certificate" in message
    assert "(it is not set)" in message
    assert "no answer" not in message


def test_a_certificate_trusted_by_mlflow_tracking_server_cert_path_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with answering_server(tmp_path) as server:
        # given the job trusts the server's certificate the way MLflow's client does
        assert server.certificate is not None
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(server.certificate))

        # when the probe asks it / then it passes, and the server was asked
        stores.probe_server(server.url, timeout=10)
        assert server.authorizations == [None]


def test_another_certificate_in_the_variable_is_named_in_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given the variable names the certificate of another server
    (tmp_path / "other").mkdir()
    other, _ = self_signed_pair(tmp_path / "other")
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(other))

    with answering_server(tmp_path) as server, pytest.raises(ServiceError) as error:
        stores.probe_server(server.url, timeout=10)

    assert "its certificate is not trusted" in str(error.value)
    assert f"(it is {other})" in str(error.value)


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # as asked
def test_mlflow_tracking_insecure_tls_passes_without_checking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")

    with answering_server(tmp_path) as server:
        stores.probe_server(server.url, timeout=10)
        assert server.authorizations == [None]


def test_both_tls_variables_at_once_are_refused_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given both variables, which MLflow's client refuses to use together
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(tmp_path / "server.crt"))

    with answering_server(tmp_path) as server, pytest.raises(ServiceError) as error:
        stores.probe_server(server.url, timeout=10)

    assert "MLFLOW_TRACKING_INSECURE_TLS" in str(error.value)
    assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in str(error.value)


def test_credentials_refused_at_start_name_both_variables_never_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a trusted server with one user, and a job with the wrong password
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-" + PASSWORD)
    with answering_server(tmp_path, users={USER: PASSWORD}) as server:
        assert server.certificate is not None
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(server.certificate))

        # when the probe asks it
        with pytest.raises(ServiceError) as error:
            stores.probe_server(server.url, timeout=10)

    # then one clear message names both variables and the user, never the password
    message = str(error.value)
    assert message == (
        f"MlflowService.tracking_uri: the tracking server {server.url} refused the credentials "
        "(HTTP 401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of the "
        "server (sent: the user 'alice' and a password)"
    )
    assert PASSWORD not in message
    assert server.authorizations[0] is not None  # the variables were sent


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # as asked
def test_the_right_credentials_from_the_variables_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "1")

    with answering_server(tmp_path, users={USER: PASSWORD}) as server:
        stores.probe_server(server.url, timeout=10)


def test_no_credentials_at_all_say_none_were_sent(tmp_path: Path) -> None:
    with (
        answering_server(tmp_path, tls=False, users={USER: PASSWORD}) as server,
        pytest.raises(ServiceError, match=r"\(sent: none\)$"),
    ):
        stores.probe_server(server.url, timeout=10)


def test_credentials_in_the_uri_are_sent_and_masked_when_refused(tmp_path: Path) -> None:
    with answering_server(tmp_path, tls=False, users={USER: PASSWORD}) as server:
        host = server.url.removeprefix("http://")
        stores.probe_server(f"http://{USER}:{PASSWORD}@{host}", timeout=10)
        with pytest.raises(ServiceError) as error:
            stores.probe_server(f"http://{USER}:wrong-{PASSWORD}@{host}", timeout=10)

    assert f"http://{USER}:***@{host} refused the credentials" in str(error.value)
    assert "(sent: the URI's user information)" in str(error.value)
    assert PASSWORD not in str(error.value)
