"""The SDK: retries, round robin, health, discovery and typed errors.

Refusals come from small real ``grpc.aio`` servers (the shared ``GrpcServer`` with its
interceptors, so statuses and details are built exactly as the scheduler builds them) whose
servicers follow a script of faults; everything else runs against the real suite.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client import CollectorRegistry

from scheduler.app import SchedulerService
from scheduler.config import SchedulerSettings
from scheduler.tenants import Quotas, Tenant, TenantDirectory
from sluice import (
    AsyncClient,
    AuthenticationError,
    Client,
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    QuotaExceededError,
    ResourceExhaustedError,
    RetryPolicy,
    SluiceRpcError,
    UnavailableError,
    UnimplementedError,
)
from sluice.local.stores import free_port
from sluice.runtime import errors as domain
from sluice.runtime.auth import hash_api_key
from sluice.runtime.server import GrpcServer, ServerOptions
from sluice.sdk.endpoints import EndpointPool
from sluice.sdk.errors import from_rpc_error
from sluice.sdk.retry import CallAttempts
from sluice.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
)
from tests.harness import API_KEY, Suite, eventually
from tests.harness import test_tenants as tenant_directory

TINY = "tiny-random-llama"
FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)


# -- a scripted, fault-injecting server --------------------------------------------------


@dataclass
class Fault:
    """What one call gets: ``ok``, ``overloaded``, ``quota``, ``unavailable`` (the scheduler's
    refusal, with details), ``drop`` (UNAVAILABLE without details, like a lost connection),
    ``fail_after_first`` (one chunk, then UNAVAILABLE), ``slow`` (answers after 5 s)."""

    kind: str = "ok"
    retry_after_s: float | None = None


@dataclass
class FaultyInference(inference_pb2_grpc.InferenceServicer):  # type: ignore[misc]
    name: str
    plan: list[Fault] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)

    async def _next(self, ctx: grpc.aio.ServicerContext) -> Fault:
        self.arrivals.append(time.monotonic())
        self.metadata.append({k: v for k, v in ctx.invocation_metadata() if isinstance(v, str)})
        fault = self.plan.pop(0) if self.plan else Fault()
        if fault.kind == "overloaded":
            raise domain.ResourceExhausted("fleet busy", retry_after_s=fault.retry_after_s)
        if fault.kind == "quota":
            raise domain.ResourceExhausted(
                "over quota",
                retry_after_s=fault.retry_after_s,
                reason="QUOTA_EXCEEDED",
                quota_violations=[("tenant:alpha", "at most 60 requests per minute")],
            )
        if fault.kind == "unavailable":
            raise domain.Unavailable("no node can serve", retry_after_s=fault.retry_after_s)
        if fault.kind == "drop":
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        if fault.kind == "slow":
            await asyncio.sleep(5)
        return fault

    async def Generate(
        self, request: inference_pb2.GenerateRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        fault = await self._next(ctx)
        yield inference_pb2.GenerateChunk(text=f"{self.name}:0 ", node_id=self.name)
        if fault.kind == "fail_after_first":
            raise domain.Unavailable("node failed mid-stream")
        yield inference_pb2.GenerateChunk(
            text=f"{self.name}:1",
            node_id=self.name,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
        )

    async def Embed(
        self, request: inference_pb2.EmbedRequest, ctx: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        await self._next(ctx)
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=[1.0]) for _ in request.inputs],
            dimensions=1,
            node_id=self.name,
        )


@dataclass
class FaultServer:
    server: GrpcServer
    inference: FaultyInference

    @property
    def address(self) -> str:
        return self.server.address


Start = Callable[..., Awaitable[FaultServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[Start]:
    """Starts scripted servers on free ports; stops them after the test."""
    servers: list[FaultServer] = []

    async def start(name: str = "a", plan: list[Fault] | None = None) -> FaultServer:
        server = GrpcServer("faulty", ServerOptions(grace_s=0.1), CollectorRegistry())
        inference = FaultyInference(name, list(plan or []))
        server.add(inference_pb2_grpc.add_InferenceServicer_to_server, inference, "x.Inference")
        await server.start()
        servers.append(FaultServer(server, inference))
        return servers[-1]

    yield start
    for s in servers:
        await s.server.stop(0.1)


async def texts(client: AsyncClient, **kwargs: object) -> list[str]:
    return [c.text async for c in client.generate(TINY, "hi", **kwargs)]  # type: ignore[arg-type]


# -- pure parts ---------------------------------------------------------------------------


def test_server_retry_delay_is_never_shortened_by_jitter() -> None:
    """A RetryInfo delay d is waited for d × U(1, 1 + jitter): never less than the server said."""
    policy, rng = RetryPolicy(jitter=0.2), random.Random(7)
    delays = [policy.server_delay_s(0.5, rng) for _ in range(500)]
    assert min(delays) >= 0.5
    assert max(delays) <= 0.6
    assert max(delays) - min(delays) > 0.05  # it does spread


def test_backoff_grows_exponentially_and_is_capped() -> None:
    """Without RetryInfo the delay doubles per retry up to max_backoff_s (± jitter)."""
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, jitter=0.0)
    rng = random.Random(1)
    assert [policy.backoff_s(n, rng) for n in range(1, 6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.5, 0.5]
    )


def test_pool_round_robin_skips_unhealthy_and_recently_failed_endpoints() -> None:
    """Rotation skips NOT_SERVING endpoints and failed ones until their cooldown ends; with
    nothing usable it still returns an endpoint."""
    now = [0.0]
    pool = EndpointPool(["a", "b", "c"], failure_cooldown_s=5, clock=lambda: now[0])
    assert [pool.pick() for _ in range(4)] == ["a", "b", "c", "a"]
    pool.set_serving("b", False)
    pool.mark_failed("c")
    assert [pool.pick() for _ in range(3)] == ["a", "a", "a"]
    now[0] = 5.0  # c's cooldown is over
    assert {pool.pick() for _ in range(4)} == {"a", "c"}
    pool.set_serving("a", False)
    pool.set_serving("c", False)
    assert pool.pick() in {"a", "b", "c"}  # fails open
    assert pool.pick(avoid={"a", "b"}) == "c"


def test_call_attempts_give_up_when_the_delay_would_pass_the_time_budget() -> None:
    """A retry that would start after total_timeout_s (or past the deadline) is not made."""
    now = [0.0]
    pool = EndpointPool(["a"], clock=lambda: now[0])
    error = OverloadedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", [_retry_info(2.0)])
    policy = RetryPolicy(total_timeout_s=1.0, jitter=0.0)
    attempts = CallAttempts(policy, pool, 60.0, clock=lambda: now[0])
    attempts.next_endpoint()
    assert attempts.failed("a", error, received=False) is None
    roomy = CallAttempts(RetryPolicy(jitter=0.0), pool, 60.0, clock=lambda: now[0])
    roomy.next_endpoint()
    assert roomy.failed("a", error, received=False) == pytest.approx(2.0)
    short_deadline = CallAttempts(RetryPolicy(jitter=0.0), pool, 1.5, clock=lambda: now[0])
    short_deadline.next_endpoint()
    assert short_deadline.failed("a", error, received=False) is None


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(int(seconds * 1e9))
    return info


@dataclass
class _FakeCall:
    status: grpc.StatusCode
    message: str
    trailers: tuple[tuple[str, str | bytes], ...]

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.message

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.trailers


def test_resource_exhausted_maps_to_quota_exceeded_or_overloaded() -> None:
    """RESOURCE_EXHAUSTED with a QuotaFailure is QuotaExceededError, otherwise OverloadedError;
    both are ResourceExhaustedError and carry reason, retry delay and violations."""
    quota = domain.ResourceExhausted(
        "over quota", retry_after_s=1.5, reason="QUOTA", quota_violations=[("tenant:a", "60/min")]
    )
    busy = domain.ResourceExhausted("busy", retry_after_s=0.25)
    q = from_rpc_error(_FakeCall(quota.code, quota.message, quota.trailing_metadata()))
    b = from_rpc_error(_FakeCall(busy.code, busy.message, busy.trailing_metadata()))
    assert isinstance(q, QuotaExceededError)
    assert isinstance(q, ResourceExhaustedError)
    assert not isinstance(q, OverloadedError)
    assert (q.reason, q.retry_after_s, q.violations) == ("QUOTA", 1.5, [("tenant:a", "60/min")])
    assert isinstance(b, OverloadedError)
    assert isinstance(b, ResourceExhaustedError)
    assert (b.reason, b.retry_after_s, b.violations) == ("OVERLOADED", 0.25, [])


# -- retries against a scripted server ------------------------------------------------------


async def test_refusals_are_retried_after_the_servers_retry_delay(start_server: Start) -> None:
    """Two RESOURCE_EXHAUSTED + RetryInfo(0.3 s) refusals, then success: the client waits at
    least the server's delay before each retry and returns the stream of the third attempt."""
    s = await start_server(plan=[Fault("overloaded", 0.3), Fault("overloaded", 0.3)])
    async with AsyncClient(s.address) as client:
        started = time.monotonic()
        out = await texts(client)
        elapsed = time.monotonic() - started
    assert out == ["a:0 ", "a:1"]
    arrivals = s.inference.arrivals
    assert len(arrivals) == 3
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(arrivals))
    assert elapsed >= 0.6
    ids = {m["x-request-id"] for m in s.inference.metadata}
    assert len(ids) == 1  # one request id across the attempts of one call


