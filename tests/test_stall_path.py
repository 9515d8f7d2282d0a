"""Gray failure: a node that stops making progress ends its streams within seconds (stall
detector), not at the client's deadline; requests with no token yet go to another node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from sluice.v1 import common_pb2, inference_pb2, node_pb2_grpc
from tests.harness import Suite, auth, eventually, fake_node

TINY = "tiny-random-llama"


class FrozenNode(node_pb2_grpc.NodeServicer):
    """A registered, SERVING node that sends ``chunks`` chunks and then nothing more, and
    whose load reports stop once ``frozen`` is set: a SIGSTOPped or partitioned node as the
    scheduler sees it."""

    def __init__(self) -> None:
        self.chunks = 0
        self.frozen = asyncio.Event()
        self.calls = 0

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.calls += 1
        for i in range(self.chunks):
            yield inference_pb2.GenerateChunk(text="x", token_ids=[i])
        await asyncio.Event().wait()  # never another byte

    async def StreamLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        while not self.frozen.is_set():
            yield common_pb2.LoadReport(node_id="frozen", state=common_pb2.NODE_STATE_SERVING)
            await asyncio.sleep(0.2)
        await asyncio.Event().wait()


@pytest.fixture
async def frozen(suite: Suite) -> AsyncIterator[FrozenNode]:
    servicer = FrozenNode()
    async with fake_node(suite.etcd, servicer, "frozen"):
        yield servicer


def request(prompt: str = "hi", max_new_tokens: int = 8) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=TINY,
        prompt=prompt,
        options=common_pb2.GenerationOptions(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


async def test_a_stream_on_a_frozen_node_ends_unavailable_within_five_seconds(
    suite: Suite, frozen: FrozenNode
) -> None:
    """Two chunks, then the node goes silent (no chunk, no load report): the client's stream
    ends UNAVAILABLE ``NODE_STALLED`` within 5 s although its deadline is 60 s away."""
    await suite.start_cache()
    scheduler = await suite.start_scheduler()
    await eventually(lambda: scheduler.nodes.candidates(TINY, 1))
    await eventually(lambda: scheduler.nodes.get("frozen").load is not None)  # type: ignore[union-attr]
    frozen.chunks = 2
    frozen.frozen.set()
    started = time.monotonic()
    chunks = 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in suite.inference().Generate(request(), metadata=auth(), timeout=60):
            chunks += 1
    assert chunks == 2
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stopped making progress" in (err.value.details() or "")
    assert time.monotonic() - started < 5.0


async def test_requests_without_a_token_move_from_a_frozen_node_to_a_live_one(
    suite: Suite, frozen: FrozenNode
) -> None:
    """Requests placed on a frozen node before their first token are retried on the live
    node once the stall is seen, and all complete within 5 s."""
    await suite.start_node("live")
    await suite.start_cache()
    scheduler = await suite.start_scheduler()
    await eventually(lambda: len(scheduler.nodes.candidates(TINY, 1)) == 2)
    await eventually(lambda: all(n.load is not None for n in scheduler.nodes.nodes()))
    frozen.frozen.set()
    stub = suite.inference()

    async def one(i: int) -> list[str]:
        return [c.node_id async for c in stub.Generate(request(f"p{i}"), metadata=auth())]

    started = time.monotonic()
    for _ in range(5):  # power of two choices: a few rounds reach the frozen node
        answers = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), 10)
        assert all(a and a[0] == "live" for a in answers)
        if frozen.calls:
            break
    assert frozen.calls >= 1
    assert time.monotonic() - started < 5.0 * 5
