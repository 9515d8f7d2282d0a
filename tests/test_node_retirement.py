"""A registry change alone never cuts a flowing stream: a node whose registration vanished
stops receiving new work, and the streams it is serving finish."""

from __future__ import annotations

import grpc
import pytest

from sluice.contract import NODES_PREFIX
from sluice.runtime.registry import etcd_client
from sluice.v1 import common_pb2, inference_pb2
from tests.harness import Suite, auth, eventually

TINY = "tiny-random-llama"


async def test_a_stream_outlives_its_nodes_registration(running: Suite) -> None:
    """The node's etcd key is deleted after the first chunk: the scheduler takes the node out
    of rotation at once (a new request finds no node), yet the stream runs to its last token
    and ends OK."""
    assert running.scheduler is not None
    request = inference_pb2.GenerateRequest(
        model=TINY,
        prompt="a long one",
        options=common_pb2.GenerationOptions(max_new_tokens=1000, ignore_eos=True),
    )
    stream = running.inference().Generate(request, metadata=auth())
    first = await stream.read()
    assert first.node_id == "node-a"

    etcd = etcd_client(running.etcd)
    await etcd.delete(f"{NODES_PREFIX}node-a".encode())
    await etcd.close()
    await eventually(lambda: running.scheduler.nodes.get("node-a") is None)  # type: ignore[union-attr]

    short = inference_pb2.GenerateRequest(
        model=TINY, prompt="x", options=common_pb2.GenerationOptions(max_new_tokens=2)
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in running.inference().Generate(short, metadata=auth()):
            pass
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    tokens = len(first.token_ids)
    last = first
    while (chunk := await stream.read()) is not grpc.aio.EOF:
        tokens += len(chunk.token_ids)
        last = chunk
    assert tokens == 1000
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_an_ejected_outlier_still_serves_when_it_is_the_only_node(
    running: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Latency-outlier ejection never takes the last serving node out: with every node
    ejected, requests are still served (panic mode) instead of refused NO_NODE."""
    assert running.scheduler is not None
    nodes = running.scheduler.nodes
    monkeypatch.setattr(nodes.outliers, "ejected", lambda _node: True)
    assert [n.node_id for n in nodes.candidates(TINY, 1)] == ["node-a"]  # type: ignore[arg-type]
    short = inference_pb2.GenerateRequest(
        model=TINY, prompt="x", options=common_pb2.GenerationOptions(max_new_tokens=2)
    )
    chunks = [c async for c in running.inference().Generate(short, metadata=auth())]
    assert chunks[0].node_id == "node-a"
