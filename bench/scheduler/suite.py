"""The real suite for ``bench.scheduler``: etcd, Redis, one inference node and one scheduler,
each a child process on a free 127.0.0.1 port (as ``sluice up`` starts them), with a tenants
file written for the benchmark; and beside them ``bench.scheduler.refusal_floor``, the baseline
of the refusal latencies.

No cache service: every benchmark request sets ``cache_bypass``, so the scheduler would skip
the lookup anyway. The node's ``max_sequences`` is set low so that a few requests in flight
per tenant are more than the node can run, which is what makes the scheduler queue and the fair
queuing decide who goes next.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
import yaml

from sluice.local.stores import StoreProcess, environment_without_proxies, etcd_process, free_port
from sluice.local.stores import redis_process as redis_store
from sluice.local.up import UpConfig, wait_serving
from sluice.runtime.auth import hash_api_key, new_api_key
from sluice.v1 import admin_pb2, admin_pb2_grpc

HOST = "127.0.0.1"
MODEL = "tiny-random-llama"
TENANT_A = "tenant-a"
TENANT_B = "tenant-b"
PROBE = "probe"
METERED = "metered"
LIMITED = "limited"
VICTIM = "victim"
FLOODER = "flooder"
WEIGHTS = {TENANT_A: 2.0, TENANT_B: 1.0, VICTIM: 1.0, FLOODER: 1.0}
GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]
NODE_CPU_NICE = UpConfig.node_cpu_nice
"""As ``sluice up`` starts its nodes: the load processes that share the node's CPU time their
calls without waiting out the model's time slices."""


def tenants_document(keys: dict[str, str]) -> dict[str, object]:
    """The benchmark's tenants, all REALTIME:

    - ``tenant-a`` (weight 2) and ``tenant-b`` (weight 1): the fairness load, no quotas;
    - ``victim`` and ``flooder`` (weight 1 each, so half the node each): the isolation load,
      no quotas;
    - ``probe``: no quotas (overhead without Redis, unmeetable-deadline probes); an admin, as
      it lists the nodes;
    - ``metered``: quotas far above what it uses, so each request pays the Redis check;
    - ``limited``: one request per 100 s (burst 1), so after one call everything is refused.
    """
    generous = {"requests_per_second": 100_000, "tokens_per_minute": 100_000_000}
    quotas: dict[str, dict[str, float]] = {
        METERED: {**generous, "max_concurrent": 1000},
        LIMITED: {"requests_per_second": 0.01, "burst": 1},
    }
    tenants = []
    for name, key in keys.items():
        spec: dict[str, object] = {
            "name": name,
            "api_key_hashes": [hash_api_key(key)],
            "weight": WEIGHTS.get(name, 1.0),
            "classes": ["realtime"],
            "models": [MODEL],
            "admin": name == PROBE,  # it waits for the nodes with Admin.ListNodes
        }
        if name in quotas:
            spec["quotas"] = quotas[name]
        tenants.append(spec)
    return {"tenants": tenants}


@dataclass
class Child:
    """A service process this benchmark started."""

    name: str
    address: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]


