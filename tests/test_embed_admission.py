"""Embed goes through admission and slot accounting like Generate: it counts against the
tenant's in-flight cap, holds a node slot for its call (a request past the node's capacity
queues, one past the queue bound is refused with RetryInfo), and gives everything back
however it ends (served, failed, the client gone while it ran or while it queued).

Most tests use a scripted node whose Embed calls wait until the test lets them go; the
scheduler's catalog names the tiny model (the only one that node advertises) an embedding
model, so Embed requests for it are routed there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client import Counter

from scheduler.app import SchedulerService
from scheduler.config import ModelSpec
from sluice.contract import WorkloadClass
from sluice.runtime.errors import SluiceError, Unavailable
from sluice.v1 import common_pb2, inference_pb2, node_pb2_grpc
from tests.harness import OTHER_KEY, Suite, auth, eventually, fake_node
from tests.test_end_to_end import TINY, details_of, gen_request, unpack

HELD = "held"
SLOTS = 8
"""Sequences the scripted node offers (``fake_node``'s capacity)."""


class HeldEmbeds(node_pb2_grpc.NodeServicer):
    """A node whose Embed calls each wait for one :meth:`let_go`, then answer (with
    ``error`` when set); it counts the calls that arrived and those waiting."""

    def __init__(self) -> None:
        self.arrived = 0
        self.holding = 0
        self.error: SluiceError | None = None
        self._go = asyncio.Semaphore(0)

    def let_go(self, n: int = 1) -> None:
        for _ in range(n):
            self._go.release()

    async def Embed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.arrived += 1
        self.holding += 1
        try:
            await self._go.acquire()
        finally:
            self.holding -= 1
        if self.error is not None:
            context.set_trailing_metadata(self.error.trailing_metadata())
            await context.abort(self.error.code, self.error.message)
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=[1.0]) for _ in request.request.inputs],
            dimensions=1,
            usage=common_pb2.Usage(prompt_tokens=3),
        )

    async def StreamLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        while True:
            yield common_pb2.LoadReport(node_id=HELD, state=common_pb2.NODE_STATE_SERVING)
            await asyncio.sleep(0.2)


@pytest.fixture
async def held(suite: Suite) -> AsyncIterator[HeldEmbeds]:
    servicer = HeldEmbeds()
    async with fake_node(suite.etcd, servicer, HELD):
        yield servicer


async def embedding_scheduler(suite: Suite, **overrides: Any) -> SchedulerService:
    """A scheduler whose catalog makes the tiny model an embedding model, with the scripted
    node as its candidate."""
    models = [ModelSpec(name=TINY, kind="embed")]
    scheduler = await suite.start_scheduler(models=models, **overrides)
    await eventually(lambda: scheduler.nodes.candidates(TINY, WorkloadClass.REALTIME))
    return scheduler


def embed_request(**kw: Any) -> inference_pb2.EmbedRequest:
    return inference_pb2.EmbedRequest(model=TINY, inputs=["a cat"], **kw)


def held_by(scheduler: SchedulerService, tenant: str = "alpha") -> tuple[int, int, int]:
    """(requests on the node, the tenant's slots, the tenant's requests in flight)."""
    node = scheduler.nodes.get(HELD)
    assert node is not None
    slots = scheduler.gate.shares.running(TINY, WorkloadClass.REALTIME, tenant)
    return node.in_flight, slots, scheduler.usage.of(tenant).in_flight


