"""The shared runtime: settings precedence, errors → statuses, interceptors, metrics endpoint,
CPU priority."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from sluice.runtime import context
from sluice.runtime.errors import (
    PUSHBACK_METADATA,
    STATUS_DETAILS_METADATA,
    InvalidArgument,
    ResourceExhausted,
)
from sluice.runtime.runner import lower_cpu_priority
from sluice.runtime.server import GrpcServer, ServerOptions
from sluice.runtime.settings import ServiceSettings, load_settings, parse_settings
from sluice.runtime.telemetry import MetricsServer
from sluice.sdk.errors import unpack_details
from sluice.v1 import cache_pb2, cache_pb2_grpc


def test_settings_precedence_defaults_file_env_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defaults < YAML file < SLUICE_* env < flags, field by field."""
    config = tmp_path / "s.yaml"
    config.write_text("port: 1111\nlog_level: debug\ngrace_seconds: 3\n")
    monkeypatch.setenv("SLUICE_PORT", "2222")
    monkeypatch.setenv("SLUICE_GRACE_SECONDS", "4")
    s = parse_settings(ServiceSettings, ["--config", str(config), "--grace-seconds", "5"], "t")
    assert s.metrics_port == 0  # default
    assert s.log_level == "debug"  # file
    assert s.port == 2222  # env beats file
    assert s.grace_seconds == 5.0  # flag beats env
    assert load_settings(ServiceSettings).port == 2222


def test_settings_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    """A config path that does not exist is refused, not silently ignored."""
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_settings(ServiceSettings, config_file=tmp_path / "nope.yaml")


def test_resource_exhausted_carries_retry_info_quota_failure_and_pushback() -> None:
    """A refusal packs ErrorInfo, RetryInfo and QuotaFailure and sets grpc-retry-pushback-ms."""
    err = ResourceExhausted(
        "over quota",
        retry_after_s=1.25,
        reason="QUOTA_EXCEEDED",
        quota_violations=[("tenant:a", "requests per second")],
    )
    trailers = dict(err.trailing_metadata())
    assert trailers[PUSHBACK_METADATA] == "1250"
    status = status_pb2.Status.FromString(trailers[STATUS_DETAILS_METADATA])  # type: ignore[arg-type]
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    kinds = {type(d).__name__: d for d in unpack_details(status)}
    assert kinds["ErrorInfo"].reason == "QUOTA_EXCEEDED"  # type: ignore[attr-defined]
    assert kinds["RetryInfo"].retry_delay.seconds == 1  # type: ignore[attr-defined]
    assert kinds["RetryInfo"].retry_delay.nanos == 250_000_000  # type: ignore[attr-defined]
    assert kinds["QuotaFailure"].violations[0].subject == "tenant:a"  # type: ignore[attr-defined]


def test_invalid_argument_lists_every_violation() -> None:
    """BadRequest carries one field violation per broken rule."""
    err = InvalidArgument([("a", "x"), ("b", "y")])
    (bad,) = [d for d in err.details() if isinstance(d, error_details_pb2.BadRequest)]
    assert [(v.field, v.description) for v in bad.field_violations] == [("a", "x"), ("b", "y")]
    assert PUSHBACK_METADATA not in dict(err.trailing_metadata())