@dataclass
class BenchSuite:
    """Starts and stops the suite; ``keys`` maps tenant name → API key."""

    run_dir: Path
    max_sequences: int = 4
    node_cpus: frozenset[int] = frozenset()
    """CPUs the node may use (and its torch thread count); empty: all, like everything else."""
    startup_timeout_s: float = 180.0
    keys: dict[str, str] = field(default_factory=dict)
    node_address: str = ""
    scheduler_address: str = ""
    floor_address: str = ""
    """``bench.scheduler.refusal_floor``: a bare gRPC server that refuses every call, beside the
    scheduler on its CPUs (the floor its refusals are read against)."""
    _stores: list[StoreProcess] = field(default_factory=list)
    _children: list[Child] = field(default_factory=list)

    @property
    def scheduler_log(self) -> Path:
        """The scheduler's JSON log lines."""
        return self.run_dir / "logs" / "scheduler.log"

    def start(self) -> None:
        """Start everything; returns once the scheduler sees the node as healthy."""
        logs = self.run_dir / "logs"
        for old in ("logs", "etcd-data", "redis-data"):  # this run's logs only
            shutil.rmtree(self.run_dir / old, ignore_errors=True)
        logs.mkdir(parents=True)
        deadline = time.monotonic() + self.startup_timeout_s
        etcd = etcd_process(self.run_dir / "etcd-data", logs / "etcd.log", HOST).start()
        self._stores.append(etcd)
        redis = redis_store(self.run_dir / "redis-data", logs / "redis.log", HOST).start()
        self._stores.append(redis)
        names = (TENANT_A, TENANT_B, VICTIM, FLOODER, PROBE, METERED, LIMITED)
        self.keys = {n: new_api_key() for n in names}
        tenants = self.run_dir / "tenants.yaml"
        tenants.write_text(yaml.safe_dump(tenants_document(self.keys), sort_keys=False))
        node = self._spawn(
            "node",
            "inference_node",
            [
                "--etcd-endpoint", etcd.address, "--node-id", "node-1", "--models", MODEL,
                "--max-sequences", str(self.max_sequences), "--registry-ttl-seconds", "3",
                "--cpu-nice", str(NODE_CPU_NICE),
            ],
            cpus=self.node_cpus,
        )  # fmt: skip
        scheduler = self._spawn(
            "scheduler",
            "scheduler",
            [
                "--etcd-endpoint", etcd.address, "--redis-url", f"redis://{redis.address}/0",
                "--tenants-file", str(tenants), "--registry-ttl-seconds", "3",
            ],
        )  # fmt: skip
        floor = self._spawn("refusal-floor", "bench.scheduler.refusal_floor", [])
        for child in (node, scheduler, floor):
            self._wait_serving(child, deadline)
        self._wait_node_visible(scheduler, deadline)
        self.node_address, self.scheduler_address = node.address, scheduler.address
        self.floor_address = floor.address

    def _spawn(
        self, name: str, module: str, args: list[str], cpus: frozenset[int] = frozenset()
    ) -> Child:
        port = free_port(HOST)
        log_path = self.run_dir / "logs" / f"{name}.log"
        log = log_path.open("ab")
        env = environment_without_proxies()
        env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        argv = [
            sys.executable, "-m", module, "--host", HOST, "--port", str(port),
            "--metrics-host", HOST, "--metrics-port", str(free_port(HOST)),
            "--log-format", "json", "--grace-seconds", "2", *args,
        ]  # fmt: skip
        if cpus:
            env["OMP_NUM_THREADS"] = str(len(cpus))
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # The suite starts before this process runs any thread, so no lock can be held
            # across the fork; the CPUs are set before exec, so every thread the child makes
            # inherits them.
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,  # noqa: PLW1509
        )
        child = Child(name, f"{HOST}:{port}", proc, log_path, log)
        self._children.append(child)
        return child

    def _wait_serving(self, child: Child, deadline: float) -> None:
        wait_serving(
            child.address, child.proc, child.log_path, deadline - time.monotonic(), child.name
        )

    def _wait_node_visible(self, scheduler: Child, deadline: float) -> None:
        metadata = (("authorization", f"Bearer {self.keys[PROBE]}"),)
        with grpc.insecure_channel(scheduler.address, options=GRPC_OPTIONS) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            while time.monotonic() < deadline:
                try:
                    reply = stub.ListNodes(
                        admin_pb2.ListNodesRequest(), timeout=2, metadata=metadata
                    )
                    if any(n.healthy for n in reply.nodes):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError("the scheduler did not see the node in time")

    def stop(self) -> None:
        """The scheduler and node first (SIGTERM, then SIGKILL), then the stores; by PID."""
        for child in reversed(self._children):
            if child.proc.poll() is None:
                child.proc.terminate()
        for child in reversed(self._children):
            try:
                child.proc.wait(10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            child.log.close()
        self._children.clear()
        for store in reversed(self._stores):
            store.stop()
        self._stores.clear()
