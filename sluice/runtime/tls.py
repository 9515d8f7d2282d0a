"""The service mesh's identities and TLS credentials.

Every process of a suite holds one key pair signed by the suite's CA (``sluice.local.pki``
makes them for `sluice up`). Its :class:`Identity` is written three ways in the certificate:

- the SPIFFE id URI SAN (``spiffe://sluice/node/node-1``): what a service reads from its peer's
  certificate to decide whether that caller may call it (:class:`CallerCheck`);
- a DNS SAN naming the service (``node-1.node.sluice``): what a caller verifies the server
  against (``grpc.ssl_target_name_override``), so the scheduler talks only to a node whose
  certificate names the node id it registered, and to a cache whose certificate says cache;
- the common name (``node.node-1``): etcd's user name when it authenticates client
  certificates.

A hop is mutual TLS when the process is given :class:`TlsFiles`, plaintext otherwise
(:class:`Mesh`). The public port of the scheduler is TLS without client certificates (its
callers prove who they are with API keys).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc

from sluice.runtime.errors import PermissionDenied

CA_FILE = "ca.pem"
TRUST_DOMAIN = "sluice"
SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/"


class Role(StrEnum):
    """What a certificate's holder is."""

    SCHEDULER = "scheduler"
    NODE = "node"
    CACHE = "cache"
    ETCD = "etcd"
    CLIENT = "client"
    """The SDK and CLI of the local suite: may read scheduler addresses from etcd."""
    ROOT = "root"
    """etcd's administrator (`sluice up` sets etcd's users up with it)."""


NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
"""An instance name: one DNS label in lower case (no wildcard, dot, slash or upper case, so
it can name neither another node's certificate nor a path outside the PKI directory)."""


@dataclass(frozen=True)
class Identity:
    """A role plus, where several hold it, the instance's name (a node's id)."""

    role: Role
    name: str = ""

    def __post_init__(self) -> None:
        if self.name and not NAME_PATTERN.match(self.name):
            raise ValueError(f"{self.name!r} is not a valid instance name (a lower-case DNS label)")

    @property
    def common_name(self) -> str:
        """The certificate's CN, used as etcd user name: ``node.node-1``, ``scheduler``."""
        return f"{self.role}.{self.name}" if self.name else str(self.role)

    @property
    def spiffe_id(self) -> str:
        """``spiffe://sluice/<role>[/<name>]``."""
        return SPIFFE_PREFIX + str(self.role) + (f"/{self.name}" if self.name else "")

    @property
    def server_name(self) -> str:
        """The DNS name callers verify this service's certificate against:
        ``node-1.node.sluice``, ``cache.sluice``."""
        return (f"{self.name}." if self.name else "") + f"{self.role}.{TRUST_DOMAIN}"

    @classmethod
    def from_spiffe_id(cls, spiffe_id: str) -> Identity | None:
        """The identity a SPIFFE id names, or None when it is not one of this trust domain."""
        if not spiffe_id.startswith(SPIFFE_PREFIX):
            return None
        role, _, name = spiffe_id.removeprefix(SPIFFE_PREFIX).partition("/")
        try:
            return cls(Role(role), name)
        except ValueError:  # an unknown role or a malformed name
            return None


def node_identity(node_id: str) -> Identity:
    """The identity a node with ``node_id`` holds."""
    return Identity(Role.NODE, node_id)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one identity: the CA it trusts, its certificate and its private key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, directory: Path, identity: Identity) -> TlsFiles:
        """The files of ``identity`` in a directory made by ``sluice.local.pki``."""
        stem = identity.common_name
        return cls(directory / CA_FILE, directory / f"{stem}.pem", directory / f"{stem}-key.pem")

    def server_credentials(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        """Credentials of a server presenting this certificate; with ``require_client_auth``
        the handshake fails for a caller without a certificate signed by the CA."""
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
            require_client_auth=require_client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a client presenting this certificate and trusting only the CA."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


@dataclass(frozen=True)
class ServerTls:
    """TLS on a server's port."""

    files: TlsFiles
    require_client_auth: bool = True
    """Mutual TLS (internal services); False for the public port (API keys there)."""

    def credentials(self) -> grpc.ServerCredentials:
        """The port's credentials."""
        return self.files.server_credentials(require_client_auth=self.require_client_auth)


BASE_CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (("grpc.enable_http_proxy", 0),)


@dataclass(frozen=True)
class Mesh:
    """How this process calls the others: mutual TLS with its own certificate, verifying the
    callee's identity, when it has ``files``; plaintext otherwise."""

    files: TlsFiles | None = None

    @property
    def secure(self) -> bool:
        """Whether hops are mutual TLS."""
        return self.files is not None

    def channel_options(
        self, peer: Identity | None, options: Sequence[tuple[str, int | str]] = ()
    ) -> list[tuple[str, int | str]]:
        """Channel options for a call to ``peer``: when secure, its certificate must name
        ``peer`` (None: the address's host, as any TLS client checks)."""
        name = peer.server_name if self.secure and peer is not None else None
        extra = [("grpc.ssl_target_name_override", name)] if name else []
        return [*BASE_CHANNEL_OPTIONS, *options, *extra]

    def channel(
        self, address: str, peer: Identity | None, options: Sequence[tuple[str, int | str]] = ()
    ) -> grpc.aio.Channel:
        """An asyncio channel to ``peer`` at ``address``."""
        opts = self.channel_options(peer, options)
        if self.files is None:
            return grpc.aio.insecure_channel(address, options=opts)
        return grpc.aio.secure_channel(address, self.files.channel_credentials(), options=opts)

    def sync_channel(
        self, address: str, peer: Identity | None, options: Sequence[tuple[str, int | str]] = ()
    ) -> grpc.Channel:
        """A blocking channel to ``peer`` at ``address``."""
        opts = self.channel_options(peer, options)
        if self.files is None:
            return grpc.insecure_channel(address, options=opts)
        return grpc.secure_channel(address, self.files.channel_credentials(), options=opts)


def peer_identity(ctx: grpc.aio.ServicerContext) -> Identity | None:
    """The identity in the caller's verified certificate, or None (plaintext, no certificate,
    or a certificate without a SPIFFE id of this trust domain)."""
    auth = ctx.auth_context()
    for value in auth.get("peer_spiffe_id", ()):
        identity = Identity.from_spiffe_id(value.decode(errors="replace"))
        if identity is not None:
            return identity
    return None


class CallerCheck:
    """Which identities may call which services: ``{service: roles}``. Methods of services not
    named are open to any caller that passed the handshake (health checks, reflection)."""

    def __init__(self, rules: Mapping[str, Collection[Role]]) -> None:
        self._rules = {f"/{service}/": frozenset(roles) for service, roles in rules.items()}

    def check(self, method: str, ctx: grpc.aio.ServicerContext) -> PermissionDenied | None:
        """The refusal of ``method`` for this call's peer, or None when it may call it."""
        service = method[: method.rfind("/") + 1]
        allowed = self._rules.get(service)
        if allowed is None:
            return None
        identity = peer_identity(ctx)
        if identity is not None and identity.role in allowed:
            return None
        who = identity.spiffe_id if identity else "a caller without a sluice certificate"
        return PermissionDenied(
            f"{who} may not call {service.strip('/')}",
            reason="CALLER_NOT_ALLOWED",
        )
