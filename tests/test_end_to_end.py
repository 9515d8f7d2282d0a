"""One real request end to end: client → scheduler → node (found through etcd) → back."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.runtime.errors import STATUS_DETAILS_METADATA
from sluice.v1 import admin_pb2, cache_pb2, common_pb2, inference_pb2, jobs_pb2, jobs_pb2_grpc
from tests.harness import OTHER_KEY, Suite, auth, eventually

TINY = "tiny-random-llama"


def gen_request(
    prompt: str = "hello there", max_new_tokens: int = 8, **kw: object
) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=TINY,
        prompt=prompt,
        options=common_pb2.GenerationOptions(max_new_tokens=max_new_tokens, ignore_eos=True),
        **kw,  # type: ignore[arg-type]
    )


def details_of(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_METADATA:
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin trailer")


def unpack(status: status_pb2.Status, cls: type) -> object:
    for any_msg in status.details:
        if any_msg.Is(cls.DESCRIPTOR):
            msg = cls()
            any_msg.Unpack(msg)
            return msg
    raise AssertionError(f"no {cls.__name__} in details")


async def test_generation_streams_through_scheduler_from_registered_node(running: Suite) -> None:
    """A greedy generation arrives in several chunks from the node found through etcd, and
    the last chunk carries finish reason and usage."""
    chunks = [c async for c in running.inference().Generate(gen_request(), metadata=auth())]
    assert len(chunks) >= 2
    assert chunks[0].node_id == "node-a"
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens > 0
    assert sum(len(c.token_ids) for c in chunks) == 8
    assert not any(c.cached for c in chunks)


async def test_chat_messages_use_the_chat_template(running: Suite) -> None:
    """Chat requests are templated on the node and generate like prompts do."""
    req = inference_pb2.GenerateRequest(
        model=TINY,
        messages=[common_pb2.ChatMessage(role="user", content="hi")],
        options=common_pb2.GenerationOptions(max_new_tokens=4, ignore_eos=True),
    )
    chunks = [c async for c in running.inference().Generate(req, metadata=auth())]
    assert chunks[-1].usage.completion_tokens == 4


async def test_embedding_through_scheduler(running: Suite) -> None:
    """Embed returns one unit-length 384-dimensional vector per input."""
    reply = await running.inference().Embed(
        inference_pb2.EmbedRequest(model="all-minilm-l6-v2", inputs=["a cat", "a dog"]),
        metadata=auth(),
    )
    assert reply.dimensions == 384
    assert len(reply.embeddings) == 2
    norm = sum(v * v for v in reply.embeddings[0].values) ** 0.5
    assert abs(norm - 1.0) < 1e-4
    assert reply.node_id == "node-a"


async def test_cache_hit_is_served_without_any_node(running: Suite) -> None:
    """A repeated deterministic request is answered from the cache even with no node left."""
    stub = running.inference()
    first = [c async for c in stub.Generate(gen_request("cache me"), metadata=auth())]
    cache = running.cache_stub()

    async def stored() -> bool:
        return (await cache.Stats(cache_pb2.StatsRequest())).stores >= 1

    for _ in range(200):
        if await stored():
            break
        await asyncio.sleep(0.02)
    assert await stored()
    await running.nodes[0].stop(0.5)
    again = [c async for c in stub.Generate(gen_request("cache me"), metadata=auth())]
    assert len(again) == 1 and again[0].cached
    assert again[0].text == "".join(c.text for c in first)
    assert list(again[0].token_ids) == [t for c in first for t in c.token_ids]
    assert again[0].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_sampled_request_without_seed_is_never_cached(running: Suite) -> None:
    """Non-deterministic requests skip the cache: nothing is stored for them.

    Stores happen in the background, so a greedy request sent after the sampled one is the
    marker: once its store has landed, the sampled one's would have too."""
    stub, cache = running.inference(), running.cache_stub()
    sampled = gen_request("random please")
    sampled.options.temperature = 0.8
    _ = [c async for c in stub.Generate(sampled, metadata=auth())]
    _ = [c async for c in stub.Generate(gen_request("greedy marker"), metadata=auth())]
    for _ in range(200):
        if (await cache.Stats(cache_pb2.StatsRequest())).stores >= 1:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # room for a wrongly issued second store to land
    stats = await cache.Stats(cache_pb2.StatsRequest())
    assert stats.stores == 1 and stats.hits == 0


