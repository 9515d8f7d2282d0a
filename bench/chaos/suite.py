"""The suite under chaos: `sluice up`'s :class:`~sluice.local.up.Supervisor` with two nodes of
the tiny model, a tenants file of its own, and the extra processes some scenarios need (a
third node behind a fault proxy, a second scheduler replica), all on loopback.

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

from sluice.local.stores import StoreProcess, environment_without_proxies, free_port
from sluice.local.up import Child, Endpoints, Supervisor, UpConfig, wait_serving
from sluice.runtime.auth import hash_api_key, new_api_key
from sluice.v1 import admin_pb2, admin_pb2_grpc

HOST = "127.0.0.1"
MODEL = "tiny-random-llama"
VICTIM = "victim"
OTHERS = ("tenant-a", "tenant-b")
FUZZER = "fuzzer"
ADMIN = "chaos-admin"
"""Reads the fleet (Admin.ListNodes); sends no load."""
LOAD_TENANTS = (VICTIM, *OTHERS)
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]
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


@dataclass
class ChaosSuite:
    """Starts, supervises and stops the suite; ``keys`` maps tenant → API key."""

    run_dir: Path
    nodes: int = 2
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
            tenants_file=tenants,
            startup_timeout_s=self.startup_timeout_s,
            grace_s=2.0,
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

    def _spawn(self, name: str, module: str, port: int, args: list[str]) -> Extra:
        metrics_port = free_port(HOST)
        log_path = self.run_dir / "logs" / f"{name}.log"
        log = log_path.open("ab")
        env = environment_without_proxies()
        env.update({"SLUICE_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        argv = [
            sys.executable, "-m", module, "--host", HOST, "--port", str(port),
            "--metrics-host", HOST, "--metrics-port", str(metrics_port),
            "--grace-seconds", "2", *args,
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        extra = Extra(name, f"{HOST}:{port}", f"{HOST}:{metrics_port}", proc, log_path, log)
        self.extras.append(extra)
        self.say(f"started {name} (pid {proc.pid}), log {log_path}")
        return extra

    def start_node(
        self, node_id: str, port: int, advertise_port: int, timeout_s: float = 120.0
    ) -> Extra:
        """One more node of the tiny model on ``port``, registered under ``advertise_port``
        (a proxy in front of it); returns once it serves on its own port."""
        if self.endpoints is None:
            raise RuntimeError("the suite is not started")
        args = [
            "--etcd-endpoint", self.endpoints.etcd, "--models", MODEL, "--device", "cpu",
            "--dtype", "float32", "--cpu-nice", str(UpConfig.node_cpu_nice),
            "--node-id", node_id, "--advertise-port", str(advertise_port),
        ]  # fmt: skip
        node = self._spawn(node_id, "inference_node", port, args)
        wait_serving(node.address, node.proc, node.log_path, timeout_s, node_id)
        return node

    def start_scheduler(self, name: str, timeout_s: float = 60.0) -> Extra:
        """A second scheduler replica on the same etcd, Redis, cache and tenants file."""
        if self.endpoints is None:
            raise RuntimeError("the suite is not started")
        args = [
            "--etcd-endpoint", self.endpoints.etcd, "--tenants-file", self.endpoints.tenants_file,
            "--cache-address", self.endpoints.cache["grpc"], "--redis-url", self.endpoints.redis,
        ]  # fmt: skip
        scheduler = self._spawn(name, "scheduler", free_port(HOST), args)
        wait_serving(scheduler.address, scheduler.proc, scheduler.log_path, timeout_s, name)
        return scheduler

    def healthy_nodes(self, address: str | None = None) -> list[str]:
        """Node ids the scheduler at ``address`` (default: the supervisor's) calls healthy."""
        metadata = (("authorization", f"Bearer {self.keys[ADMIN]}"),)
        with grpc.insecure_channel(address or self.scheduler, options=GRPC_OPTIONS) as channel:
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
