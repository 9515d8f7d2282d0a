"""Whether a service of the suite serves: ``grpc.health.v1`` checks `sluice up`, the demo and
the benchmarks wait on."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.runtime.tls import Identity, Mesh


def serving_now(
    address: str,
    timeout_s: float = 0.2,
    *,
    mesh: Mesh | None = None,
    peer: Identity | None = None,
) -> bool:
    """Whether ``address`` answers ``SERVING`` on ``grpc.health.v1`` within ``timeout_s``
    (through ``mesh`` to ``peer`` when the suite is secure)."""
    with (mesh or Mesh()).sync_channel(address, peer) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_serving(
    address: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    timeout_s: float,
    name: str = "",
    *,
    poll_s: float = 0.1,
    mesh: Mesh | None = None,
    peer: Identity | None = None,
) -> None:
    """Poll ``grpc.health.v1`` at ``address`` until it says ``SERVING``.

    Raises ``RuntimeError`` with the tail of ``log_path`` if ``proc`` exits first, and
    ``TimeoutError`` after ``timeout_s``.
    """
    name = name or address
    deadline = time.monotonic() + timeout_s
    with (mesh or Mesh()).sync_channel(address, peer) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not SERVING after {timeout_s:.0f}s; see {log_path}")
            time.sleep(poll_s)
