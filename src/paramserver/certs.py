"""`paramserver certs DIR --clients NAME...`: a CA, a server certificate and
client certificates for tests and demos (EC P-256, SHA-256), made with the
`cryptography` package.

A client certificate names its client in the subject's Common Name (and the
same name as a DNS SAN): with mTLS that CN is the client's identity
(security.py). The server certificate covers localhost and 127.0.0.1 plus any
`--host` given. For production, use your own PKI; these files are what the
tests and the TLS demo need.

No grpc here.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from paramserver.errors import ParamServerError
from paramserver.rounds import check_name

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SERVER_CERT, SERVER_KEY = "server.pem", "server-key.pem"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


class CertificateError(ParamServerError):
    """Certificates or keys that cannot be made, read or used."""


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(name: str = "paramserver test CA", days: float = 365) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = _now() - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def issue(ca: Issued, common_name: str, hosts: Sequence[str], *, server: bool,
          days: float = 365, expired: bool = False) -> Issued:
    """A certificate signed by `ca`. `expired=True` makes one whose validity
    ended a day ago (for tests of the refusal)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)
    if expired:
        start, end = start - datetime.timedelta(days=30), _now() - datetime.timedelta(days=1)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Issued(cert, key)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_pair(issued: Issued, directory: Path, cert_name: str, key_name: str) -> None:
    (directory / cert_name).write_bytes(issued.cert_pem())
    key_path = directory / key_name
    # The key is created private, not chmod-ed after the fact.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(issued.key_pem())


def load_ca(directory: Path) -> Issued:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except (OSError, ValueError) as error:
        raise CertificateError(f"cannot read the CA in {directory}: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{directory / CA_KEY} is not an EC key")
    return Issued(cert, key)


def make_all(directory: Path, clients: Sequence[str], hosts: Sequence[str] = (),
             days: float = 365) -> list[Path]:
    """Writes a CA (or reuses the one in `directory`), a server certificate
    and one per client; returns the files written. Raises CertificateError,
    InvalidClientNameError."""
    for name in clients:
        check_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if (directory / CA_CERT).exists():
        ca = load_ca(directory)
    else:
        ca = make_ca(days=days)
        write_pair(ca, directory, CA_CERT, CA_KEY)
        written += [directory / CA_CERT, directory / CA_KEY]
    server_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    write_pair(issue(ca, "paramserver", server_hosts, server=True, days=days), directory,
               SERVER_CERT, SERVER_KEY)
    written += [directory / SERVER_CERT, directory / SERVER_KEY]
    for name in clients:
        write_pair(issue(ca, name, [name], server=False, days=days), directory,
                   f"{name}.pem", f"{name}-key.pem")
        written += [directory / f"{name}.pem", directory / f"{name}-key.pem"]
    return written