def refusal(error: grpc.aio.AioRpcError) -> tuple[str, set[str]]:
    """The refusal's ``ErrorInfo.reason`` and the kinds of detail it carries."""
    status = details_of(error)
    info = unpack(status, error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info.reason, {d.type_url.rsplit(".", 1)[-1] for d in status.details}


def served(counter: Counter, outcome: str) -> float:
    """Embed requests counted with ``outcome`` in ``sluice_scheduler_requests_total``."""
    labels = {"kind": "embed", "workload_class": "realtime", "outcome": outcome}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_an_embed_in_flight_counts_against_the_tenant_cap(
    suite: Suite, held: HeldEmbeds
) -> None:
    """With ``tenant_max_in_flight=1``, an Embed held at the node fills the tenant's cap: its
    next Embed is refused RESOURCE_EXHAUSTED ``TENANT_CONCURRENCY`` with RetryInfo before it
    reaches a node; another tenant's Embed is served meanwhile."""
    scheduler = await embedding_scheduler(suite, tenant_max_in_flight=1)
    stub = suite.inference()
    first = stub.Embed(embed_request(), metadata=auth())
    await eventually(lambda: held.holding == 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(embed_request(), metadata=auth())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reason, kinds = refusal(err.value)
    assert reason == "TENANT_CONCURRENCY"
    assert {"RetryInfo", "QuotaFailure"} <= kinds
    assert held.arrived == 1
    other = stub.Embed(
        embed_request(workload_class=common_pb2.WORKLOAD_CLASS_BATCH), metadata=auth(OTHER_KEY)
    )
    await eventually(lambda: held.holding == 2)
    held.let_go(2)
    assert len((await first).embeddings) == 1
    assert len((await other).embeddings) == 1
    await eventually(lambda: held_by(scheduler) == (0, 0, 0))


async def test_an_embed_is_refused_while_the_tenants_generation_holds_its_cap(
    suite: Suite,
) -> None:
    """Generate and Embed share the cap: while a tenant capped at one request streams a
    generation, its Embed is refused ``TENANT_CONCURRENCY`` with RetryInfo (real node)."""
    await suite.start_node("node-a")
    scheduler = await suite.start_scheduler(tenant_max_in_flight=1)
    await eventually(lambda: scheduler.nodes.candidates(TINY, WorkloadClass.REALTIME))
    stub = suite.inference()
    long = stub.Generate(gen_request(max_new_tokens=1000), metadata=auth())
    await long.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(
            inference_pb2.EmbedRequest(model="all-minilm-l6-v2", inputs=["a cat"]),
            metadata=auth(),
        )
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reason, kinds = refusal(err.value)
    assert reason == "TENANT_CONCURRENCY"
    assert "RetryInfo" in kinds
    long.cancel()


async def test_an_embed_holds_a_node_slot_and_past_the_nodes_capacity_it_queues(
    suite: Suite, held: HeldEmbeds
) -> None:
    """With every slot of the node held by Embeds, the next waits in the queue without
    reaching the node, and the one after it is refused QUEUE_FULL with RetryInfo (a tenant
    may queue one here); when a held Embed ends, the queued one takes its slot."""
    scheduler = await embedding_scheduler(suite, max_queued_per_tenant=1)
    stub = suite.inference()
    calls = [stub.Embed(embed_request(), metadata=auth()) for _ in range(SLOTS)]
    await eventually(lambda: held.holding == SLOTS)
    assert held_by(scheduler) == (SLOTS, SLOTS, SLOTS)
    queued = stub.Embed(embed_request(), metadata=auth())
    await eventually(lambda: len(scheduler.gate.queues) == 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(embed_request(), metadata=auth())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reason, kinds = refusal(err.value)
    assert reason == "QUEUE_FULL"
    assert "RetryInfo" in kinds
    assert held.arrived == SLOTS
    held.let_go()
    await eventually(lambda: held.arrived == SLOTS + 1)
    assert len(scheduler.gate.queues) == 0
    held.let_go(SLOTS)
    for call in [*calls, queued]:
        assert len((await call).embeddings) == 1
    await eventually(lambda: held_by(scheduler) == (0, 0, 0))
    assert served(scheduler.metrics.requests, "ok") == SLOTS + 1


@pytest.mark.parametrize("ending", ["served", "failed", "cancelled"])
async def test_an_embed_gives_its_slot_back_however_it_ends(
    suite: Suite, held: HeldEmbeds, ending: str
) -> None:
    """While the node works on an Embed it holds a node slot, a slot of its tenant's share
    and a place in the tenant's in-flight count; served, failed at the node (UNAVAILABLE, no
    other node to retry on) or cancelled by the client, it gives all three back, and the
    request is counted with its outcome."""
    scheduler = await embedding_scheduler(suite)
    call = suite.inference().Embed(embed_request(), metadata=auth())
    await eventually(lambda: held.holding == 1)
    assert held_by(scheduler) == (1, 1, 1)
    if ending == "cancelled":
        call.cancel()
        await eventually(lambda: held.holding == 0)
    else:
        if ending == "failed":
            held.error = Unavailable("engine failed", reason="ENGINE_FAULT")
        held.let_go()
        try:
            reply = await call
            assert ending == "served" and len(reply.embeddings) == 1
        except grpc.aio.AioRpcError as exc:
            assert ending == "failed" and exc.code() == grpc.StatusCode.UNAVAILABLE
    await eventually(lambda: held_by(scheduler) == (0, 0, 0))
    outcome = "ok" if ending == "served" else "failed"
    await eventually(lambda: served(scheduler.metrics.requests, outcome) == 1)


async def test_an_embed_that_leaves_the_queue_takes_no_slot(suite: Suite, held: HeldEmbeds) -> None:
    """A queued Embed whose client goes away leaves the queue at once and never reaches the
    node; the slots held are only those of the Embeds running, and all come back."""
    scheduler = await embedding_scheduler(suite)
    stub = suite.inference()
    calls = [stub.Embed(embed_request(), metadata=auth()) for _ in range(SLOTS)]
    await eventually(lambda: held.holding == SLOTS)
    queued = stub.Embed(embed_request(), metadata=auth())
    await eventually(lambda: len(scheduler.gate.queues) == 1)
    queued.cancel()
    await eventually(lambda: len(scheduler.gate.queues) == 0)
    assert held_by(scheduler) == (SLOTS, SLOTS, SLOTS)
    held.let_go(SLOTS)
    for call in calls:
        await call
    await eventually(lambda: held_by(scheduler) == (0, 0, 0))
    assert held.arrived == SLOTS
    assert served(scheduler.metrics.requests, "refused") == 1  # abandoned while queued
