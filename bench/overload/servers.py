"""The overload benchmark's two targets as processes it starts and stops around their runs: the
naive server (:mod:`bench.overload.naive_server`) and the Sluice suite (``sluice up``'s
supervisor with a tenants file for the scenario). Both model processes run niced alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import IO, Protocol

import yaml

from bench.load.scenario import Scenario
from bench.paths import REPO_ROOT
from sluice.local.stores import environment_without_proxies, free_port
from sluice.local.up import Supervisor, UpConfig, wait_serving
from sluice.runtime.auth import hash_api_key

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MODEL_CPU_NICE = UpConfig.node_cpu_nice
"""Nice increment of both targets' model processes (the naive server and Sluice's node), as
``sluice up`` gives its nodes: the load client, the scheduler and the stores share these two
cores with the model, and a node would have its own machine in production."""


class Server(Protocol):
    """A target's server process(es), started and stopped around its runs."""

    name: str
    address: str

    def start(self) -> None:
        """Start and wait until it serves."""
        ...

    def stop(self) -> None:
        """Stop everything started."""
        ...


class NaiveProcess:
    """``python -m bench.overload.naive_server`` as a child process on a free loopback port."""

    name = "naive"

    def __init__(self, model: str, run_dir: Path, startup_timeout_s: float = 600.0) -> None:
        self.model = model
        self.run_dir = run_dir
        self.startup_timeout_s = startup_timeout_s
        self.address = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait for ``SERVING`` (its model is loaded and warm by then)."""
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        log_path = self.run_dir / "naive_server.log"
        self._log = log_path.open("ab")
        env = {**environment_without_proxies(), **CHILD_ENV}
        argv = [sys.executable, "-m", "bench.overload.naive_server", "--model", self.model]
        argv += ["--port", str(port), "--log-format", "json", "--cpu-nice", str(MODEL_CPU_NICE)]
        self._proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_serving(self.address, self._proc, log_path, self.startup_timeout_s)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; by PID only."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()


class SluiceSuite:
    """The whole suite through ``sluice up``'s supervisor, with the scenario's tenants."""

    def __init__(
        self,
        scenario: Scenario,
        keys: dict[str, str],
        run_dir: Path,
        nodes: int = 1,
        max_sequences: int | None = None,
        scheduler_args: list[str] | None = None,
        engine: str = "builtin",
        vllm_python: Path | None = None,
        name: str = "sluice",
    ) -> None:
        self.name = name
        """What runs, logs and records are keyed by; a :class:`bench.overload.benchmark.
        Benchmark` reaches a server by it unless its ``target`` says otherwise (``bench.slo``
        names its two suites by their terms)."""
        self.scenario = scenario
        self.engine = engine
        """The nodes' engine (``UpConfig.engine``); ``vllm_python`` runs them with ``vllm``."""
        self.vllm_python = vllm_python
        self.keys = keys
        self.run_dir = run_dir
        self.nodes = nodes
        self.max_sequences = max_sequences
        self.scheduler_args = list(scheduler_args or [])
        """More scheduler flags (``bench.slo``'s reference turns the inter-token guard off)."""
        self.address = ""
        self.metrics_address = ""
        """The scheduler's Prometheus endpoint (host:port) once started."""
        self._supervisor: Supervisor | None = None

    def write_tenants(self) -> Path:
        """A tenants file holding each scenario tenant's weight and key hash."""
        path = self.run_dir / "tenants.yaml"
        tenants = [
            {
                "name": t.name,
                "api_key_hashes": [hash_api_key(self.keys[t.name])],
                "weight": t.weight,
            }
            for t in self.scenario.tenants
        ]
        path.write_text(yaml.safe_dump({"tenants": tenants}, sort_keys=False))
        return path

    def config(self) -> UpConfig:
        """What ``sluice up`` starts (writes the tenants file)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = UpConfig(
            run_dir=self.run_dir / "suite",
            nodes=self.nodes,
            models=list(self.scenario.models()),
            tenants_file=self.write_tenants(),
            max_sequences=self.max_sequences,
            scheduler_args=self.scheduler_args,
            node_cpu_nice=MODEL_CPU_NICE,
            # Its figures compare scheduling policies, measured plaintext since the start.
            insecure=True,
            engine=self.engine,
        )
        if self.vllm_python is not None:
            config.vllm_python = self.vllm_python
        return config

    def start(self) -> None:
        """Start etcd, Redis, cache, node(s) and scheduler; returns once all serve."""
        self._supervisor = Supervisor(self.config())
        try:
            endpoints = self._supervisor.start()
        except BaseException:
            self._supervisor.stop()
            raise
        self.address = endpoints.scheduler["grpc"]
        self.metrics_address = endpoints.scheduler["metrics"]

    def stop(self) -> None:
        """Stop every child, then the stores."""
        if self._supervisor is not None:
            self._supervisor.stop()