async def test_retries_stop_at_the_attempt_bound_with_a_typed_error(start_server: Start) -> None:
    """A server that always refuses sees max_attempts calls; the error is OverloadedError with the
    status details and the attempt count."""
    s = await start_server(plan=[Fault("overloaded", 0.05)] * 10)
    async with AsyncClient(s.address, retry=RetryPolicy(max_attempts=3)) as client:
        with pytest.raises(OverloadedError) as caught:
            await client.embed("m", ["x"])
    assert len(s.inference.arrivals) == 3
    err = caught.value
    assert err.attempts == 3
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "OVERLOADED"
    assert err.retry_after_s == pytest.approx(0.05)
    assert err.message == "fleet busy"


async def test_quota_refusal_raises_quota_exceeded_with_violations(start_server: Start) -> None:
    """A quota refusal that stays refused is QuotaExceededError naming the violated quota."""
    s = await start_server(plan=[Fault("quota", 0.01)] * 10)
    async with AsyncClient(s.address, retry=RetryPolicy(max_attempts=2)) as client:
        with pytest.raises(QuotaExceededError) as caught:
            await texts(client)
    assert caught.value.violations == [("tenant:alpha", "at most 60 requests per minute")]
    assert caught.value.reason == "QUOTA_EXCEEDED"
    assert len(s.inference.arrivals) == 2


