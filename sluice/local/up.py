"""`sluice up`: the whole suite on one machine, as child processes.

Order: etcd and Redis (real servers) → cache service → inference nodes → scheduler. Each child
logs to ``<run-dir>/logs/<name>.log`` (JSON lines). ``start`` returns once every service answers
``SERVING`` on ``grpc.health.v1`` and the scheduler sees every node; ``stop`` ends the children
first (SIGTERM, then SIGKILL after the grace), then the stores. Endpoints go to
``<run-dir>/endpoints.json``.

While it runs, ``poll`` supervises (``sluice.local.watchdog``): a child or store that crashes
(non-zero exit or a signal) is started again with the same command line, so on the same ports
and data directory and endpoints.json stays valid, after a backoff that
``sluice.local.restarts.RestartPolicy`` decides; one that keeps crashing is given up; the others
are left alone. A clean exit (status 0) is not restarted. Each event is said on the console and
written to ``<run-dir>/logs/supervisor.log`` and the child's own log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import grpc

from sluice.local.health import serving_now, wait_serving
from sluice.local.lockdown import Lockdown, enable_etcd_auth, prepare
from sluice.local.restarts import RestartRules
from sluice.local.rundir import DEV_KEY_FILE, ENDPOINTS_FILE, dev_api_key, read_endpoints
from sluice.local.stores import (
    StoreProcess,
    environment_without_proxies,
    etcd_process,
    free_port,
    redis_process,
)
from sluice.local.watchdog import Restartable, Watchdog
from sluice.runtime import affinity
from sluice.runtime.auth import new_api_key, write_tenants_file
from sluice.runtime.tls import Identity, Mesh, Role, node_identity
from sluice.v1 import admin_pb2, admin_pb2_grpc


@dataclass
class UpConfig:
    """What `sluice up` starts."""

    run_dir: Path = Path(".sluice")
    nodes: int = 1
    models: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct", "all-minilm-l6-v2"])
    tenants_file: Path | None = None
    device: str = "cpu"
    dtype: str = "auto"
    max_sequences: int | None = None
    """Each node's batch cap; None keeps the node's default."""
    pools: list[str] = field(default_factory=lambda: ["realtime", "finetune"])
    """Pools every node serves: real-time inference and, in its gaps, fine-tuning."""
    node_cpu_nice: int = 10
    """Nice increment of each node (0-19). Everything here shares one machine, so model
    compute runs at a lower CPU priority than the scheduler, the stores and local clients
    (docs/decisions/node-cpu-nice.md)."""
    keep_engine_cores: bool = True
    """Keep the cores a node's engine binds its compute threads to (vLLM on the CPU) for
    them: the nodes move their own threads off them, and the services here theirs
    (docs/decisions/node-engine-cores.md)."""
    host: str = "127.0.0.1"
    scheduler_port: int = 0
    startup_timeout_s: float = 600.0
    grace_s: float = 10.0
    engine: str = "builtin"
    """Each node's generation engine: ``builtin``, or ``vllm`` (nodes run on
    ``vllm_python``, the interpreter of ``.venv-vllm`` that ``make setup-vllm`` builds)."""
    vllm_python: Path = Path(".venv-vllm/bin/python")
    vllm_prefix_caching: bool = True
    """vLLM nodes cache the KV of prompt prefixes (vLLM's own default). The node then pauses
    begun lower-class prefills for a REALTIME prompt (node-vllm-prefill-pausing.md)."""
    vllm_pace: bool = True
    """vLLM nodes cap each step's prompt tokens to keep decoding streams at their pace
    (node-vllm-stream-pace.md)."""
    insecure: bool = False
    """Plaintext everywhere, no etcd auth, no Redis users. Off by default: a CA and a certificate
    per service in ``<run-dir>/pki``, mutual TLS on every internal hop, TLS on the public port,
    etcd users per certificate and Redis ACL users (``sluice.local.lockdown``)."""
    scheduler_args: list[str] = field(default_factory=list)
    """More flags for the scheduler (``--<setting> <value>``, any ``SchedulerSettings`` field)."""


@dataclass
class Child:
    """A service process we started."""

    name: str
    module: str
    grpc_address: str
    metrics_address: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """Its environment (holds the Redis password: never printed)."""
    identity: Identity | None = None
    """Who it is in the mesh (its certificate's identity)."""
    mesh: Mesh = field(default_factory=Mesh)
    """How the supervisor reaches it (health checks)."""

    @property
    def address(self) -> str:
        """Its gRPC address (the same after a restart)."""
        return self.grpc_address

    def respawn(self) -> None:
        """Start the process again with the same command line (ports included); returns."""
        self.proc = subprocess.Popen(
            self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env
        )

    def ready(self) -> bool:
        """Whether it answers ``SERVING`` on ``grpc.health.v1`` now."""
        return serving_now(self.grpc_address, mesh=self.mesh, peer=self.identity)


@dataclass
class Endpoints:
    """Every address of a running suite (written to endpoints.json)."""

    scheduler: dict[str, str]
    cache: dict[str, str]
    nodes: list[dict[str, str]]
    etcd: str
    redis: str
    tenants_file: str
    logs: str
    tls: dict[str, str] | None = None
    """The client's ``ca``, ``cert`` and ``key`` files and the scheduler's ``server_name``;
    None when the suite is plaintext."""
    etcd_peer: str = ""
    """etcd's peer port (loopback; mutual TLS when the suite is secure)."""

    def to_json(self) -> str:
        """Pretty JSON."""
        return json.dumps(asdict(self), indent=2)


class Supervisor:
    """Starts the suite, keeps it running (``poll``), and stops it.

    Supervision is a ``poll`` the caller's loop runs (the `up` command: every 0.2 s), not a
    watcher thread: one thread then owns the processes, so ``stop`` never races a restart (a
    thread could start a child just after ``stop`` ended the others, and leave it running),
    and the stop signal already lands on that thread. Callers that never ``poll`` (the demo,
    the benchmarks) get the suite unsupervised, as before.
    """

    def __init__(
        self,
        config: UpConfig,
        say: Callable[[str], None] = lambda _m: None,
        *,
        rules: RestartRules | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.say = say
        self.run_dir = config.run_dir.resolve()
        self.logs = self.run_dir / "logs"
        self.stores: list[StoreProcess] = []
        self.children: list[Child] = []
        self.api_key: str | None = None
        self.endpoints: Endpoints | None = None
        self.watchdog = Watchdog(
            self.logs, say, rules, clock, on_serving_again=self.keep_engine_cores
        )
        self._clock = clock
        self._started_at: dict[str, float] = {}
        self.lockdown: Lockdown | None = None
        self.mesh = Mesh()
        """How the supervisor calls the services (as etcd's ``root`` when secure)."""

    def _tenants(self) -> Path:
        if self.config.tenants_file is not None:
            return self.config.tenants_file.resolve()
        path = self.run_dir / "tenants.yaml"
        self.api_key = new_api_key()
        write_tenants_file(path, [("dev", self.api_key)], admins={"dev"})
        key_file = self.run_dir / DEV_KEY_FILE
        key_file.write_text(self.api_key + "\n")
        key_file.chmod(0o600)
        return path

    def _spawn(
        self,
        name: str,
        module: str,
        args: list[str],
        identity: Identity,
        secrets: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> Child:
        """Start a service; ``secrets`` (such as ``SLUICE_REDIS_URL``) go in its environment,
        never on its command line."""
        host = self.config.host
        port = (
            self.config.scheduler_port
            if module == "scheduler" and self.config.scheduler_port
            else free_port(host)
        )
        metrics_port = free_port(host)
        log_path = self.logs / f"{name}.log"
        log = log_path.open("ab")
        env = environment_without_proxies()
        env.update({"SLUICE_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        env.update(secrets or {})
        if self.lockdown is not None:
            env.update(self.lockdown.env(identity))
        argv = [
            python, "-m", module,
            "--host", host, "--port", str(port),
            "--metrics-host", host, "--metrics-port", str(metrics_port),
            "--grace-seconds", str(self.config.grace_s),
            *args,
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        child = Child(
            name=name,
            module=module,
            grpc_address=f"{host}:{port}",
            metrics_address=f"{host}:{metrics_port}",
            proc=proc,
            log_path=log_path,
            log=log,
            argv=argv,
            env=env,
            identity=identity,
            mesh=self.mesh,
        )
        self.children.append(child)
        self._started_at[name] = self._clock()
        self.say(f"started {name} (pid {proc.pid}), log {log_path}")
        return child

    def _wait_serving(self, child: Child, deadline: float) -> None:
        wait_serving(
            child.grpc_address,
            child.proc,
            child.log_path,
            deadline - time.monotonic(),
            child.name,
            mesh=self.mesh,
            peer=child.identity,
        )

    def _wait_nodes_visible(self, scheduler: Child, deadline: float) -> None:
        metadata = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        with self.mesh.sync_channel(scheduler.grpc_address, scheduler.identity) as ch:
            stub = admin_pb2_grpc.AdminStub(ch)
            while time.monotonic() < deadline:
                try:
                    reply = stub.ListNodes(
                        admin_pb2.ListNodesRequest(), timeout=2, metadata=metadata
                    )
                    if sum(n.healthy for n in reply.nodes) >= self.config.nodes:
                        return
                except grpc.RpcError:
                    if not metadata:  # no dev key to ask with: SERVING is all we can check
                        return
                time.sleep(0.2)
        raise TimeoutError("the scheduler did not see every node in time")

    def _node_python(self, node_args: list[str]) -> str:
        """The nodes' interpreter; with the vLLM engine, ``.venv-vllm``'s (``node_args`` gain
        ``--engine vllm`` and serve the realtime pool only: vLLM runs no fine-tunes)."""
        if self.config.engine == "builtin":
            return sys.executable
        if self.config.engine != "vllm":
            raise ValueError(f"unknown engine {self.config.engine!r}: builtin or vllm")
        python = self.config.vllm_python.absolute()
        if not python.exists():
            raise RuntimeError(f"{python} not found: run `make setup-vllm` first")
        node_args[node_args.index("--pools") + 1] = "realtime"
        caching = str(self.config.vllm_prefix_caching).lower()
        pace = str(self.config.vllm_pace).lower()
        node_args += ["--engine", "vllm", "--vllm-prefix-caching", caching, "--vllm-pace", pace]
        return str(python)

    def _start_stores(self) -> tuple[StoreProcess, StoreProcess]:
        """etcd and Redis; locked down (certificates, etcd users, Redis users) unless the
        suite is insecure."""
        cfg = self.config
        node_ids = [f"node-{i}" for i in range(1, cfg.nodes + 1)]
        if not cfg.insecure:
            self.lockdown = prepare(self.run_dir, node_ids, [cfg.host])
            self.mesh = Mesh(self.lockdown.files(Identity(Role.ROOT)))
            self.say(f"certificates in {self.lockdown.pki.directory} (plaintext: --insecure)")
        lock = self.lockdown
        # A data directory per mode: etcd keeps auth enabled in its data, which a plaintext
        # etcd could then never serve.
        etcd = etcd_process(
            self.run_dir / ("etcd-data" if lock else "etcd-data-insecure"),
            self.logs / "etcd.log",
            cfg.host,
            tls=lock.files(Identity(Role.ETCD)) if lock else None,
        ).start()
        self.stores.append(etcd)
        self._started_at[etcd.name] = self._clock()
        if lock is not None:
            enable_etcd_auth(etcd.address, lock, node_ids)
        self.say(f"etcd listening on {etcd.address}")
        redis = redis_process(
            self.run_dir / ("redis-data" if lock else "redis-data-insecure"),
            self.logs / "redis.log",
            cfg.host,
            acl_file=lock.redis_acl if lock else None,
        ).start()
        self.stores.append(redis)
        self._started_at[redis.name] = self._clock()
        self.say(f"redis listening on {redis.address}")
        return etcd, redis

    def enroll_node(self, node_id: str) -> dict[str, str]:
        """Credentials for one more node started beside the suite (scale-out): a certificate
        naming ``node_id`` and an etcd user that may write only its entry. Returns the
        environment to start it with (empty when the suite is insecure)."""
        if self.lockdown is None:
            return {}
        prepare(self.run_dir, [node_id], [self.config.host])
        etcd = next(s for s in self.stores if s.name == "etcd")
        enable_etcd_auth(etcd.address, self.lockdown, [node_id])
        return self.lockdown.env(node_identity(node_id))

    def service_env(self, identity: Identity, redis_user: str | None = None) -> dict[str, str]:
        """The environment of a service started beside the suite as ``identity`` (a second
        scheduler replica): its certificate, and the Redis URL of ``redis_user``."""
        env = self.lockdown.env(identity) if self.lockdown else {}
        if redis_user is not None:
            redis = next(s for s in self.stores if s.name == "redis")
            env.update(self._redis_env(redis_user, redis.address))
        return env

    def _redis_env(self, user: str, address: str) -> dict[str, str]:
        url = self.lockdown.redis_url(user, address) if self.lockdown else f"redis://{address}/0"
        return {"SLUICE_REDIS_URL": url}

    def start(self) -> Endpoints:
        """Start everything; returns once the suite serves."""
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)  # logs, tenants, keys and store data: the operator's only
        self.logs.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + cfg.startup_timeout_s
        etcd, redis = self._start_stores()
        tenants = self._tenants()
        common = ["--etcd-endpoint", etcd.address]
        cache = self._spawn(
            "cache",
            "cache_service",
            [],
            Identity(Role.CACHE),
            self._redis_env("cache", redis.address),
        )
        node_args = [
            *common,
            "--models", ",".join(cfg.models),
            "--device", cfg.device,
            "--dtype", cfg.dtype,
            "--cpu-nice", str(cfg.node_cpu_nice),
            "--keep-engine-cores", str(cfg.keep_engine_cores).lower(),
            "--pools", ",".join(cfg.pools),
            # The fleet's adapter and checkpoint stores: one directory every node shares.
            "--adapters-dir", str(self.run_dir / "adapters"),
            "--checkpoint-dir", str(self.run_dir / "checkpoints"),
        ]  # fmt: skip
        if cfg.max_sequences is not None:
            node_args += ["--max-sequences", str(cfg.max_sequences)]
        node_python = self._node_python(node_args)
        nodes: list[Child] = []
        for i in range(1, cfg.nodes + 1):
            node_id = f"node-{i}"
            args = [*node_args, "--node-id", node_id]
            nodes.append(
                self._spawn(
                    node_id, "inference_node", args, node_identity(node_id), None, node_python
                )
            )
            if i == 1:  # the first node converts model weights once; the others load the copy
                self._wait_serving(nodes[0], deadline)
        front = ["--tenants-file", str(tenants), "--cache-address", cache.grpc_address]
        scheduler = self._spawn(
            "scheduler",
            "scheduler",
            [*common, *front, *cfg.scheduler_args],
            Identity(Role.SCHEDULER),
            self._redis_env("scheduler", redis.address),
        )
        for child in [cache, *nodes, scheduler]:
            self._wait_serving(child, deadline)
        self._wait_nodes_visible(scheduler, deadline)
        client = self.lockdown.files(Identity(Role.CLIENT)) if self.lockdown else None
        self.endpoints = Endpoints(
            scheduler={"grpc": scheduler.grpc_address, "metrics": scheduler.metrics_address},
            cache={"grpc": cache.grpc_address, "metrics": cache.metrics_address},
            nodes=[
                {"id": n.name, "grpc": n.grpc_address, "metrics": n.metrics_address} for n in nodes
            ],
            etcd=etcd.address,
            etcd_peer=etcd.peer_address,
            redis=f"redis://{redis.address}/0",
            tenants_file=str(tenants),
            logs=str(self.logs),
            tls=None
            if client is None
            else {
                "ca": str(client.ca),
                "cert": str(client.cert),
                "key": str(client.key),
                "server_name": Identity(Role.SCHEDULER).server_name,
            },
        )
        (self.run_dir / ENDPOINTS_FILE).write_text(self.endpoints.to_json())
        self.keep_engine_cores()
        self._watch_all()
        return self.endpoints

    def keep_engine_cores(self) -> None:
        """Move the stores' and the other services' threads off the cores the nodes' engines
        bound their compute threads to. Each node moves its own (``NodeSettings.
        keep_engine_cores``); a node is never moved from here, since one restarting would hand
        the narrowed cores on to the engine it is about to start (sluice/runtime/affinity.py,
        docs/decisions/node-engine-cores.md). Linux only; a failure is said, not raised."""
        if not self.config.keep_engine_cores or not affinity.supported():
            return
        live = [c for c in self.children if c.proc.poll() is None]
        nodes = [c.proc.pid for c in live if c.module == "inference_node"]
        services = [c.proc.pid for c in live if c.module != "inference_node"]
        services += [s.proc.pid for s in self.stores if s.proc and s.proc.poll() is None]
        try:
            split = affinity.keep_engine_cores(nodes, services)
        except Exception as exc:  # placement only: the suite serves as well without it
            self.say(f"could not keep the nodes' engine cores: {exc!r}")
            return
        if split.moved:
            self.say(
                f"kept cores {sorted(split.engine)} for the nodes' engines: "
                f"{split.moved} threads of the services moved to {sorted(split.others)}"
            )

    def _watch_all(self) -> None:
        """Hand every process to the watchdog: from here on a crash is a restart."""
        processes: list[Restartable] = [*self.stores, *self.children]
        for process in processes:
            self.watchdog.watch(process, self._started_at.get(process.name))

    def poll(self) -> None:
        """One supervision pass (``Watchdog.poll``): crashed processes are restarted after
        their backoff, or given up; returns within a fraction of a second."""
        self.watchdog.poll()

    def stop(self) -> None:
        """Children first (scheduler, nodes, cache), then the stores; by PID only."""
        self.watchdog.clear()
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.terminate()
        for child in reversed(self.children):
            try:
                child.proc.wait(self.config.grace_s + 5)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            child.log.close()
            self.say(f"stopped {child.name} (exit {child.proc.returncode})")
        self.children.clear()
        for store in reversed(self.stores):
            store.stop()
            self.say(f"stopped {store.name}")
        self.stores.clear()
        endpoints = self.run_dir / ENDPOINTS_FILE
        if endpoints.exists():
            endpoints.unlink()


__all__ = [
    "Endpoints",
    "Supervisor",
    "UpConfig",
    "dev_api_key",
    "read_endpoints",
    "serving_now",
    "wait_serving",
]