@pytest.mark.parametrize("key", ["sk-sluice-wrong", ""])
async def test_wrong_or_missing_api_key_is_unauthenticated(running: Suite, key: str) -> None:
    """No valid key, no service: UNAUTHENTICATED with an ErrorInfo reason."""
    metadata = auth(key) if key else ()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in running.inference().Generate(gen_request(), metadata=metadata)]
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = unpack(details_of(err.value), error_details_pb2.ErrorInfo)
    assert info.reason in ("API_KEY_INVALID", "API_KEY_MISSING")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: setattr(r, "model", "no-such-model"), "model"),
        (lambda r: setattr(r, "prompt", ""), "prompt"),
        (lambda r: setattr(r, "prompt", "   "), "prompt"),
        (lambda r: setattr(r.options, "max_new_tokens", 0), "options.max_new_tokens"),
        (lambda r: setattr(r.options, "max_new_tokens", -5), "options.max_new_tokens"),
        (lambda r: setattr(r.options, "max_new_tokens", 1_000_000), "options.max_new_tokens"),
        (lambda r: setattr(r.options, "temperature", 9.0), "options.temperature"),
        (lambda r: setattr(r.options, "temperature", 1e-45), "options.temperature"),
        (lambda r: setattr(r.options, "top_p", float("nan")), "options.top_p"),
        (lambda r: setattr(r, "workload_class", 7), "workload_class"),
    ],
)
async def test_invalid_generate_is_invalid_argument_with_bad_request(
    running: Suite, mutate: object, field: str
) -> None:
    """Bad input is refused with INVALID_ARGUMENT naming the field in BadRequest details."""
    req = gen_request()
    mutate(req)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in running.inference().Generate(req, metadata=auth())]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = unpack(details_of(err.value), error_details_pb2.BadRequest)
    assert field in [v.field for v in bad.field_violations]  # type: ignore[attr-defined]


async def test_embedding_model_refused_for_generate_and_empty_inputs(running: Suite) -> None:
    """Embedding inputs are validated too."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.inference().Embed(
            inference_pb2.EmbedRequest(model="all-minilm-l6-v2", inputs=["ok", ""]),
            metadata=auth(),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = unpack(details_of(err.value), error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["inputs[1]"]  # type: ignore[attr-defined]


async def test_tenant_limited_to_batch_class_is_denied_realtime(running: Suite) -> None:
    """Tenant permissions come from the verified key: beta may not send REALTIME work."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in running.inference().Generate(gen_request(), metadata=auth(OTHER_KEY))]
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_crashed_node_leaves_scheduler_view_within_lease_ttl(running: Suite) -> None:
    """A node that dies without deregistering disappears when its 2 s lease expires."""
    scheduler = running.scheduler
    assert scheduler is not None
    await running.nodes[0].crash()
    await eventually(lambda: scheduler.nodes.get("node-a") is None, timeout=2.0 + 1.5)


async def test_stopped_node_leaves_scheduler_view_at_once(running: Suite) -> None:
    """A node that stops gracefully revokes its lease: gone well before the TTL."""
    scheduler = running.scheduler
    assert scheduler is not None
    await running.nodes[0].stop(0.5)
    await eventually(lambda: scheduler.nodes.get("node-a") is None, timeout=1.0)


async def test_new_node_is_used_without_restarting_scheduler(running: Suite) -> None:
    """A node registered after the scheduler started is discovered and served from."""
    scheduler = running.scheduler
    assert scheduler is not None
    await running.nodes[0].stop(0.5)
    await running.start_node("node-b")
    await eventually(lambda: scheduler.nodes.candidates(TINY, 1))
    chunks = [c async for c in running.inference().Generate(gen_request(), metadata=auth())]
    assert chunks[0].node_id == "node-b"


