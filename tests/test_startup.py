"""Start-up with a dependency down: every service opens its port at once, says NOT_SERVING
(with the reason logged) and turns SERVING when the dependency appears; with it up, nothing
changes. Real etcd and Redis started late on the port the services were pointed at."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from cache_service.app import CacheService
from cache_service.config import CacheSettings
from inference_node.app import NodeService
from inference_node.config import NodeSettings
from inference_node.models import LanguageModel
from scheduler.app import SchedulerService
from scheduler.config import SchedulerSettings
from sluice.contract import NODES_PREFIX, SCHEDULERS_PREFIX
from sluice.local.stores import StoreProcess, etcd_process, free_port, redis_process
from sluice.runtime.registry import etcd_client
from tests import harness
from tests.harness import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_BOUND_S = 2.0
"""A start with its dependency down takes at most this (it used to wait forever)."""


class Health:
    """Asks a service's ``grpc.health.v1`` (overall status) and remembers the last answer."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self.last: int | None = None

    async def check(self) -> int:
        reply = await self._stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        self.last = reply.status
        return reply.status

    async def close(self) -> None:
        await self._channel.close()


async def serving(health: Health) -> bool:
    return await health.check() == SERVING


async def eventually_serving(health: Health, timeout: float = 10.0) -> None:
    """Poll the health status until SERVING (``eventually`` takes sync predicates)."""
    deadline = time.monotonic() + timeout
    while not await serving(health):
        if time.monotonic() > deadline:
            raise AssertionError(f"not SERVING within {timeout}s (last {health.last})")
        await asyncio.sleep(0.05)


@pytest.fixture
async def late_etcd(tmp_path: Path) -> AsyncIterator[StoreProcess]:
    """An etcd on a fixed free port, not started: the test starts it when it wants."""
    proc = etcd_process(tmp_path / "etcd-data", tmp_path / "etcd.log", port=free_port())
    yield proc
    proc.stop()


def scheduler_on(endpoint: str) -> SchedulerService:
    settings = SchedulerSettings(etcd_endpoint=endpoint, registry_ttl_seconds=2)
    return SchedulerService(settings, CollectorRegistry(), tenants=harness.test_tenants())


def node_on(endpoint: str, lm: LanguageModel) -> NodeService:
    settings = NodeSettings(
        etcd_endpoint=endpoint, node_id="node-late", models=[lm.name], registry_ttl_seconds=2
    )
    return NodeService(settings, CollectorRegistry(), {lm.name: lm}, {})


async def timed_start(service: SchedulerService | NodeService | CacheService) -> float:
    started = time.monotonic()
    await asyncio.wait_for(service.start(), START_BOUND_S)
    return time.monotonic() - started


async def test_scheduler_and_node_started_before_etcd_serve_once_it_appears(
    late_etcd: StoreProcess, tiny_lm: LanguageModel
) -> None:
    """With nothing on the etcd port, a scheduler and a node start within the bound, answer
    health NOT_SERVING (reason logged), and turn SERVING once etcd starts on that port: the
    node registers, the scheduler reads the node view, registers itself and sees the node."""
    scheduler = scheduler_on(late_etcd.address)
    node = node_on(late_etcd.address, tiny_lm)
    checks: list[Health] = []
    try:
        with capture_logs() as logs:
            await timed_start(scheduler)
            await timed_start(node)
        events = {e["event"]: e for e in logs}
        assert events["scheduler_not_serving"]["reason"] == "etcd_unavailable"
        assert "ConnectionFailed" in events["scheduler_not_serving"]["error"]
        assert events["node_not_serving"]["reason"] == "etcd_unavailable"
        checks = [Health(scheduler.address), Health(node.server.address)]
        assert [await h.check() for h in checks] == [NOT_SERVING, NOT_SERVING]

        await asyncio.to_thread(late_etcd.start)

        for health in checks:
            await eventually_serving(health)
        await eventually(lambda: scheduler.nodes.candidates(tiny_lm.name, 1), timeout=10)
        assert scheduler.registration is not None and scheduler.registration.registered.is_set()
        client = etcd_client(late_etcd.address)
        try:
            keys = {kv.key.decode() for kv in await client.get_prefix(b"/sluice/")}
        finally:
            await client.close()
        assert {NODES_PREFIX + "node-late", SCHEDULERS_PREFIX + scheduler.scheduler_id} <= keys
    finally:
        for health in checks:
            await health.close()
        await scheduler.stop(0.5)
        await node.stop(0.5)


async def test_with_etcd_up_scheduler_and_node_serve_when_start_returns(
    etcd: str, tiny_lm: LanguageModel
) -> None:
    """The usual start is unchanged: when ``start`` returns, the node is registered and the
    scheduler has read the node view, registered, and both say SERVING. The built-in engine
    does not pace its prompts (the scheduler's prefill bucket keeps its measured-time rule)."""
    node = node_on(etcd, tiny_lm)
    scheduler = scheduler_on(etcd)
    try:
        await timed_start(node)
        await timed_start(scheduler)
        assert node.server.is_serving() and scheduler.server.is_serving()
        seen, handle = scheduler.view.get("node-late"), scheduler.nodes.get("node-late")
        assert seen is not None and [m.paces_prompts for m in seen.models] == [False]
        assert handle is not None and not handle.book.paces_prompts
        assert handle.book.max_sequences == seen.capacity.max_sequences
        assert scheduler.registration is not None and scheduler.registration.registered.is_set()
        for address in (node.server.address, scheduler.address):
            health = Health(address)
            try:
                assert await health.check() == SERVING
            finally:
                await health.close()
    finally:
        await scheduler.stop(0.5)
        await node.stop(0.5)


async def test_cache_started_before_redis_serves_once_it_appears(tmp_path: Path) -> None:
    """With nothing on the Redis port, the cache opens its port at once, answers lookups as
    misses and health NOT_SERVING (reason logged), and turns SERVING once Redis starts."""
    redis = redis_process(tmp_path / "redis-data", tmp_path / "redis.log", port=free_port())
    cache = CacheService(CacheSettings(redis_url=f"redis://{redis.address}/0"), CollectorRegistry())
    health: Health | None = None
    try:
        with capture_logs() as logs:
            await timed_start(cache)
        assert [e["reason"] for e in logs if e["event"] == "cache_not_serving"] == [
            "redis_unavailable"
        ]
        health = Health(cache.address)
        assert await health.check() == NOT_SERVING
        await asyncio.to_thread(redis.start)
        await eventually_serving(health)
    finally:
        if health is not None:
            await health.close()
        await cache.stop(0)
        redis.stop()


async def test_cache_with_redis_up_serves_when_start_returns(redis_url: str) -> None:
    """With Redis up the cache says SERVING as soon as ``start`` returns, as before."""
    cache = CacheService(CacheSettings(redis_url=redis_url), CollectorRegistry())
    try:
        await timed_start(cache)
        assert cache.server.is_serving()
    finally:
        await cache.stop(0)
