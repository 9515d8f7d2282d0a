"""Warm node start: seconds from `python -m inference_node` to `SERVING`, with the model cache
present (the first start converts SmolLM2 once; it is run and reported separately).

`python -m bench.engine.node_start` writes `bench/results/node_start.json` with only this run's
figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.local.stores import environment_without_proxies, etcd_process, free_port

TARGET_S = 5.0


def start_once(models: str, etcd: str, log: Path) -> float:
    """Seconds until a fresh node process answers SERVING; the node is then stopped."""
    port = free_port()
    argv = [
        sys.executable, "-m", "inference_node", "--models", models, "--port", str(port),
        "--etcd-endpoint", etcd, "--log-format", "json",
    ]  # fmt: skip
    started = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=environment_without_proxies()
        )
    try:
        # Short reconnect backoff: the probe must see the port open within 50 ms, not after
        # gRPC's default 1 s+ backoff from the refused connections before the node listened.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 20),
            ("grpc.max_reconnect_backoff_ms", 50),
        ]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"node exited with {proc.returncode}; see {log}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="smollm2-135m-instruct,all-minilm-l6-v2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/node_start.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        etcd = etcd_process(base / "etcd", base / "etcd.log").start()
        try:
            first = start_once(args.models, etcd.address, base / "node.log")  # fills the cache
            warm = [
                start_once(args.models, etcd.address, base / "node.log") for _ in range(args.runs)
            ]
        finally:
            etcd.stop()
    result = {
        "models": args.models,
        "first_start_s": round(first, 3),
        "warm_start_s": [round(s, 3) for s in warm],
        "warm_start_median_s": round(statistics.median(warm), 3),
        "target_s": TARGET_S,
        "pass": statistics.median(warm) <= TARGET_S,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "PASS" if result["pass"] else "FAIL"
    print(f"node start: first {first:.2f} s (may include the one-time conversion), warm "
          f"{', '.join(f'{s:.2f}' for s in warm)} s; median {result['warm_start_median_s']} s "
          f"≤ {TARGET_S} s: {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