async def test_retry_none_raises_the_first_refusal_at_once(start_server: Start) -> None:
    """With retry=None a refusal is raised immediately, after one call."""
    s = await start_server(plan=[Fault("overloaded", 5.0)])
    async with AsyncClient(s.address, retry=None) as client:
        started = time.monotonic()
        with pytest.raises(OverloadedError) as caught:
            await texts(client)
    assert time.monotonic() - started < 1.0
    assert len(s.inference.arrivals) == 1
    assert caught.value.retry_after_s == pytest.approx(5.0)
    assert caught.value.attempts == 1


async def test_a_delay_beyond_the_time_budget_is_not_waited_for(start_server: Start) -> None:
    """A RetryInfo delay past total_timeout_s raises at once instead of sleeping in vain."""
    s = await start_server(plan=[Fault("overloaded", 30.0)])
    policy = RetryPolicy(total_timeout_s=2.0)
    async with AsyncClient(s.address, retry=policy) as client:
        started = time.monotonic()
        with pytest.raises(OverloadedError):
            await client.embed("m", ["x"])
    assert time.monotonic() - started < 1.0
    assert len(s.inference.arrivals) == 1


async def test_refusal_without_retry_info_is_retried_with_backoff(start_server: Start) -> None:
    """No RetryInfo: exponential backoff, starting at initial_backoff_s (minus jitter)."""
    s = await start_server(plan=[Fault("overloaded"), Fault("overloaded")])
    policy = RetryPolicy(initial_backoff_s=0.1, jitter=0.0)
    async with AsyncClient(s.address, retry=policy) as client:
        await client.embed("m", ["x"])
    a = s.inference.arrivals
    assert len(a) == 3
    assert a[1] - a[0] >= 0.1
    assert a[2] - a[1] >= 0.2


async def test_unavailable_before_the_first_chunk_is_retried(start_server: Start) -> None:
    """The scheduler's UNAVAILABLE (no node) before any chunk is retried after its delay."""
    s = await start_server(plan=[Fault("unavailable", 0.05)])
    async with AsyncClient(s.address) as client:
        assert await texts(client) == ["a:0 ", "a:1"]
    assert len(s.inference.arrivals) == 2


