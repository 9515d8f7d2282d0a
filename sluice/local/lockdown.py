"""Locking a local suite down: certificates, etcd users and roles, Redis ACL users.

:func:`prepare` makes (or finds again) in ``<run-dir>/pki`` a CA and a certificate for every
identity of the suite, and the Redis users' passwords and ACL file. :func:`enable_etcd_auth`
then gives etcd one user per certificate (the common name, no password: etcd authenticates
the client certificate) with the least it needs, and turns authentication on:

=================  ===================================================================
user               may
=================  ===================================================================
``root``           everything (the operator: tenants document, repairs)
``scheduler``      read ``/sluice/``; write ``/sluice/schedulers/`` and ``/sluice/adapters/``
``node.<id>``      write ``/sluice/nodes/<id>`` only: a node cannot register as another
``client``         read ``/sluice/schedulers/`` (SDK discovery)
=================  ===================================================================

Redis has no ``default`` user; the cache service may touch only ``sluice:cache:*`` keys and the
scheduler only ``sluice:quota:*`` and ``sluice:jobs:*``; neither may run administrative
commands.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from aetcd.rpc import auth_pb2, rpc_pb2, rpc_pb2_grpc

from sluice.contract import ADAPTERS_PREFIX, NODES_PREFIX, SCHEDULERS_PREFIX
from sluice.local.pki import Pki, create_pki
from sluice.runtime.tls import Identity, Mesh, Role, TlsFiles, node_identity

REDIS_USERS = {"cache": ("sluice:cache:",), "scheduler": ("sluice:quota:", "sluice:jobs:")}
"""Redis user → the key prefixes it may touch (cache entries; quotas and durable jobs)."""
REDIS_COMMANDS = "+@all -@admin -@dangerous +ping +info"
"""Everything a data client needs; no CONFIG, FLUSHALL, KEYS, DEBUG, SHUTDOWN, ACL..."""

_READ, _WRITE, _READWRITE = (
    auth_pb2.Permission.READ,
    auth_pb2.Permission.WRITE,
    auth_pb2.Permission.READWRITE,
)


def suite_identities(node_ids: Iterable[str]) -> list[Identity]:
    """Every identity a suite with these nodes holds."""
    fixed = [Role.ROOT, Role.ETCD, Role.SCHEDULER, Role.CACHE, Role.CLIENT]
    return [*(Identity(role) for role in fixed), *(node_identity(n) for n in node_ids)]


@dataclass(frozen=True)
class Lockdown:
    """A locked-down suite's credentials."""

    pki: Pki
    redis_acl: Path
    """The Redis ACL file (``--aclfile``)."""
    redis_passwords: dict[str, str]

    def files(self, identity: Identity) -> TlsFiles:
        """The TLS files of ``identity``."""
        return self.pki.files(identity)

    def redis_url(self, user: str, address: str) -> str:
        """``redis://user:password@address/0`` for one of :data:`REDIS_USERS`."""
        return f"redis://{user}:{self.redis_passwords[user]}@{address}/0"

    def env(self, identity: Identity) -> dict[str, str]:
        """The environment giving a service its certificate (``SLUICE_TLS_*``)."""
        files = self.files(identity)
        return {
            "SLUICE_TLS_CA": str(files.ca),
            "SLUICE_TLS_CERT": str(files.cert),
            "SLUICE_TLS_KEY": str(files.key),
        }


def _redis_passwords(path: Path) -> dict[str, str]:
    known: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    wanted = {user: known.get(user) or secrets.token_urlsafe(24) for user in REDIS_USERS}
    if wanted != known:
        path.write_text(json.dumps(wanted))
        path.chmod(0o600)
    return wanted


def _acl_text(passwords: dict[str, str]) -> str:
    lines = ["user default off resetkeys resetchannels -@all"]
    for user, prefixes in REDIS_USERS.items():
        digest = hashlib.sha256(passwords[user].encode()).hexdigest()
        keys = " ".join(f"~{prefix}*" for prefix in prefixes)
        lines.append(f"user {user} on #{digest} resetkeys {keys} resetchannels {REDIS_COMMANDS}")
    return "\n".join(lines) + "\n"


def prepare(run_dir: Path, node_ids: Sequence[str], hosts: Iterable[str]) -> Lockdown:
    """Certificates, Redis passwords and ACL file under ``run_dir/pki`` (kept across runs)."""
    pki = create_pki(run_dir / "pki", suite_identities(node_ids), hosts=hosts)
    passwords = _redis_passwords(pki.directory / "redis-users.json")
    acl = pki.directory / "redis-users.acl"
    acl.write_text(_acl_text(passwords))
    acl.chmod(0o600)
    return Lockdown(pki, acl, passwords)


def _prefix_end(prefix: str) -> bytes:
    key = prefix.encode()
    return key[:-1] + bytes([key[-1] + 1])


def etcd_grants(node_ids: Iterable[str]) -> dict[str, list[auth_pb2.Permission]]:
    """etcd user (= certificate common name) → its permissions (see the module's table)."""

    def prefix(kind: int, key: str) -> auth_pb2.Permission:
        return auth_pb2.Permission(permType=kind, key=key.encode(), range_end=_prefix_end(key))

    grants = {
        Identity(Role.SCHEDULER).common_name: [
            prefix(_READ, "/sluice/"),
            prefix(_READWRITE, SCHEDULERS_PREFIX),
            prefix(_READWRITE, ADAPTERS_PREFIX),
        ],
        Identity(Role.CLIENT).common_name: [prefix(_READ, SCHEDULERS_PREFIX)],
    }
    for node_id in node_ids:
        key = (NODES_PREFIX + node_id).encode()
        grants[node_identity(node_id).common_name] = [
            auth_pb2.Permission(permType=_READWRITE, key=key)
        ]
    return grants


def _tolerate_exists(call: object, request: object, timeout: float) -> None:
    try:
        call(request, timeout=timeout)  # type: ignore[operator]
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # "... already exists"
            raise


def enable_etcd_auth(
    endpoint: str, lockdown: Lockdown, node_ids: Iterable[str], timeout_s: float = 5.0
) -> None:
    """Create etcd's users and roles (idempotent: a second run adds only what is missing) as
    ``root``, then enable authentication."""
    mesh = Mesh(lockdown.files(Identity(Role.ROOT)))
    with mesh.sync_channel(endpoint, Identity(Role.ETCD)) as channel:
        auth = rpc_pb2_grpc.AuthStub(channel)
        no_password = auth_pb2.UserAddOptions(no_password=True)
        users = {"root": [], **etcd_grants(node_ids)}
        for user, permissions in users.items():
            _tolerate_exists(
                auth.UserAdd, rpc_pb2.AuthUserAddRequest(name=user, options=no_password), timeout_s
            )
            _tolerate_exists(auth.RoleAdd, rpc_pb2.AuthRoleAddRequest(name=user), timeout_s)
            for permission in permissions:
                auth.RoleGrantPermission(
                    rpc_pb2.AuthRoleGrantPermissionRequest(name=user, perm=permission),
                    timeout=timeout_s,
                )
            auth.UserGrantRole(
                rpc_pb2.AuthUserGrantRoleRequest(user=user, role=user), timeout=timeout_s
            )
        auth.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=timeout_s)
