"""The server's TLS pair: made once for its host, kept private, checked when brought."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from regression_model_template.server.tls import fingerprint, tls_pair, user_pair, valid_for


def _handshake(pair_folder: Path, host: str, trusted: Path, server_name: str) -> None:
    """A TLS handshake on loopback: a server with the pair, a client trusting ``trusted``."""
    pair = tls_pair(pair_folder, host)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pair.certificate, pair.key)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def serve() -> None:
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass  # the client refused us: its side raises

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = ssl.create_default_context(cafile=trusted)
        client.verify_flags |= ssl.VERIFY_X509_STRICT  # as Python 3.13 and urllib3 2 verify
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client.wrap_socket(raw, server_hostname=server_name) as tls,
            ):
                tls.sendall(b"x")
        finally:
            thread.join(10)


def test_a_pair_is_made_on_first_start_valid_for_the_host_with_a_private_key(
    tmp_path: Path,
) -> None:
    # when the pair is asked for the first time
    pair = tls_pair(tmp_path, "127.0.0.1")

    # then both files are in folder/tls, the key readable by its owner only
    assert pair.certificate == tmp_path / "tls" / "server.crt"
    assert pair.key == tmp_path / "tls" / "server.key"
    assert pair.key.stat().st_mode & 0o777 == 0o600
    # and a client trusting the certificate, strict as urllib3 is, accepts the server
    _handshake(tmp_path, "127.0.0.1", pair.certificate, "127.0.0.1")


def test_a_client_checking_the_host_refuses_the_pair_for_another_address(tmp_path: Path) -> None:
    pair = tls_pair(tmp_path, "198.18.9.1")

    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        _handshake(tmp_path, "198.18.9.1", pair.certificate, "127.0.0.1")


def test_a_name_gets_a_dns_entry(tmp_path: Path) -> None:
    pair = tls_pair(tmp_path, "mlflow.team.example")

    assert valid_for(pair.certificate, "MLFLOW.team.example")
    assert not valid_for(pair.certificate, "other.team.example")


def test_the_pair_is_reused_while_it_is_valid_for_the_host(tmp_path: Path) -> None:
    said: list[str] = []
    first = tls_pair(tmp_path, "198.18.9.1", said.append)
    made = first.certificate.read_bytes(), first.key.read_bytes()

    again = tls_pair(tmp_path, "198.18.9.1", said.append)

    assert again == first
    assert (again.certificate.read_bytes(), again.key.read_bytes()) == made
    assert said == []


def test_a_pair_for_another_host_is_made_again_and_said(tmp_path: Path) -> None:
    said: list[str] = []
    old = fingerprint(tls_pair(tmp_path, "198.18.9.1").certificate)

    pair = tls_pair(tmp_path, "198.18.9.5", said.append)

    assert valid_for(pair.certificate, "198.18.9.5")
    assert not valid_for(pair.certificate, "198.18.9.1")
    assert fingerprint(pair.certificate) != old
    assert pair.key.stat().st_mode & 0o777 == 0o600
    assert said == [
        f"made a new TLS certificate {pair.certificate} ({fingerprint(pair.certificate)}): the "
        "one there was made for 198.18.9.1, not 198.18.9.5; give the jobs the new file"
    ]


def test_the_fingerprint_is_openssls(tmp_path: Path) -> None:
    pair = tls_pair(tmp_path, "127.0.0.1")

    shown = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(pair.certificate)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()  # sha256 Fingerprint=AB:CD:...

    assert fingerprint(pair.certificate) == "SHA256 " + shown.partition("=")[2]


def test_a_users_pair_whose_key_is_another_is_refused_naming_both(tmp_path: Path) -> None:
    one = tls_pair(tmp_path / "one", "127.0.0.1")
    other = tls_pair(tmp_path / "other", "127.0.0.1")

    with pytest.raises(ValueError, match="is not the key of the certificate") as error:
        user_pair(one.certificate, other.key)

    assert str(other.key) in str(error.value) and str(one.certificate) in str(error.value)
    assert user_pair(one.certificate, one.key, "127.0.0.1") == one


def test_a_users_pair_for_another_host_or_unreadable_is_refused(tmp_path: Path) -> None:
    pair = tls_pair(tmp_path, "198.18.9.1")

    with pytest.raises(ValueError, match=r"not valid for 198\.18\.9\.2 \(it names 198\.18\.9\.1\)"):
        user_pair(pair.certificate, pair.key, "198.18.9.2")
    with pytest.raises(ValueError, match="cannot read it"):
        user_pair(tmp_path / "missing.crt", pair.key)
    with pytest.raises(ValueError, match="not a PEM file"):
        user_pair(pair.key, pair.key)