async def test_no_node_for_model_is_unavailable_with_retry_info(running: Suite) -> None:
    """Without a node the request is refused at once with UNAVAILABLE and RetryInfo."""
    await running.nodes[0].stop(0.5)
    scheduler = running.scheduler
    assert scheduler is not None
    await eventually(lambda: not scheduler.nodes.nodes())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in running.inference().Generate(gen_request(), metadata=auth())]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    retry = unpack(details_of(err.value), error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds >= 1  # type: ignore[attr-defined]


async def test_node_dying_mid_stream_ends_stream_unavailable(running: Suite) -> None:
    """A node that dies after the first token ends the client's stream with UNAVAILABLE."""
    stream = running.inference().Generate(
        gen_request("a long one", max_new_tokens=1000), metadata=auth()
    )
    first = await stream.read()
    assert first.node_id == "node-a"
    await running.nodes[0].crash()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while (await stream.read()) is not grpc.aio.EOF:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "mid-stream" in (err.value.details() or "")


async def test_every_service_answers_health_serving(running: Suite) -> None:
    """grpc.health.v1 Check answers SERVING on the scheduler, the node and the cache."""
    assert running.scheduler and running.cache
    for address in (running.scheduler.address, running.nodes[0].address, running.cache.address):
        stub = health_pb2_grpc.HealthStub(running.channel(address))
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_jobs_answer_unimplemented_for_now(running: Suite) -> None:
    """The Jobs service is in the contract but not implemented: UNIMPLEMENTED, clearly."""
    assert running.scheduler
    stub = jobs_pb2_grpc.JobsStub(running.channel(running.scheduler.address))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetJob(jobs_pb2.GetJobRequest(job_id="x"), metadata=auth())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_admin_lists_registered_nodes(running: Suite) -> None:
    """Admin.ListNodes shows the node with its models, health and a load report."""
    stub = running.admin()
    await eventually(lambda: running.scheduler and running.scheduler.nodes.get("node-a").load)  # type: ignore[union-attr]
    reply = await stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=auth())
    (node,) = reply.nodes
    assert node.info.node_id == "node-a"
    assert node.healthy
    assert node.circuit == admin_pb2.CIRCUIT_STATE_CLOSED
    assert {m.name for m in node.info.models} == {TINY, "all-minilm-l6-v2"}
    assert len(node.load.classes) == 3


async def test_client_cancel_frees_the_node_slot(running: Suite) -> None:
    """A client that goes away cancels the node's generation: the engine runs nothing after."""
    engine = running.nodes[0].engines[TINY]
    call = running.inference().Generate(
        gen_request("cancel me", max_new_tokens=1000), metadata=auth()
    )
    await call.read()
    assert sum(engine.stats().running.values()) == 1
    call.cancel()
    await eventually(lambda: sum(engine.stats().running.values()) == 0, timeout=5)
    scheduler = running.scheduler
    assert scheduler is not None
    await eventually(lambda: scheduler.nodes.get("node-a").in_flight == 0)  # type: ignore[union-attr]


async def test_only_an_admin_tenant_lists_the_nodes(running: Suite) -> None:
    """Admin.ListNodes answers PERMISSION_DENIED to a tenant that is not an admin."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.admin().ListNodes(admin_pb2.ListNodesRequest(), metadata=auth(OTHER_KEY))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_an_unauthenticated_call_is_refused_before_its_body_is_parsed(
    running: Suite,
) -> None:
    """A call without a valid key is refused UNAUTHENTICATED from its metadata alone: its
    body (here bytes that are no GenerateRequest at all) is never deserialized. With a valid
    key the same body answers INVALID_ARGUMENT (not gRPC's UNKNOWN)."""
    assert running.scheduler is not None
    channel = running.channel(running.scheduler.address)
    raw = channel.unary_stream(
        "/sluice.v1.Inference/Generate",
        request_serializer=lambda body: body,
        response_deserializer=lambda body: body,
    )
    for metadata in ((), auth("sk-wrong")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in raw(b"\xff" * 4096, metadata=metadata):
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in raw(b"\xff" * 4096, metadata=auth()):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
