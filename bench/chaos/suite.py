"""The suite under chaos: `sluice up`'s :class:`~sluice.local.up.Supervisor` with two nodes of
the tiny model, a tenants file of its own, and the extra processes some scenarios need (a
third node behind a fault proxy, a second scheduler replica), all on loopback.

The suite is secure, as ``sluice up`` makes it by default (``insecure``: plaintext, for a
comparison): mutual TLS on every internal hop, etcd users per certificate, Redis ACL users, TLS
on the schedulers' public port. The extras get their credentials from the supervisor
(``enroll_node``, ``service_env``: environment, never the command line); clients trust the
suite's CA (:meth:`ChaosSuite.client_tls`), and health and fleet checks go through the
supervisor's mesh, verifying the peer's identity.

The supervisor is driven as ``sluice up`` drives it: when it offers ``poll`` (restarts of
crashed children), :meth:`ChaosSuite.supervise` calls it every 0.2 s on a worker thread, one
call at a time, and stops before ``stop`` ends the processes. Whatever that restarts, or does
not, is what the scenarios measure. Every process is stopped by its PID: the supervisor's
children and stores by ``Supervisor.stop``, the extras here.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import yaml

from sluice import TlsConfig
from sluice.local.stores import StoreProcess, environment_without_proxies, free_port
from sluice.local.up import Child, Endpoints, Supervisor, UpConfig, serving_now, wait_serving
from sluice.runtime.auth import hash_api_key, new_api_key
from sluice.runtime.tls import Identity, Mesh, Role, node_identity
from sluice.v1 import admin_pb2, admin_pb2_grpc

HOST = "127.0.0.1"
MODEL = "tiny-random-llama"
VICTIM = "victim"
OTHERS = ("tenant-a", "tenant-b")
FUZZER = "fuzzer"
ADMIN = "chaos-admin"
"""Reads the fleet (Admin.ListNodes); sends no load."""
LOAD_TENANTS = (VICTIM, *OTHERS)
SCHEDULER = Identity(Role.SCHEDULER)
SUPERVISE_EVERY_S = 0.2
"""How often ``sluice up`` polls its supervisor (the `up` command's loop)."""


def tenants_document(keys: dict[str, str]) -> dict[str, Any]:
    """Every tenant may use the tiny model in every class, with quotas far above what the load
    uses: the load is never refused for quota, yet every request pays the Redis quota check
    (so a Redis outage is on every request's path). The admin tenant may read the fleet."""
    quotas = {"requests_per_second": 100_000, "tokens_per_minute": 1_000_000_000}
    return {
        "tenants": [
            {
                "name": name,
                "api_key_hashes": [hash_api_key(key)],
                "models": [MODEL],
                "quotas": dict(quotas),  # a copy: YAML aliases are refused
                "admin": name == ADMIN,
            }
            for name, key in keys.items()
        ]
    }


@dataclass
class Extra:
    """A process started here (not by the supervisor)."""

    name: str
    address: str
    metrics_address: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    identity: Identity
    """Its certificate's identity (what callers verify it as)."""


@dataclass
class ChaosSuite:
    """Starts, supervises and stops the suite; ``keys`` maps tenant → API key."""

    run_dir: Path
    nodes: int = 2
    insecure: bool = False
    """Plaintext everywhere (``sluice up --insecure``), for comparison with the secure default."""
    startup_timeout_s: float = 300.0
    say: Callable[[str], None] = print
    keys: dict[str, str] = field(default_factory=dict)
    supervisor: Supervisor | None = None
    endpoints: Endpoints | None = None
    extras: list[Extra] = field(default_factory=list)

    @property
    def supervised(self) -> bool:
        """Whether this code's supervisor restarts crashed children (it offers ``poll``)."""
        return callable(getattr(self.supervisor, "poll", None))

    def start(self) -> Endpoints:
        """Write the tenants file and start the suite (blocking: run it in a thread)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.keys = {n: new_api_key() for n in (*LOAD_TENANTS, FUZZER, ADMIN)}
        tenants = self.run_dir / "tenants.yaml"
        tenants.write_text(yaml.safe_dump(tenants_document(self.keys), sort_keys=False))
        config = UpConfig(
            run_dir=self.run_dir,
            nodes=self.nodes,
            models=[MODEL],
            dtype="float32",  # as the nodes it adds later (start_node)
            tenants_file=tenants,
            startup_timeout_s=self.startup_timeout_s,
            grace_s=2.0,
            insecure=self.insecure,
        )
        self.supervisor = Supervisor(config, say=self.say)
        self.endpoints = self.supervisor.start()
        return self.endpoints

    @property
    def scheduler(self) -> str:
        """The supervisor's scheduler address."""
        if self.endpoints is None:
            raise RuntimeError("the suite is not started")
        return self.endpoints.scheduler["grpc"]

    @property
    def mesh(self) -> Mesh:
        """How the harness reaches the services (health, fleet): the supervisor's mesh, mutual
        TLS with the operator's certificate in a secure suite."""
        if self.supervisor is None:
            raise RuntimeError("the suite is not started")
        return self.supervisor.mesh

    def client_tls(self) -> TlsConfig | bool:
        """The SDK's ``tls`` for the schedulers' public port: the suite's CA, no client
        certificate (tenants prove who they are with API keys); False (plaintext) when the
        suite is insecure."""
        if self.endpoints is None:
            raise RuntimeError("the suite is not started")
        tls = self.endpoints.tls
        return TlsConfig(ca=tls["ca"]) if tls else False

    def public_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials of a raw gRPC channel to a scheduler's public port (None: plaintext)."""
        if self.endpoints is None:
            raise RuntimeError("the suite is not started")
        tls = self.endpoints.tls
        return grpc.ssl_channel_credentials(Path(tls["ca"]).read_bytes()) if tls else None

    def serving(self, address: str, peer: Identity | None, timeout_s: float = 0.2) -> bool:
        """Whether ``peer`` at ``address`` answers SERVING now, reached through the mesh."""
        return serving_now(address, timeout_s, mesh=self.mesh, peer=peer)

    def child(self, name: str) -> Child:
        """The supervisor's child called ``name`` (node-1, node-2, cache, scheduler)."""
        if self.supervisor is None:
            raise RuntimeError("the suite is not started")
        return next(c for c in self.supervisor.children if c.name == name)

    def store(self, name: str) -> StoreProcess:
        """The supervisor's store called ``name`` (etcd, redis)."""
        if self.supervisor is None:
            raise RuntimeError("the suite is not started")
        return next(s for s in self.supervisor.stores if s.name == name)

    async def supervise(self) -> None:
        """Run the supervisor's ``poll`` every 0.2 s until cancelled (nothing when it has
        none). One call at a time, on a worker thread; cancelling waits for the running one."""
        poll = getattr(self.supervisor, "poll", None)
        if not callable(poll):
            return
        while True:
            await asyncio.shield(asyncio.to_thread(poll))
            await asyncio.sleep(SUPERVISE_EVERY_S)

    def _spawn(
        self,
        name: str,
        module: str,
        port: int,
        args: list[str],
        identity: Identity,
        secrets: dict[str, str],
    ) -> Extra:
        """Start an extra service; ``secrets`` (its certificate's paths, the Redis URL with
        its password) go in its environment, never on its command line."""
        metrics_port = free_port(HOST)
        log_path = self.run_dir / "logs" / f"{name}.log"
        log = log_path.open("ab")
        env = environment_without_proxies()
        env.update({"SLUICE_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        env.update(secrets)
        argv = [
            sys.executable, "-m", module, "--host", HOST, "--port", str(port),
            "--metrics-host", HOST, "--metrics-port", str(metrics_port),
            "--grace-seconds", "2", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        extra = Extra(
            name, f"{HOST}:{port}", f"{HOST}:{metrics_port}", proc, log_path, log, identity
        )
        self.extras.append(extra)
        self.say(f"started {name} (pid {proc.pid}), log {log_path}")
        return extra

    def start_node(
        self, node_id: str, port: int, advertise_port: int, timeout_s: float = 120.0
    ) -> Extra:
        """One more node of the tiny model on ``port``, registered under ``advertise_port``
        (a proxy in front of it), enrolled by the supervisor (a certificate naming
        ``node_id``, an etcd user that may write only its entry); returns once it serves on
        its own port. The proxy passes TLS through: the scheduler dials the proxy and
        verifies the certificate as ``node_id``'s."""
        if self.endpoints is None or self.supervisor is None:
            raise RuntimeError("the suite is not started")
        secrets = self.supervisor.enroll_node(node_id)
        args = [
            "--etcd-endpoint", self.endpoints.etcd, "--models", MODEL, "--device", "cpu",
            "--dtype", "float32", "--cpu-nice", str(UpConfig.node_cpu_nice),
            "--node-id", node_id, "--advertise-port", str(advertise_port),
        ]  # fmt: skip
        identity = node_identity(node_id)
        node = self._spawn(node_id, "inference_node", port, args, identity, secrets)
        self._wait_serving(node, timeout_s)
        return node

    def start_scheduler(self, name: str, timeout_s: float = 60.0) -> Extra:
        """A second scheduler replica on the same etcd, Redis, cache and tenants file, with
        the scheduler's certificate and Redis user (``SLUICE_REDIS_URL`` in its environment:
        the password stays off the command line)."""
        if self.endpoints is None or self.supervisor is None:
            raise RuntimeError("the suite is not started")
        args = [
            "--etcd-endpoint", self.endpoints.etcd, "--tenants-file", self.endpoints.tenants_file,
            "--cache-address", self.endpoints.cache["grpc"],
        ]  # fmt: skip
        secrets = self.supervisor.service_env(SCHEDULER, "scheduler")
        scheduler = self._spawn(name, "scheduler", free_port(HOST), args, SCHEDULER, secrets)
        self._wait_serving(scheduler, timeout_s)
        return scheduler

    def _wait_serving(self, extra: Extra, timeout_s: float) -> None:
        wait_serving(
            extra.address,
            extra.proc,
            extra.log_path,
            timeout_s,
            extra.name,
            mesh=self.mesh,
            peer=extra.identity,
        )

    def healthy_nodes(self, address: str | None = None) -> list[str]:
        """Node ids the scheduler at ``address`` (default: the supervisor's) calls healthy."""
        metadata = (("authorization", f"Bearer {self.keys[ADMIN]}"),)
        with self.mesh.sync_channel(address or self.scheduler, SCHEDULER) as channel:
            reply = admin_pb2_grpc.AdminStub(channel).ListNodes(
                admin_pb2.ListNodesRequest(), timeout=5, metadata=metadata
            )
        return sorted(n.info.node_id for n in reply.nodes if n.healthy)

    def wait_nodes(
        self, node_ids: set[str], address: str | None = None, timeout_s: float = 60
    ) -> None:
        """Wait until the scheduler calls every node in ``node_ids`` healthy."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                if node_ids <= set(self.healthy_nodes(address)):
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the scheduler did not see {sorted(node_ids)} in time")

    def stop(self) -> None:
        """The extras (SIGTERM, then SIGKILL), then the supervisor's suite; by PID only.
        A process left SIGSTOPped is continued first, so that it can exit."""
        for extra in self.extras:
            if extra.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    extra.proc.send_signal(signal.SIGCONT)
                extra.proc.terminate()
        for extra in self.extras:
            try:
                extra.proc.wait(10)
            except subprocess.TimeoutExpired:
                extra.proc.kill()
                extra.proc.wait()
            extra.log.close()
        self.extras.clear()
        if self.supervisor is not None:
            for child in self.supervisor.children:
                if child.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.send_signal(signal.SIGCONT)
            self.supervisor.stop()