async def test_unavailable_after_the_first_chunk_is_not_retried(start_server: Start) -> None:
    """A failure after a chunk was delivered raises UnavailableError: the caller keeps what it got
    and the server sees exactly one call."""
    s = await start_server(plan=[Fault("fail_after_first")])
    got: list[str] = []
    async with AsyncClient(s.address) as client:
        with pytest.raises(UnavailableError) as caught:
            async for chunk in client.generate(TINY, "hi"):
                got.append(chunk.text)
    assert got == ["a:0 "]
    assert caught.value.message == "node failed mid-stream"
    assert len(s.inference.arrivals) == 1


async def test_a_lost_connection_is_retried_at_once_on_the_other_endpoint(
    start_server: Start,
) -> None:
    """UNAVAILABLE without details (the scheduler was not reached) moves the call to the other
    endpoint without waiting, and keeps the failed endpoint out of rotation for a while."""
    a = await start_server("a", plan=[Fault("drop")])
    b = await start_server("b")
    policy = RetryPolicy(initial_backoff_s=5.0)  # a backoff would show in the elapsed time
    async with AsyncClient([a.address, b.address], retry=policy) as client:
        started = time.monotonic()
        assert await texts(client) == ["b:0 ", "b:1"]
        assert time.monotonic() - started < 1.0
        for _ in range(3):
            assert (await client.embed("m", ["x"])).node_id == "b"
    assert len(a.inference.arrivals) == 1


async def test_an_unreachable_endpoint_is_skipped(start_server: Start) -> None:
    """An endpoint nobody listens on fails its health check and gets no calls."""
    live = await start_server("live")
    dead = f"127.0.0.1:{free_port('127.0.0.1')}"
    async with AsyncClient([dead, live.address]) as client:
        assert await client.check_health() == {dead: False, live.address: True}
        for _ in range(4):
            assert (await client.embed("m", ["x"])).node_id == "live"


async def test_deadline_is_a_typed_error_and_not_retried(start_server: Start) -> None:
    """A call that outlives the client's default deadline raises DeadlineExceededError after one
    attempt."""
    s = await start_server(plan=[Fault("slow")])
    async with AsyncClient(s.address, timeout_s=0.3) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await client.embed("m", ["x"])
    assert time.monotonic() - started < 2.0
    assert len(s.inference.arrivals) == 1


# -- round robin and health -----------------------------------------------------------------


async def test_calls_rotate_round_robin_over_two_endpoints(start_server: Start) -> None:
    """Consecutive calls alternate between the endpoints."""
    a, b = await start_server("a"), await start_server("b")
    async with AsyncClient([a.address, b.address]) as client:
        nodes = [(await client.embed("m", ["x"])).node_id for _ in range(4)]
        streams = [(await texts(client))[0] for _ in range(2)]
    assert nodes == ["a", "b", "a", "b"]
    assert streams == ["a:0 ", "b:0 "]


async def test_an_endpoint_not_serving_is_skipped_until_it_serves_again(
    start_server: Start,
) -> None:
    """A NOT_SERVING health status takes an endpoint out of rotation; SERVING puts it back."""
    a, b = await start_server("a"), await start_server("b")
    await b.server.set_serving(False)
    async with AsyncClient([a.address, b.address], health_check_interval_s=0.05) as client:
        assert [(await client.embed("m", ["x"])).node_id for _ in range(3)] == ["a"] * 3
        await b.server.set_serving(True)
        await eventually(lambda: all(s.serving for s in client.endpoint_states()))
        assert {(await client.embed("m", ["x"])).node_id for _ in range(4)} == {"a", "b"}
    assert len(b.inference.arrivals) == 2


# -- against the real suite ------------------------------------------------------------------


async def test_schedulers_are_discovered_through_etcd(running: Suite) -> None:
    """With only etcd endpoints, the client finds the suite's scheduler and generates, embeds,
    lists nodes and reads its tenant's usage through it."""
    assert running.scheduler is not None
    async with AsyncClient(etcd_endpoints=running.etcd, api_key=API_KEY) as client:
        assert client.endpoints == [running.scheduler.address]
        chunks = [c async for c in client.generate(TINY, "hello", max_new_tokens=4)]
        assert chunks[-1].usage.completion_tokens == 4
        reply = await client.embed("all-minilm-l6-v2", ["a cat"])
        assert reply.dimensions == 384
        assert [n.info.node_id for n in await client.list_nodes()] == ["node-a"]
        usage = await client.get_tenant_usage()
        assert usage.tenant == "alpha"
        assert usage.completion_tokens >= 4
        with pytest.raises(UnimplementedError):
            await client.get_job("nope")


