"""The scheduler as a service: quotas, admission, routing, failure handling, live tenants and
two replicas, against real etcd, Redis and tiny-model nodes on ephemeral ports."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client import CollectorRegistry, generate_latest

from scheduler.app import SchedulerService
from scheduler.config import SchedulerSettings
from scheduler.live_config import TENANTS_KEY
from scheduler.tenants import Quotas, Tenant, TenantDirectory
from sluice.runtime.auth import hash_api_key
from sluice.runtime.breaker import BreakerState
from sluice.runtime.errors import PUSHBACK_METADATA
from sluice.runtime.registry import etcd_client
from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from tests.harness import API_KEY, Suite, auth, eventually, fake_node
from tests.test_end_to_end import TINY, details_of, gen_request, unpack

LIMITED_KEY = "sk-sluice-test-key-limited"
ADMIN_KEY = "sk-sluice-test-key-admin"
ALL = frozenset({1, 2, 3})


def tenants() -> list[Tenant]:
    return [
        Tenant("alpha", 2.0, ALL, frozenset({"*"}), (hash_api_key(API_KEY),)),
        Tenant(
            "limited",
            1.0,
            ALL,
            frozenset({"*"}),
            (hash_api_key(LIMITED_KEY),),
            quotas=Quotas(requests_per_second=1, burst=2),
        ),
        Tenant("ops", 1.0, ALL, frozenset({"*"}), (hash_api_key(ADMIN_KEY),), admin=True),
    ]


class Schedulers:
    """Scheduler replicas for a test, stopped at its end."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.started: list[SchedulerService] = []
        self.registries: list[CollectorRegistry] = []

    async def start(self, **overrides: Any) -> SchedulerService:
        settings = SchedulerSettings(
            etcd_endpoint=self.suite.etcd,
            redis_url=self.suite.redis_url,
            registry_ttl_seconds=2,
            **overrides,
        )
        registry = CollectorRegistry()
        service = SchedulerService(settings, registry, tenants=TenantDirectory(tenants()))
        await service.start()
        self.started.append(service)
        self.registries.append(registry)
        return service

    def stub(self, service: SchedulerService) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.suite.channel(service.address))


@pytest.fixture
async def schedulers(suite: Suite) -> AsyncIterator[Schedulers]:
    s = Schedulers(suite)
    yield s
    for service in s.started:
        await service.stop(0.5)


async def generate(
    stub: inference_pb2_grpc.InferenceStub, key: str = API_KEY, **kw: Any
) -> list[inference_pb2.GenerateChunk]:
    timeout = kw.pop("timeout", 30.0)
    req = gen_request(**kw)
    return [c async for c in stub.Generate(req, metadata=auth(key), timeout=timeout)]


def pushback_ms(exc: grpc.aio.AioRpcError) -> int:
    values = [v for k, v in exc.trailing_metadata() or () if k == PUSHBACK_METADATA]
    assert values, "no grpc-retry-pushback-ms trailer"
    return int(values[0])


async def ready(service: SchedulerService, count: int = 1) -> None:
    await eventually(lambda: len(service.nodes.candidates(TINY, 1)) >= count)
    await eventually(lambda: all(n.load is not None for n in service.nodes.nodes()))


# -- quotas ----------------------------------------------------------------------------------


