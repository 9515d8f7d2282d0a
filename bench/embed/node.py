"""A real inference node serving all-MiniLM-L6-v2 as a child process on a free loopback port
(registered in an etcd this benchmark starts, as ``sluice up`` would), in one batching mode;
and a read of its ``sluice_node_embed_batch_size`` histogram."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sluice.local.stores import environment_without_proxies, free_port
from sluice.local.up import wait_serving

HOST = "127.0.0.1"
MODEL = "all-minilm-l6-v2"
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RunningNode:
    """A started node: where to call it and where it exports its metrics."""

    address: str
    metrics_address: str

    def batch_sizes(self) -> tuple[float, float]:
        """``sluice_node_embed_batch_size``'s (count, sum) now: forwards and texts so far."""
        url = f"http://{self.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        count = total = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != "sluice_node_embed_batch_size":
                continue
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
        return count, total


@contextlib.contextmanager
def embedding_node(
    run_dir: Path, etcd: str, name: str, max_batch: int, workers: int = 0
) -> Iterator[RunningNode]:
    """A node whose Embed forwards take at most ``max_batch`` texts (1: one at a time), run
    on ``workers`` embedding threads (0: the node's default), with the node's other embedding
    settings at their defaults; stopped (SIGTERM, then SIGKILL, by
    its PID) when the block ends."""
    port, metrics_port = free_port(HOST), free_port(HOST)
    log_path = run_dir / f"{name}.log"
    argv = [
        sys.executable, "-m", "inference_node", "--host", HOST, "--port", str(port),
        "--metrics-host", HOST, "--metrics-port", str(metrics_port), "--log-format", "json",
        "--grace-seconds", "2", "--etcd-endpoint", etcd, "--node-id", name,
        "--models", MODEL, "--embed-max-batch", str(max_batch), "--embed-workers", str(workers),
    ]  # fmt: skip
    env = environment_without_proxies()
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_serving(f"{HOST}:{port}", proc, log_path, STARTUP_TIMEOUT_S, name)
            yield RunningNode(f"{HOST}:{port}", f"{HOST}:{metrics_port}")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
