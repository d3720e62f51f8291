"""The tracking server's TLS pair: the team's own, or a self-signed one made for the host.

A server on another address than loopback serves HTTPS only (gunicorn's ``--certfile`` and
``--keyfile``). Without a pair of their own, :func:`tls_pair` makes one on first start, valid
for the address (or name) served, and keeps it in the stack's folder; jobs trust it with MLflow's
``MLFLOW_TRACKING_SERVER_CERT_PATH``. :func:`fingerprint` is what a person compares before
trusting it.

Example:
    >>> import tempfile
    >>> pair = tls_pair(Path(tempfile.mkdtemp()), "198.18.9.1")
    >>> pair.certificate.name, pair.key.name, oct(pair.key.stat().st_mode & 0o777)
    ('server.crt', 'server.key', '0o600')
    >>> valid_for(pair.certificate, "198.18.9.1"), valid_for(pair.certificate, "198.18.9.2")
    (True, False)
    >>> fingerprint(pair.certificate).startswith("SHA256 ")
    True
"""

from __future__ import annotations

import datetime
import ipaddress
import typing as T
from pathlib import Path

from regression_model_template.server.processes import write_private

if T.TYPE_CHECKING:
    from cryptography import x509

__all__ = ["TlsPair", "fingerprint", "tls_pair", "user_pair", "valid_for"]

#: How long a made certificate is valid; an expired one is made again at the next start.
VALIDITY = datetime.timedelta(days=825)


class TlsPair(T.NamedTuple):
    """A certificate and its private key, both PEM files."""

    certificate: Path
    key: Path


def tls_pair(folder: Path, host: str, report: T.Callable[[str], None] | None = None) -> TlsPair:
    """The self-signed pair in ``folder/tls``, valid for ``host``: made when missing.

    A pair already there is used again while it is valid for ``host`` (the address in an IP
    entry, a name in a DNS entry), not expired, and its key matches. Otherwise a new pair
    replaces it, and ``report`` is told in one line (the jobs that trusted the old
    certificate must be given the new one). The key is readable by its owner only (0600).
    """
    folder = Path(folder) / "tls"
    pair = TlsPair(folder / "server.crt", folder / "server.key")
    if pair.certificate.exists() and pair.key.exists():
        why = _unusable(pair, host)
        if why is None:
            return pair
        _make(pair, host)
        if report is not None:
            report(
                f"made a new TLS certificate {pair.certificate} ({fingerprint(pair.certificate)}): "
                f"the one there {why}; give the jobs the new file"
            )
        return pair
    _make(pair, host)
    return pair


def user_pair(certificate: Path, key: Path, host: str | None = None) -> TlsPair:
    """Check a pair the team brings: both readable PEM files, the key the certificate's own.

    With ``host``, the certificate must also be valid for it (else no job could verify it).

    Raises:
        ValueError: one line naming the file and what is wrong with it.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pair = TlsPair(Path(certificate), Path(key))
    try:
        cert = x509.load_pem_x509_certificate(pair.certificate.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"TLS certificate {pair.certificate}: {_why(exc)}") from None
    try:
        private = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"TLS key {pair.key}: {_why(exc)}") from None
    if _public(private.public_key()) != _public(cert.public_key()):
        raise ValueError(f"TLS key {pair.key} is not the key of the certificate {pair.certificate}")
    if host is not None and not _names_host(cert, host):
        names = ", ".join(_names(cert)) or "no name"
        raise ValueError(
            f"TLS certificate {pair.certificate} is not valid for {host} (it names {names}): "
            "jobs connecting to it could not verify the server"
        )
    return pair


def fingerprint(certificate: Path) -> str:
    """The certificate's SHA-256 fingerprint, as ``openssl x509 -fingerprint -sha256`` shows it.

    Example:
        >>> import tempfile
        >>> text = fingerprint(tls_pair(Path(tempfile.mkdtemp()), "localhost").certificate)
        >>> text[:7], len(text.split()[1].split(":"))
        ('SHA256 ', 32)
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
    return "SHA256 " + cert.fingerprint(hashes.SHA256()).hex(":").upper()


def valid_for(certificate: Path, host: str) -> bool:
    """Whether the certificate names ``host`` (an IP entry for an address, else a DNS entry)."""
    from cryptography import x509

    return _names_host(x509.load_pem_x509_certificate(Path(certificate).read_bytes()), host)


def _unusable(pair: TlsPair, host: str) -> str | None:
    """Why the pair cannot serve ``host`` (None: it can)."""
    from cryptography import x509

    try:
        user_pair(pair.certificate, pair.key)
    except ValueError as exc:
        return f"could not be used ({exc})"
    cert = x509.load_pem_x509_certificate(pair.certificate.read_bytes())
    if not _names_host(cert, host):
        return f"was made for {', '.join(_names(cert)) or 'no name'}, not {host}"
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1):
        return f"expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    return None


def _make(pair: TlsPair, host: str) -> None:
    """Write a new self-signed pair for ``host``: an ECDSA P-256 key, a leaf for serverAuth."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    signing_only = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False,
        crl_sign=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    entry: x509.GeneralName
    try:
        entry = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        entry = x509.DNSName(host)
    public = key.public_key()
    # The extensions strict verifiers ask of a self-signed leaf trusted directly (Python 3.13's
    # and urllib3 2's VERIFY_X509_STRICT): key identifiers, not a CA, for server authentication.
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([entry]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(signing_only, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair.key.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(pair.key, pem)
    pair.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _names(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        entries = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    ips = [str(ip) for ip in entries.get_values_for_type(x509.IPAddress)]
    return ips + list(entries.get_values_for_type(x509.DNSName))


def _names_host(cert: x509.Certificate, host: str) -> bool:
    try:
        wanted = str(ipaddress.ip_address(host))
    except ValueError:
        wanted = host.lower()
    return any(name.lower() == wanted for name in _names(cert))


def _public(key: T.Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"cannot read it ({exc.strerror})"
    return "not a PEM file of that kind (or the key is protected by a passphrase)"
