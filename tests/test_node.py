"""The inference node's own API: drain, load reports, refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_node.detached import DetachedGenerations
from sluice.v1 import common_pb2, inference_pb2, node_pb2, node_pb2_grpc
from tests.harness import Suite, eventually

TINY = "tiny-random-llama"


def node_request(max_new_tokens: int = 8, **kw: object) -> node_pb2.NodeGenerateRequest:
    return node_pb2.NodeGenerateRequest(
        request=inference_pb2.GenerateRequest(
            model=TINY,
            prompt="drain me",
            options=common_pb2.GenerationOptions(max_new_tokens=max_new_tokens, ignore_eos=True),
            **kw,  # type: ignore[arg-type]
        ),
        tenant="alpha",
        request_id="r1",
    )


async def test_drain_finishes_in_flight_refuses_new_and_leaves_registry(running: Suite) -> None:
    """Drain: DRAINING in etcd and health, new work refused UNAVAILABLE, the running stream
    completes, then the node's key is gone."""
    node = running.nodes[0]
    scheduler = running.scheduler
    assert scheduler is not None
    stub = node_pb2_grpc.NodeStub(running.channel(node.address))
    stream = stub.Generate(node_request(max_new_tokens=300))
    first = await stream.read()
    assert first.node_id == "node-a"

    reply = await stub.Drain(node_pb2.DrainRequest(grace_seconds=30))
    assert reply.in_flight == 1
    health = health_pb2_grpc.HealthStub(running.channel(node.address))
    await eventually(lambda: node.draining)
    status = await health.Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(node_request())]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    chunks = [first]
    while (chunk := await stream.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 300
    await asyncio.wait_for(node.drained.wait(), 10)
    await eventually(lambda: scheduler.nodes.get("node-a") is None, timeout=1.0)


async def test_draining_node_is_not_a_candidate(running: Suite) -> None:
    """While draining, the scheduler stops routing to the node (registry state or health)."""
    node = running.nodes[0]
    scheduler = running.scheduler
    assert scheduler is not None
    stub = node_pb2_grpc.NodeStub(running.channel(node.address))
    stream = stub.Generate(node_request(max_new_tokens=400))
    await stream.read()
    await stub.Drain(node_pb2.DrainRequest(grace_seconds=30))
    await eventually(lambda: not scheduler.nodes.candidates(TINY, 1), timeout=2.0)
    stream.cancel()


async def test_load_stream_reports_running_sequences(running: Suite) -> None:
    """StreamLoad publishes per-class counts; a running request shows as REALTIME running."""
    node = running.nodes[0]
    stub = node_pb2_grpc.NodeStub(running.channel(node.address))
    stream = stub.Generate(node_request(max_new_tokens=400))
    await stream.read()
    seen_running = False
    async for report in stub.StreamLoad(node_pb2.StreamLoadRequest(min_interval_ms=20)):
        assert report.node_id == "node-a"
        assert report.rss_bytes > 0
        realtime = next(c for c in report.classes if c.workload_class == 1)
        if realtime.running == 1:
            seen_running = True
            break
    assert seen_running
    stream.cancel()


async def test_unknown_model_on_node_is_invalid_argument(running: Suite) -> None:
    """A node refuses a model it has not loaded with INVALID_ARGUMENT."""
    stub = node_pb2_grpc.NodeStub(running.channel(running.nodes[0].address))
    bad = node_request()
    bad.request.model = "not-here"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(bad)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_request_beyond_kv_budget_is_resource_exhausted(suite: Suite) -> None:
    """A request that can never fit a KV slot is refused RESOURCE_EXHAUSTED, reason
    KV_BUDGET_EXCEEDED (tiny model: 512 B per token, 2 slots of 100 tokens)."""
    node = await suite.start_node("node-small", max_sequences=2, memory_budget_bytes=2 * 100 * 512)
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(node_request(max_new_tokens=200))]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 100" in (err.value.details() or "")
    fits = [c async for c in stub.Generate(node_request(max_new_tokens=50))]
    assert fits[-1].usage.completion_tokens == 50


async def test_stream_interval_merges_tokens_into_fewer_chunks(suite: Suite) -> None:
    """After the first chunk a stream sends at most one chunk per ``stream_interval_ms``, the
    tokens made meanwhile merged into it; none is lost, and the first is not held back."""
    node = await suite.start_node("node-paced", stream_interval_ms=50)
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, int]] = []
    async for chunk in stub.Generate(node_request(max_new_tokens=64)):
        arrivals.append((loop.time(), len(chunk.token_ids)))
    assert sum(n for _, n in arrivals) == 64
    assert arrivals[-1][0] - arrivals[0][0] >= 0.05 * (len(arrivals) - 2)
    assert len(arrivals) < 64


