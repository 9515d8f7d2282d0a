"""A private certificate authority for one suite (`sluice up`, the tests, the chaos bench).

:func:`create_pki` writes, into one directory, a CA and one certificate per identity of
``sluice.runtime.tls``: the key pair proves the identity on every hop (as a server to its
callers, as a client to the services, etcd and Redis it calls). Keys are ECDSA P-256 and
``0600``; certificates last a year. An existing directory is reused when it already holds every
wanted identity, so a restarted child finds the same files.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sluice.runtime.tls import CA_FILE, Identity, Role, TlsFiles

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Pki:
    """Where a suite's certificates are."""

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA certificate every party trusts."""
        return self.directory / CA_FILE

    def files(self, identity: Identity) -> TlsFiles:
        """The CA, certificate and key of ``identity``."""
        return TlsFiles.of(self.directory, identity)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sluice"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = directory / CA_FILE, directory / "ca-key.pem"
    if not (cert_path.is_file() and key_path.is_file()):
        return None
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate(cert_path.read_bytes()), key


def _new_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name("sluice local CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(directory / "ca-key.pem", key)
    (directory / CA_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def issue(
    directory: Path,
    identity: Identity,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    hosts: Iterable[str] = (),
) -> TlsFiles:
    """Write a certificate and key for ``identity`` signed by ``ca``: the common name is its
    etcd user name, the URI SAN its SPIFFE id. A server's certificate also names its service
    (``node-1.node.sluice``) and, for the services reached by address (the scheduler's public
    port, etcd), ``hosts``; a client's (``client``, ``root``) is good for client use only, so
    no certificate but the scheduler's passes for the scheduler at its address."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.spiffe_id)]
    serves = identity.role not in CLIENT_ONLY
    if serves:
        names.append(x509.DNSName(identity.server_name))
    for host in dict.fromkeys(hosts) if identity.role in REACHED_BY_ADDRESS else ():
        names.extend(_host_names(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(identity.common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                if serves
                else [ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles.of(directory, identity)
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def create_pki(
    directory: Path, identities: Iterable[Identity], *, hosts: Iterable[str] = ("127.0.0.1",)
) -> Pki:
    """A CA in ``directory`` (created, or the one already there) and a certificate for each of
    ``identities`` that has none yet, each also naming ``hosts`` and ``localhost``."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca = _load_ca(directory)
    if ca is None or _expiring(ca[0]):
        ca = _new_ca(directory)
        for stale in directory.glob("*.pem"):  # signed by the old CA: issued again below
            if stale.name not in (CA_FILE, "ca-key.pem"):
                stale.unlink()
    pki = Pki(directory)
    hosts = ["localhost", *hosts]
    for identity in identities:
        files = pki.files(identity)
        if not (files.cert.is_file() and files.key.is_file()) or _stale(files, identity, hosts):
            issue(directory, identity, ca, hosts=hosts)
    return pki


CLIENT_ONLY = frozenset({Role.CLIENT, Role.ROOT})
"""Identities that never serve: their certificates are for client use only."""
REACHED_BY_ADDRESS = frozenset({Role.SCHEDULER, Role.ETCD})
"""Services whose callers verify them by the address they dial (others: by service name)."""
RENEW_BEFORE = datetime.timedelta(days=30)


def _host_names(host: str) -> list[x509.GeneralName]:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return [x509.DNSName(host)]
    return [] if address.is_unspecified else [x509.IPAddress(address)]


def _expiring(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE


def _stale(files: TlsFiles, identity: Identity, hosts: list[str]) -> bool:
    """Whether a certificate on disk is near its end or does not name what it should."""
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    if _expiring(cert):
        return True
    if identity.role not in REACHED_BY_ADDRESS:
        return False
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    have = set(sans.get_values_for_type(x509.DNSName)) | {
        str(a) for a in sans.get_values_for_type(x509.IPAddress)
    }
    want = {str(n.value) for h in hosts for n in _host_names(h)}
    return not want <= have