async def test_over_quota_is_refused_with_quota_failure_retry_info_and_pushback(
    suite: Suite, schedulers: Schedulers
) -> None:
    """Over its requests-per-second quota a tenant gets RESOURCE_EXHAUSTED with QuotaFailure,
    RetryInfo from the bucket refill, and the matching grpc-retry-pushback-ms trailer."""
    await suite.start_node("node-a")
    service = await schedulers.start()
    await ready(service)
    stub = schedulers.stub(service)
    await generate(stub, LIMITED_KEY, max_new_tokens=2)
    await generate(stub, LIMITED_KEY, max_new_tokens=2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, LIMITED_KEY, max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = details_of(err.value)
    failure = unpack(status, error_details_pb2.QuotaFailure)
    assert failure.violations[0].subject == "tenant:limited/requests_per_second"  # type: ignore[attr-defined]
    retry = unpack(status, error_details_pb2.RetryInfo)
    delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9  # type: ignore[attr-defined]
    assert 0.3 < delay <= 1.0
    assert abs(pushback_ms(err.value) - delay * 1000) <= 1
    info = unpack(status, error_details_pb2.ErrorInfo)
    assert info.reason == "QUOTA_EXCEEDED"  # type: ignore[attr-defined]
    usage = await admin_pb2_grpc.AdminStub(suite.channel(service.address)).GetTenantUsage(
        admin_pb2.GetTenantUsageRequest(), metadata=auth(LIMITED_KEY)
    )
    assert usage.refused_by_reason["QUOTA_EXCEEDED"] == 1
    assert usage.quotas.requests_per_second == 1 and usage.quotas.burst == 2


async def test_plain_grpc_retry_policy_waits_for_the_pushback(
    suite: Suite, schedulers: Schedulers
) -> None:
    """A plain gRPC channel whose service config retries RESOURCE_EXHAUSTED succeeds after
    waiting the pushback (about the 1 s refill), with no Sluice code in the client."""
    await suite.start_node("node-a")
    service = await schedulers.start()
    await ready(service)
    config = {
        "methodConfig": [
            {
                "name": [{"service": "sluice.v1.Inference"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "30s",
                    "maxBackoff": "30s",
                    "backoffMultiplier": 1,
                    "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
                },
            }
        ]
    }
    channel = grpc.aio.insecure_channel(
        service.address,
        options=[("grpc.service_config", json.dumps(config)), ("grpc.enable_http_proxy", 0)],
    )
    suite.channels.append(channel)
    stub = inference_pb2_grpc.InferenceStub(channel)
    await generate(stub, LIMITED_KEY, max_new_tokens=2)
    await generate(stub, LIMITED_KEY, max_new_tokens=2)
    started = time.monotonic()
    chunks = await generate(stub, LIMITED_KEY, max_new_tokens=2)  # refused once, then retried
    elapsed = time.monotonic() - started
    assert chunks[-1].usage.completion_tokens == 2
    assert 0.3 < elapsed < 3.0  # the pushback (<= 1 s), not the 30 s backoff


async def test_an_overlapped_quota_refusal_reaches_the_client_and_frees_the_node(
    suite: Suite, schedulers: Schedulers
) -> None:
    """With ``quota_overlap`` (the default) the request is already on its way to a node when
    Redis says no: the client gets the quota refusal and no token, and the node call is
    cancelled, so nothing stays booked (node book, slot share, usage)."""
    await suite.start_node("node-a")
    service = await schedulers.start()
    await ready(service)
    stub = schedulers.stub(service)
    for _ in range(2):
        await generate(stub, LIMITED_KEY, max_new_tokens=2)
    realtime = common_pb2.WORKLOAD_CLASS_REALTIME
    asked = service.gate.demand.rate(TINY, realtime, "limited")
    call = stub.Generate(gen_request(max_new_tokens=64), metadata=auth(LIMITED_KEY), timeout=30)
    chunks = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in call:
            chunks.append(chunk)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not chunks
    assert unpack(details_of(err.value), error_details_pb2.ErrorInfo).reason == "QUOTA_EXCEEDED"  # type: ignore[attr-defined]
    await eventually(lambda: all(n.book.in_flight == 0 for n in service.nodes.nodes()))
    assert service.gate.shares.running(TINY, common_pb2.WORKLOAD_CLASS_REALTIME, "limited") == 0
    assert service.usage.of("limited").in_flight == 0
    # The refused request reached the gate's demand meter too (64 tokens over its window).
    assert service.gate.demand.rate(TINY, realtime, "limited") > asked


async def test_two_replicas_share_the_quota(suite: Suite, schedulers: Schedulers) -> None:
    """Two replicas on the same etcd and Redis: the bucket is global, so requests spread over
    both are refused at the same count as on one."""
    await suite.start_node("node-a")
    one = await schedulers.start()
    two = await schedulers.start()
    await ready(one)
    await ready(two)
    await generate(schedulers.stub(one), LIMITED_KEY, max_new_tokens=2)
    await generate(schedulers.stub(two), LIMITED_KEY, max_new_tokens=2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(schedulers.stub(one), LIMITED_KEY, max_new_tokens=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await generate(schedulers.stub(two), API_KEY, max_new_tokens=2)  # other tenants unaffected


# -- admission and the queue -----------------------------------------------------------------


async def test_unmeetable_deadline_is_refused_at_once_and_client_gone_leaves_queue(
    suite: Suite, schedulers: Schedulers
) -> None:
    """A node with one slot is busy and a long request is queued: a request with a short
    deadline is refused at once (OVERLOADED, RetryInfo = predicted wait, pushback trailer);
    cancelling the queued call removes it from the queue at once, and its hold count is
    closed there: all its time in the queue is counted, none after."""
    await suite.start_node("node-a", max_sequences=1)
    # The deadline alone decides here: the REALTIME queue-wait bound and TTFT target would
    # refuse the 20 s wait of the queued request too.
    service = await schedulers.start(
        default_tokens_per_s=50.0, realtime_max_wait_seconds=0, realtime_ttft_target_seconds=0
    )
    await ready(service)
    stub = schedulers.stub(service)
    running = stub.Generate(gen_request("busy", max_new_tokens=1000), metadata=auth())
    await running.read()
    queued = stub.Generate(gen_request("queued", max_new_tokens=1000), metadata=auth())
    await eventually(lambda: len(service.gate.queues) == 1)
    waiting = next(iter(service.gate.queues.items()))
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stub, max_new_tokens=1000, timeout=0.5)
    refused_in = time.perf_counter() - started
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = details_of(err.value)
    assert unpack(status, error_details_pb2.ErrorInfo).reason == "OVERLOADED"  # type: ignore[attr-defined]
    retry = unpack(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds >= 1  # type: ignore[attr-defined]
    assert pushback_ms(err.value) >= 1000
    assert refused_in < 0.25
    await asyncio.sleep(0.3)  # long enough in the queue for the count to be told from none
    assert len(service.gate.queues) == 1  # still queued behind the long request
    cancelled_at = time.monotonic()  # the gate's clock
    queued.cancel()
    await eventually(lambda: len(service.gate.queues) == 0, timeout=2.0)
    left_by = time.monotonic()
    counted = sum(waiting.held_s.values())
    assert waiting.held_s.get("slots", 0.0) > 0
    assert cancelled_at - waiting.enqueued_at <= counted <= left_by - waiting.enqueued_at
    await asyncio.sleep(0.1)
    assert sum(waiting.held_s.values()) == counted
    running.cancel()


async def test_queued_request_is_dispatched_when_a_slot_frees(
    suite: Suite, schedulers: Schedulers
) -> None:
    """With the node's only slot taken, a request waits in the queue and runs once the
    first finishes; its queue wait is recorded."""
    await suite.start_node("node-a", max_sequences=1)
    service = await schedulers.start()
    await ready(service)
    stub = schedulers.stub(service)
    first = asyncio.create_task(generate(stub, max_new_tokens=64))
    await eventually(lambda: service.nodes.get("node-a").in_flight == 1)  # type: ignore[union-attr]
    second = asyncio.create_task(generate(stub, prompt="second", max_new_tokens=4))
    await eventually(lambda: len(service.gate.queues) == 1)
    waiting = next(iter(service.gate.queues.items()))
    assert (await second)[-1].usage.completion_tokens == 4
    await first
    assert waiting.held_s.get("slots", 0.0) > 0  # its log line says what held it
    assert set(waiting.held_s) <= {"behind", "slots"}
    text = generate_latest(schedulers.registries[0]).decode()
    assert (
        'sluice_scheduler_queue_wait_seconds_count{tenant="alpha",workload_class="realtime"} 2.0'
        in text
    )
    assert "sluice_scheduler_queue_depth" in text


async def test_batch_only_fills_capacity_realtime_is_not_using(
    suite: Suite, schedulers: Schedulers
) -> None:
    """On a node with two slots BATCH may use one (the other is REALTIME's headroom): a
    second BATCH request waits in the queue while a REALTIME request is served at once."""
    await suite.start_node("node-a", max_sequences=2)
    service = await schedulers.start()
    await ready(service)
    stub = schedulers.stub(service)
    batch = [
        stub.Generate(
            gen_request(
                f"batch {i}", max_new_tokens=1000, workload_class=common_pb2.WORKLOAD_CLASS_BATCH
            ),
            metadata=auth(),
        )
        for i in range(2)
    ]
    await eventually(lambda: service.gate.queues.depth(common_pb2.WORKLOAD_CLASS_BATCH) == 1)
    chunks = await generate(stub, prompt="interactive", max_new_tokens=4, timeout=10)
    assert chunks[-1].usage.completion_tokens == 4
    assert service.gate.queues.depth(common_pb2.WORKLOAD_CLASS_BATCH) == 1
    for call in batch:
        call.cancel()
    await eventually(lambda: len(service.gate.queues) == 0)


# -- routing and failure handling ------------------------------------------------------------


class FailingNode(node_pb2_grpc.NodeServicer):
    """A registered, SERVING node whose Generate always fails before the first token."""

    def __init__(self) -> None:
        self.calls = 0

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "engine wedged")
        yield  # pragma: no cover

    async def StreamLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        while True:
            yield common_pb2.LoadReport(node_id="bad", state=common_pb2.NODE_STATE_SERVING)
            await asyncio.sleep(0.2)


@pytest.fixture
async def failing_node(suite: Suite) -> AsyncIterator[FailingNode]:
    servicer = FailingNode()
    async with fake_node(suite.etcd, servicer, "bad"):
        yield servicer


async def test_failing_node_is_retried_elsewhere_then_circuit_opens(
    suite: Suite, schedulers: Schedulers, failing_node: FailingNode
) -> None:
    """A node failing before the first token: its requests are retried on the healthy node
    (the client sees only successes), and after 5 failures its circuit opens, shown by
    Admin.ListNodes; no request is sent there while it is open."""
    await suite.start_node("good")
    service = await schedulers.start()
    await ready(service, count=2)
    stub = schedulers.stub(service)
    for i in range(30):
        chunks = await generate(stub, prompt=f"p{i}", max_new_tokens=2)
        assert chunks[0].node_id == "good"
        bad = service.nodes.get("bad")
        if bad is not None and bad.breaker.state is BreakerState.OPEN:
            break
    assert failing_node.calls == 5
    calls = failing_node.calls
    for i in range(5):
        await generate(stub, prompt=f"q{i}", max_new_tokens=2)
    assert failing_node.calls == calls
    reply = await admin_pb2_grpc.AdminStub(suite.channel(service.address)).ListNodes(
        admin_pb2.ListNodesRequest(), metadata=auth(ADMIN_KEY)
    )
    states = {n.info.node_id: n.circuit for n in reply.nodes}
    assert states == {"bad": admin_pb2.CIRCUIT_STATE_OPEN, "good": admin_pb2.CIRCUIT_STATE_CLOSED}
    text = generate_latest(schedulers.registries[0]).decode()
    assert 'sluice_scheduler_retries_total{node="bad"} 5.0' in text
    assert 'sluice_scheduler_node_circuit_state{node="bad"} 2.0' in text


async def test_draining_node_gets_no_new_work(suite: Suite, schedulers: Schedulers) -> None:
    """A node that starts draining is skipped at once; the other takes every request."""
    await suite.start_node("node-a")
    node_b = await suite.start_node("node-b")
    service = await schedulers.start()
    await ready(service, count=2)
    await node_pb2_grpc.NodeStub(suite.channel(node_b.address)).Drain(
        node_pb2.DrainRequest(grace_seconds=5)
    )
    await eventually(lambda: len(service.nodes.candidates(TINY, 1)) == 1)
    stub = schedulers.stub(service)
    for i in range(6):
        chunks = await generate(stub, prompt=f"d{i}", max_new_tokens=2)
        assert chunks[0].node_id == "node-a"


async def test_session_affinity_prefers_the_same_node(suite: Suite, schedulers: Schedulers) -> None:
    """Requests of one session land on the node that served it while loads tie."""
    await suite.start_node("node-a")
    await suite.start_node("node-b")
    service = await schedulers.start()
    await ready(service, count=2)
    stub = schedulers.stub(service)
    nodes = {
        (await generate(stub, session_id="s-1", prompt=f"turn {i}", max_new_tokens=2))[0].node_id
        for i in range(6)
    }
    assert len(nodes) == 1


# -- tenants and admin -----------------------------------------------------------------------


async def test_tenants_from_etcd_apply_live(suite: Suite, schedulers: Schedulers) -> None:
    """Putting a tenants document under /sluice/config/tenants replaces the tenants without
    restart; an invalid document is ignored; deleting the key returns to the file's."""
    await suite.start_node("node-a")
    service = await schedulers.start()
    await ready(service)
    stub = schedulers.stub(service)
    new_key = "sk-sluice-test-key-live"
    doc = {
        "tenants": [
            {
                "name": "live",
                "api_key_hashes": [hash_api_key(new_key)],
                "weight": 3,
                "quotas": {"requests_per_second": 50},
                "deadlines": {"realtime": 5},
            }
        ]
    }
    etcd = etcd_client(suite.etcd)
    try:
        await etcd.put(TENANTS_KEY.encode(), json.dumps(doc).encode())
        await eventually(lambda: service.tenants.get("live") is not None)
        assert service.tenants.get("live").weight == 3.0  # type: ignore[union-attr]
        await generate(stub, new_key, max_new_tokens=2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(stub, API_KEY, max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        applied = service.live_tenants.applied_revision
        await etcd.put(TENANTS_KEY.encode(), b"tenants: [{name: broken}]")
        await eventually(
            lambda: registry_value(schedulers.registries[0], "invalid") == 1.0, timeout=5
        )
        assert service.live_tenants.applied_revision == applied
        await generate(stub, new_key, max_new_tokens=2)  # last good set kept
        await etcd.delete(TENANTS_KEY.encode())
        await eventually(lambda: service.tenants.get("alpha") is not None)
        await generate(stub, API_KEY, max_new_tokens=2)
    finally:
        await etcd.delete(TENANTS_KEY.encode())
        await etcd.close()


def registry_value(registry: CollectorRegistry, result: str) -> float | None:
    return registry.get_sample_value(
        "sluice_scheduler_tenant_config_reloads_total", {"result": result}
    )


async def test_tenant_usage_is_own_unless_admin(suite: Suite, schedulers: Schedulers) -> None:
    """A tenant reads its own usage (with weight and counts); another's is PERMISSION_DENIED,
    unless the caller is an admin tenant. /metrics shows the same counts by tenant, each
    stream's time per token after its first chunk, each admission's predicted wait and each
    node's estimated sequences and tokens in flight."""
    await suite.start_node("node-a")
    service = await schedulers.start()
    await ready(service)
    await generate(schedulers.stub(service), max_new_tokens=3)
    admin = admin_pb2_grpc.AdminStub(suite.channel(service.address))
    own = await admin.GetTenantUsage(admin_pb2.GetTenantUsageRequest(), metadata=auth())
    assert own.tenant == "alpha" and own.requests == 1 and own.completion_tokens == 3
    assert own.weight == 2.0 and own.scheduler_id == service.scheduler_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.GetTenantUsage(admin_pb2.GetTenantUsageRequest(tenant="ops"), metadata=auth())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    other = await admin.GetTenantUsage(
        admin_pb2.GetTenantUsageRequest(tenant="alpha"), metadata=auth(ADMIN_KEY)
    )
    assert other.requests == 1
    value = schedulers.registries[0].get_sample_value
    tokens = {"tenant": "alpha", "kind": "generated"}
    assert value("sluice_scheduler_tenant_tokens_total", tokens) == 3
    assert value("sluice_scheduler_tenant_requests_total", {"tenant": "alpha"}) == 1
    for _ in range(3):  # each stream's chunks after its first: their time per token
        await generate(schedulers.stub(service), max_new_tokens=16)
    timed = value("sluice_scheduler_inter_token_seconds_count", {"workload_class": "realtime"})
    assert timed is not None and timed >= 1
    predicted = {"workload_class": "realtime"}
    assert value("sluice_scheduler_predicted_queue_wait_seconds_count", predicted) == 4
    assert value("sluice_scheduler_node_sequences", {"node": "node-a"}) == 0  # all ended
    assert value("sluice_scheduler_node_tokens_in_flight", {"node": "node-a"}) is not None


async def test_list_nodes_shows_load_estimate_and_latency(
    suite: Suite, schedulers: Schedulers
) -> None:
    """ListNodes carries the router's view: load score, estimated sequences, TTFT."""
    await suite.start_node("node-a")
    service = await schedulers.start()
    await ready(service)
    await generate(schedulers.stub(service), max_new_tokens=4)
    reply = await admin_pb2_grpc.AdminStub(suite.channel(service.address)).ListNodes(
        admin_pb2.ListNodesRequest(), metadata=auth(ADMIN_KEY)
    )
    (node,) = reply.nodes
    assert node.ttft_seconds > 0 and node.inter_token_seconds > 0
    assert node.service_tokens_per_second > 0 and not node.ejected