async def test_the_last_chunk_is_not_held_back_to_the_stream_interval(suite: Suite) -> None:
    """A request paced at 20 s (a job line's answer is read whole): its first chunk at once,
    the rest in one last chunk the moment it ends, not when the interval is over."""
    node = await suite.start_node("node-slow-paced")
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    request = node_request(max_new_tokens=16)
    request.stream_interval_ms = 20_000
    loop = asyncio.get_running_loop()
    started = loop.time()
    chunks = [c async for c in stub.Generate(request)]
    assert loop.time() - started < 10.0
    assert len(chunks) == 2
    assert sum(len(c.token_ids) for c in chunks) == 16
    assert chunks[-1].usage.completion_tokens == 16


async def test_load_reports_carry_the_fitted_step_cost(suite: Suite) -> None:
    """After enough decode steps of varying batches the node's load report carries its
    model's step cost, fitted on those steps, with non-negative terms, and its timed terms."""
    node = await suite.start_node("node-costed")
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    assert not node.servicer.load_report().step_costs

    async def run(n: int) -> None:
        request = node_request(max_new_tokens=n)
        request.request_id = f"costed-{n}"
        _ = [c async for c in stub.Generate(request)]

    await asyncio.gather(run(20), run(40), run(60))  # 3 rows, then 2, then 1
    report = node.servicer.load_report()
    (cost,) = report.step_costs
    assert cost.model == node_request().request.model and cost.samples >= 16
    assert dict(report.realtime_prefill_ahead_tokens) == {cost.model: 0}  # idle again
    assert not report.prefix_cache_hit_ratio  # the built-in engine keeps no prefix cache
    assert min(cost.base_s, cost.per_sequence_s, cost.per_prefill_token_s) >= 0
    assert cost.base_s + cost.per_sequence_s > 0
    assert cost.HasField("timed") and not cost.timed.model and cost.timed.samples == cost.samples
    assert min(cost.timed.base_s, cost.timed.per_sequence_s, cost.timed.per_prefill_token_s) >= 0


async def test_stream_interval_zero_still_delivers_every_token(suite: Suite) -> None:
    """Pacing off (0): the plain path, no sleep between chunks, loses no token."""
    node = await suite.start_node("node-unpaced", stream_interval_ms=0)
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    chunks = [c async for c in stub.Generate(node_request(max_new_tokens=16))]
    assert sum(len(c.token_ids) for c in chunks) == 16
    assert chunks[-1].usage.completion_tokens == 16


async def test_a_detached_generation_outlives_its_caller_and_is_handed_whole_to_the_next(
    suite: Suite,
) -> None:
    """A detached request whose caller goes away after the first chunk runs to its end; a
    later call with the same key (attach only) gets every chunk from the first, and the node
    generated it once. An unknown key, attach only: NOT_FOUND, nothing started."""
    node = await suite.start_node("node-detached")
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    request = node_request(max_new_tokens=48)
    request.request_id = "job-x.1-0"
    request.detached = True
    call = stub.Generate(request)
    first = await call.read()
    call.cancel()
    assert first.node_id == "node-detached"

    request.attach_only = True
    chunks = [c async for c in stub.Generate(request)]
    assert chunks[0] == first
    assert sum(len(c.token_ids) for c in chunks) == 48
    assert chunks[-1].usage.completion_tokens == 48
    plain = node_request(max_new_tokens=48)
    plain.request_id = "plain-1"
    again = [c async for c in stub.Generate(plain)]
    assert [t for c in again for t in c.token_ids] == [t for c in chunks for t in c.token_ids]
    assert node.servicer.detached.running() == 0

    other = node_pb2.NodeGenerateRequest()
    other.CopyFrom(request)
    other.tenant = "beta"  # another tenant naming the same key sees nothing
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(other)]
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    request.request_id = "job-x.unknown"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(request)]
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "GENERATION_NOT_FOUND" in str(err.value.trailing_metadata())


async def _chunks_then(
    chunks: list[inference_pb2.GenerateChunk], error: BaseException | None
) -> AsyncIterator[inference_pb2.GenerateChunk]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk
    if error is not None:
        raise error  # a fault injected on purpose


async def test_a_failed_or_cut_off_detached_generation_is_not_handed_on() -> None:
    """Its follower gets the failure once; the next call finds nothing (and generates the
    line again) instead of the same failure replayed; a whole one is kept for its owner."""
    kept = DetachedGenerations(retain_s=60)
    text = inference_pb2.GenerateChunk(text="a", token_ids=[1])
    failed = kept.start("k1", "t", _chunks_then([text], RuntimeError("engine step failed")))
    with pytest.raises(RuntimeError):
        _ = [c async for c in failed.follow()]
    assert kept.get("k1", "t") is None
    cut = inference_pb2.GenerateChunk(finish_reason=common_pb2.FINISH_REASON_CANCELLED)
    _ = [c async for c in kept.start("k2", "t", _chunks_then([text, cut], None)).follow()]
    assert kept.get("k2", "t") is None
    whole = inference_pb2.GenerateChunk(finish_reason=common_pb2.FINISH_REASON_LENGTH)
    _ = [c async for c in kept.start("k3", "t", _chunks_then([text, whole], None)).follow()]
    assert kept.get("k3", "t") is not None and kept.get("k3", "u") is None
    await kept.close()