class _ProbeCache(cache_pb2_grpc.CacheServicer):
    """A servicer that exposes what the interceptors put in the context."""

    async def Stats(
        self, request: cache_pb2.StatsRequest, ctx: grpc.aio.ServicerContext
    ) -> cache_pb2.StatsResponse:
        rid = context.request_id.get()
        return cache_pb2.StatsResponse(hits=len(rid), redis_available=rid == "rid-123")

    async def Lookup(
        self, request: cache_pb2.LookupRequest, ctx: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        raise RuntimeError("secret internals")


@pytest.fixture
async def probe() -> AsyncIterator[tuple[cache_pb2_grpc.CacheStub, CollectorRegistry]]:
    registry = CollectorRegistry()
    server = GrpcServer("probe", ServerOptions(), registry)
    server.add(cache_pb2_grpc.add_CacheServicer_to_server, _ProbeCache(), "sluice.v1.Cache")
    await server.start()
    channel = grpc.aio.insecure_channel(server.address, options=[("grpc.enable_http_proxy", 0)])
    yield cache_pb2_grpc.CacheStub(channel), registry
    await channel.close()
    await server.stop(0)


async def test_request_id_from_metadata_reaches_the_handler(
    probe: tuple[cache_pb2_grpc.CacheStub, CollectorRegistry],
) -> None:
    """x-request-id metadata is what handlers read from sluice.runtime.context.request_id."""
    stub, _ = probe
    reply = await stub.Stats(cache_pb2.StatsRequest(), metadata=(("x-request-id", "rid-123"),))
    assert reply.redis_available


async def test_request_id_is_generated_when_absent(
    probe: tuple[cache_pb2_grpc.CacheStub, CollectorRegistry],
) -> None:
    """Without metadata the handler still sees a (fresh, 32-hex) request id."""
    stub, _ = probe
    reply = await stub.Stats(cache_pb2.StatsRequest())
    assert reply.hits == 32


async def test_unhandled_exception_becomes_generic_internal(
    probe: tuple[cache_pb2_grpc.CacheStub, CollectorRegistry],
) -> None:
    """An unexpected exception is INTERNAL with a generic message: no internals leak."""
    stub, registry = probe
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Lookup(cache_pb2.LookupRequest())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (err.value.details() or "")
    count = registry.get_sample_value(
        "sluice_rpc_requests_total", {"method": "/sluice.v1.Cache/Lookup", "code": "INTERNAL"}
    )
    assert count == 1.0


async def test_metrics_endpoint_serves_sluice_metrics(
    probe: tuple[cache_pb2_grpc.CacheStub, CollectorRegistry],
) -> None:
    """/metrics on its own port shows the RPC counters with sluice_ names."""
    stub, registry = probe
    await stub.Stats(cache_pb2.StatsRequest())
    metrics = MetricsServer(registry)
    metrics.start()
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{metrics.address}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        metrics.stop()
    assert 'sluice_rpc_requests_total{code="OK",method="/sluice.v1.Cache/Stats"} 1.0' in body
    assert "sluice_rpc_duration_seconds_bucket" in body


async def test_server_can_start_not_serving_and_set_health_per_service() -> None:
    """``start(serving=False)`` opens the port answering NOT_SERVING for the server and each
    service; ``set_serving`` can flip one service alone, and logs each change with its reason."""
    server = GrpcServer("probe", ServerOptions(), CollectorRegistry())
    server.add(cache_pb2_grpc.add_CacheServicer_to_server, _ProbeCache(), "sluice.v1.Cache")
    with capture_logs() as logs:
        await server.start(serving=False, reason="store_unavailable")
    channel = grpc.aio.insecure_channel(server.address, options=[("grpc.enable_http_proxy", 0)])
    health = health_pb2_grpc.HealthStub(channel)

    async def status(service: str) -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return reply.status

    try:
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        assert [await status(s) for s in ("", "sluice.v1.Cache")] == [not_serving, not_serving]
        with capture_logs() as later:
            await server.set_serving(True, reason="store_back", services=["sluice.v1.Cache"])
            await server.set_serving(True, reason="store_back", services=["sluice.v1.Cache"])
        assert [await status(s) for s in ("", "sluice.v1.Cache")] == [not_serving, serving]
        assert server.is_serving("sluice.v1.Cache") and not server.is_serving()
        changes = [e for e in [*logs, *later] if e["event"] == "health_changed"]
        assert [(e["serving"], e["reason"]) for e in changes] == [
            (False, "store_unavailable"),
            (True, "store_back"),  # the repeated call changed nothing and logged nothing
        ]
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_normal_start_serves_without_a_health_change_line() -> None:
    """``start()`` says SERVING at once, as always; only ``server_started`` is logged."""
    server = GrpcServer("probe", ServerOptions(), CollectorRegistry())
    with capture_logs() as logs:
        await server.start()
    try:
        assert server.is_serving()
        assert [e["event"] for e in logs] == ["server_started"]
    finally:
        await server.stop(0)


LOWER_PRIORITY_CHILD = """
import os, sys, threading
from sluice.runtime.runner import lower_cpu_priority
started, stop = threading.Event(), threading.Event()
def early():
    started.set()
    stop.wait()
before = threading.Thread(target=early)
before.start()
started.wait()
returned = lower_cpu_priority(int(sys.argv[1]))
after = threading.Thread(target=stop.wait)
after.start()
tids = [before.native_id, after.native_id, threading.get_native_id()]
print(returned, *(os.getpriority(os.PRIO_PROCESS, t) for t in tids))
stop.set()
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice is Linux's")
def test_lower_cpu_priority_lowers_threads_started_before_and_after_it() -> None:
    """Every thread ends up niced: one an import started before the call, the calling one and
    one started after (it inherits); the call returns the main thread's new value. In a child
    process, so pytest itself keeps its priority."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    out = subprocess.run(
        [sys.executable, "-c", LOWER_PRIORITY_CHILD, "3"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    want = min(19, base + 3)
    assert [int(v) for v in out] == [want] * 4


def test_lower_cpu_priority_refuses_an_increment_outside_0_to_19() -> None:
    with pytest.raises(ValueError, match="0-19"):
        lower_cpu_priority(20)
    with pytest.raises(ValueError, match="0-19"):
        lower_cpu_priority(-1)


def test_an_error_quoting_a_huge_field_keeps_its_trailers_small() -> None:
    """An error whose message and violations quote a 1 MiB value (here of 4-byte characters)
    still fits well under a client's 8 KiB soft metadata limit once the message is
    percent-encoded (3 bytes a byte) and the details base64-encoded, so the caller gets the
    real status and its details."""
    huge = "\U0001f600" * (1 << 18)
    err = InvalidArgument([(huge, f"unknown model {huge!r}")] * 100, reason="BAD")
    trailers = dict(err.trailing_metadata())
    details = trailers[STATUS_DETAILS_METADATA]
    assert isinstance(details, bytes)
    wire = 3 * len(err.message.encode()) + len(details) * 4 // 3
    assert wire < 6 * 1024
    assert len(err.violations) <= 10
    assert err.message.endswith("bytes)")
