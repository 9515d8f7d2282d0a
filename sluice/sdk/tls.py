"""TLS of every channel the SDK opens: scheduler calls, health checks, discovery through etcd.

The clients' ``tls`` argument:

- ``None`` (the default): from the environment. ``SLUICE_TLS_CA`` set: TLS trusting that CA,
  with the client certificate ``SLUICE_TLS_CERT`` / ``SLUICE_TLS_KEY`` when both are set.
  ``SLUICE_TLS_CA`` unset: TLS with the system's roots for any address not on this machine,
  plaintext for loopback only.
- ``True``: TLS trusting the system's root certificates.
- ``False``: plaintext, whatever the environment says.
- a :class:`TlsConfig`: as given.

A local `sluice up` serves TLS by default; its ``endpoints.json`` names the CA and a client
certificate (the CLI reads them from there). A failed handshake (a certificate the CA did not
sign, a name the certificate does not carry, a plaintext server) is an
:class:`~sluice.sdk.errors.UnavailableError` carrying gRPC's handshake message.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

CA_ENV = "SLUICE_TLS_CA"
CERT_ENV = "SLUICE_TLS_CERT"
KEY_ENV = "SLUICE_TLS_KEY"
CHANNEL_OPTIONS: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]

Pem = str | os.PathLike[str] | bytes
"""A PEM file's path (``str`` or path-like), or its content (``bytes``)."""


@dataclass(frozen=True)
class TlsConfig:
    """How the SDK verifies the servers it calls, and the certificate it shows them.

    ```python
    from sluice import Client, TlsConfig

    tls = TlsConfig(ca="ca.pem")  # the CA that signed the scheduler's certificate
    with Client("127.0.0.1:50051", api_key="sk-sluice-...", tls=tls) as client:
        print(client.generate_text("smollm2-135m-instruct", "Hi!"))
    ```

    The files are read when a client is made (a missing or non-PEM file is a ``ValueError``
    then); a client made later reads them again.
    """

    ca: Pem | None = None
    """The CA certificate (PEM) servers' certificates must be signed by: a path, or the PEM
    content as bytes. None trusts the system's root certificates."""
    cert: Pem | None = None
    """This client's certificate chain (PEM), shown to the servers it calls: etcd requires one
    for discovery in a local suite; schedulers ignore it (tenants prove who they are with API
    keys). Goes with ``key``."""
    key: Pem | None = None
    """The private key (PEM) of ``cert``."""
    server_name: str | None = None
    """The name schedulers' certificates must carry, when it is not the host the client dials
    (``grpc.ssl_target_name_override``), e.g. ``scheduler.sluice``. Not used for etcd, whose
    certificate is verified against the host dialled."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS cert and key go together: give both or neither")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TlsConfig | None:
        """The configuration ``SLUICE_TLS_CA`` / ``_CERT`` / ``_KEY`` describe; None (plaintext)
        when ``SLUICE_TLS_CA`` is unset or empty."""
        env = os.environ if environ is None else environ
        ca = env.get(CA_ENV)
        if not ca:
            return None
        return cls(ca=ca, cert=env.get(CERT_ENV) or None, key=env.get(KEY_ENV) or None)

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files, read now."""
        return grpc.ssl_channel_credentials(
            root_certificates=_pem("ca", self.ca),
            private_key=_pem("key", self.key),
            certificate_chain=_pem("cert", self.cert),
        )


def _pem(field: str, value: Pem | None) -> bytes | None:
    """The PEM content of ``value``; ValueError naming ``field`` when it is unreadable or not
    PEM (gRPC would only fail the handshake, with a vaguer message)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        content, where = value, "the bytes given"
    else:
        path = Path(value)
        where = str(path)
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"TLS {field}: cannot read {where}: {exc.strerror}") from exc
    if b"-----BEGIN " not in content:
        raise ValueError(f"TLS {field}: {where} is not PEM")
    return content


def resolve_tls(tls: TlsConfig | bool | None, addresses: Sequence[str] = ()) -> TlsConfig | None:
    """A client's ``tls`` argument as a configuration, None for plaintext (see the module).
    Unset and unset in the environment: TLS with the system's roots as soon as one of
    ``addresses`` is not on this machine (an API key never crosses a network in clear unless
    ``tls=False`` says so); plaintext for loopback only."""
    if tls is None:
        configured = TlsConfig.from_env()
        if configured is not None:
            return configured
        return TlsConfig() if any(not is_loopback(a) for a in addresses) else None
    if tls is True:
        return TlsConfig()
    if tls is False:
        return None
    return tls


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` (or ``[v6]:port``) names this machine."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address
    host = host.removeprefix("[").split("]")[0] if host.startswith("[") else host
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Channels:
    """Opens plaintext or TLS channels, blocking or asyncio, with the SDK's channel options.

    ``tls`` None: plaintext. The credentials are read once, here. ``verify_as_scheduler``:
    apply :attr:`TlsConfig.server_name` (False for etcd and other services).
    """

    def __init__(self, tls: TlsConfig | None, *, verify_as_scheduler: bool = True) -> None:
        self.tls = tls
        self._credentials = tls.credentials() if tls is not None else None
        name = tls.server_name if tls is not None and verify_as_scheduler else None
        override = [("grpc.ssl_target_name_override", name)] if name else []
        self._options = [*CHANNEL_OPTIONS, *override]

    @property
    def secure(self) -> bool:
        """Whether channels are TLS."""
        return self._credentials is not None

    def sync(self, address: str) -> grpc.Channel:
        """A blocking channel to ``address``."""
        if self._credentials is None:
            return grpc.insecure_channel(address, options=self._options)
        return grpc.secure_channel(address, self._credentials, options=self._options)

    def aio(self, address: str) -> grpc.aio.Channel:
        """An asyncio channel to ``address``."""
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=self._options)
        return grpc.aio.secure_channel(address, self._credentials, options=self._options)


__all__ = [
    "CA_ENV",
    "CERT_ENV",
    "KEY_ENV",
    "Channels",
    "TlsConfig",
    "resolve_tls",
]