async def test_discovered_endpoints_follow_schedulers_joining_and_leaving(running: Suite) -> None:
    """The health task re-reads etcd: a second scheduler joins the rotation, and leaves it when
    it stops; calls keep working throughout."""
    assert running.scheduler is not None
    first = running.scheduler.address
    settings = SchedulerSettings(etcd_endpoint=running.etcd, registry_ttl_seconds=2)
    second = SchedulerService(settings, CollectorRegistry(), tenants=tenant_directory())
    async with AsyncClient(
        etcd_endpoints=running.etcd, api_key=API_KEY, health_check_interval_s=0.05
    ) as client:
        assert client.endpoints == [first]
        await second.start()
        try:
            await eventually(lambda: sorted(client.endpoints) == sorted([first, second.address]))
            await eventually(lambda: all(s.serving for s in client.endpoint_states()))
            assert len(await client.list_nodes()) == 1
            assert len(await client.list_nodes()) == 1
        finally:
            await second.stop(0.1)
        await eventually(lambda: client.endpoints == [first])
        assert [n.info.node_id for n in await client.list_nodes()] == ["node-a"]


async def test_endpoints_and_key_come_from_the_environment(
    running: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLUICE_ENDPOINTS and SLUICE_API_KEY configure a client built without arguments; a
    wrong key is an AuthenticationError and a bad request an InvalidRequestError with violations."""
    assert running.scheduler is not None
    monkeypatch.setenv("SLUICE_ENDPOINTS", f" {running.scheduler.address} ,")
    monkeypatch.setenv("SLUICE_API_KEY", API_KEY)
    async with AsyncClient() as client:
        assert client.endpoints == [running.scheduler.address]
        with pytest.raises(InvalidRequestError) as caught:
            await texts(client, max_new_tokens=0)
        assert any(f == "options.max_new_tokens" for f, _ in caught.value.violations)
    async with AsyncClient(api_key="sk-wrong") as client:
        with pytest.raises(AuthenticationError) as denied:
            await client.list_nodes()
    assert denied.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_discovery_without_a_scheduler_is_unavailable(etcd: str) -> None:
    """An etcd with no scheduler registered gives a clear UnavailableError, not an empty client."""
    client = AsyncClient(etcd_endpoints=etcd)
    with pytest.raises(UnavailableError, match="no scheduler registered"):
        await client.connect()
    await client.close()


def test_no_endpoints_at_all_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without endpoints, SLUICE_ENDPOINTS or etcd, construction fails and says what to set."""
    for env in ("SLUICE_ENDPOINTS", "SLUICE_ETCD_ENDPOINTS", "SLUICE_ETCD_ENDPOINT"):
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(ValueError, match="SLUICE_ENDPOINTS"):
        Client()


async def test_sync_client_generates_and_embeds_against_the_suite(running: Suite) -> None:
    """The blocking Client streams a generation as an iterator, embeds, and reports typed
    errors, against the real scheduler."""
    assert running.scheduler is not None
    address = running.scheduler.address

    def use() -> tuple[list[inference_pb2.GenerateChunk], int, str, SluiceRpcError]:
        with Client(address, api_key=API_KEY) as client:
            chunks = list(client.generate(TINY, "hello", max_new_tokens=5, ignore_eos=True))
            dims = client.embed("all-minilm-l6-v2", ["a cat", "a dog"]).dimensions
            nodes = client.list_nodes()
            try:
                client.generate_text("no-such-model", "x")
            except SluiceRpcError as exc:
                error = exc
            return chunks, dims, nodes[0].info.node_id, error

    chunks, dims, node, error = await asyncio.to_thread(use)
    assert sum(len(c.token_ids) for c in chunks) == 5
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert dims == 384
    assert node == "node-a"
    assert isinstance(error, InvalidRequestError)


async def test_sync_client_retries_refusals_and_stops_early_streams(
    start_server: Start,
) -> None:
    """The blocking Client honours RetryInfo like the async one, and a stream closed early
    ends the call."""
    s = await start_server(plan=[Fault("overloaded", 0.2)])

    def use() -> tuple[float, str, int]:
        with Client(s.address, retry=FAST) as client:
            started = time.monotonic()
            text = client.generate_text(TINY, "hi")
            elapsed = time.monotonic() - started
            stream = client.generate(TINY, "hi")
            next(stream)
            stream.close()
            return elapsed, text, len(s.inference.arrivals)

    elapsed, text, calls = await asyncio.to_thread(use)
    assert text == "a:0 a:1"
    assert elapsed >= 0.2
    assert calls == 3


# -- retries against a real scheduler's quota refusals ----------------------------------------

METERED_KEY = "sk-sluice-test-key-metered"


@pytest.fixture
async def quota_scheduler(suite: Suite) -> SchedulerService:
    """A real scheduler on the Redis fixture, with one tiny-model node, whose only tenant
    ``metered`` may send one request per second (burst 1). The suite stops it."""
    await suite.start_node("node-a")
    metered = Tenant(
        "metered",
        1.0,
        frozenset({common_pb2.WORKLOAD_CLASS_REALTIME}),
        frozenset({"*"}),
        (hash_api_key(METERED_KEY),),
        quotas=Quotas(requests_per_second=1, burst=1),
    )
    settings = SchedulerSettings(
        etcd_endpoint=suite.etcd, redis_url=suite.redis_url, registry_ttl_seconds=2
    )
    service = SchedulerService(settings, CollectorRegistry(), tenants=TenantDirectory([metered]))
    suite.scheduler = service
    await service.start()
    await eventually(lambda: service.nodes.candidates(TINY, common_pb2.WORKLOAD_CLASS_REALTIME))
    return service


async def completion_tokens(client: AsyncClient) -> int:
    chunks = [c async for c in client.generate(TINY, "hi", max_new_tokens=2, ignore_eos=True)]
    return chunks[-1].usage.completion_tokens


async def test_retries_wait_out_a_real_quota_refusal_and_stop_at_the_attempt_bound(
    quota_scheduler: SchedulerService,
) -> None:
    """1 request/s, burst 1, the bucket just emptied: two concurrent calls are both refused
    with RetryInfo (the ~1 s refill). Each client waits at least that long, so exactly one
    retry finds the refilled request and succeeds; the other is refused again and stops at
    max_attempts=2 with QuotaExceededError. A client that retried sooner would be refused on both
    retries; the scheduler counts exactly three refusals."""
    policy = RetryPolicy(max_attempts=2)
    async with AsyncClient(quota_scheduler.address, api_key=METERED_KEY, retry=policy) as client:
        assert await completion_tokens(client) == 2  # takes the bucket's one request
        started = time.monotonic()
        outcomes = await asyncio.gather(
            completion_tokens(client), completion_tokens(client), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        usage = await client.get_tenant_usage()
    assert sorted(type(o).__name__ for o in outcomes) == ["QuotaExceededError", "int"]
    assert 2 in outcomes
    (error,) = [o for o in outcomes if isinstance(o, QuotaExceededError)]
    assert error.attempts == 2
    assert error.violations == [("tenant:metered/requests_per_second", "limit 1.0/s")]
    assert error.retry_after_s is not None and error.retry_after_s > 0.5
    assert elapsed >= 0.5  # the winner waited for the refill, not the 0.2 s backoff
    assert usage.refused_by_reason["QUOTA_EXCEEDED"] == 3


async def test_retry_none_raises_a_real_quota_refusal_at_once(
    quota_scheduler: SchedulerService,
) -> None:
    """With retry=None the refused call raises QuotaExceededError immediately, after one attempt,
    carrying the scheduler's QuotaFailure and the bucket's retry delay (at most the 1 s
    refill); the scheduler saw one refusal."""
    async with AsyncClient(quota_scheduler.address, api_key=METERED_KEY, retry=None) as client:
        await completion_tokens(client)
        started = time.monotonic()
        with pytest.raises(QuotaExceededError) as caught:
            await completion_tokens(client)
        elapsed = time.monotonic() - started
        usage = await client.get_tenant_usage()
    error = caught.value
    assert elapsed < 0.5
    assert error.attempts == 1
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "QUOTA_EXCEEDED"
    failure = error.detail(error_details_pb2.QuotaFailure)
    assert failure is not None
    assert [v.subject for v in failure.violations] == ["tenant:metered/requests_per_second"]
    assert error.retry_after_s is not None and 0 < error.retry_after_s <= 1.0
    assert usage.refused_by_reason["QUOTA_EXCEEDED"] == 1
