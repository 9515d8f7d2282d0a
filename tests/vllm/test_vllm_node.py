"""Smoke test of ``inference_node --engine vllm`` (``make test-vllm``, in ``.venv-vllm``).

One real node process serves SmolLM2 through vLLM (float32, pinned so that greedy output is
compared exactly with the built-in engine's in float32), at most 4 sequences at once so that a
few requests make it queue, prefix caching on (the default, with which it pauses lower-class
prefills). The tests share it and run in order; the last one drains it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from inference_node.engine import EngineRequest, SamplingParams, build_engine
from inference_node.models import SMOLLM2, load_language_model
from sluice.contract import NODES_PREFIX
from sluice.local.stores import StoreProcess, free_port
from sluice.local.up import wait_serving
from sluice.runtime.registry import etcd_client
from sluice.v1 import common_pb2, inference_pb2, node_pb2, node_pb2_grpc
from tests.harness import eventually

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.timeout(900),
]

MAX_SEQUENCES = 4
CACHE_DIR = Path.home() / ".cache" / "sluice" / "models"
QUESTION = "What is the capital of France?"


class Node:
    def __init__(self, address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.address = address
        self.proc = proc
        self.log = log


@pytest.fixture(scope="module")
def node(etcd_server: StoreProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node process on the vLLM engine (start-up ~90 s on 2 cores: model load, compile)."""
    base = tmp_path_factory.mktemp("vllm-node")
    log_path = base / "node.log"
    port = free_port("127.0.0.1")
    argv = [
        sys.executable, "-m", "inference_node", "--engine", "vllm",
        "--models", SMOLLM2, "--dtype", "float32", "--pools", "realtime",
        "--max-sequences", str(MAX_SEQUENCES), "--stream-interval-ms", "0",
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--etcd-endpoint", etcd_server.address, "--node-id", "vllm-smoke",
        "--model-cache-dir", str(CACHE_DIR),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLUICE_LOG_FORMAT": "json"}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_serving(f"127.0.0.1:{port}", proc, log_path, 600, "vllm node")
        yield Node(f"127.0.0.1:{port}", proc, log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
async def stub(node: Node) -> AsyncIterator[node_pb2_grpc.NodeStub]:
    async with grpc.aio.insecure_channel(node.address) as channel:
        yield node_pb2_grpc.NodeStub(channel)


def _request(
    key: str,
    max_new_tokens: int,
    workload_class: int = common_pb2.WORKLOAD_CLASS_REALTIME,
    *,
    ignore_eos: bool = True,
) -> node_pb2.NodeGenerateRequest:
    return node_pb2.NodeGenerateRequest(
        request=inference_pb2.GenerateRequest(
            model=SMOLLM2,
            messages=[common_pb2.ChatMessage(role="user", content=QUESTION)],
            options=common_pb2.GenerationOptions(
                max_new_tokens=max_new_tokens, ignore_eos=ignore_eos
            ),
            workload_class=workload_class,  # type: ignore[arg-type]
        ),
        tenant="smoke",
        request_id=key,
    )


async def _load(stub: node_pb2_grpc.NodeStub) -> common_pb2.LoadReport:
    call = stub.StreamLoad(node_pb2.StreamLoadRequest())
    report = await anext(aiter(call))
    call.cancel()
    return report  # type: ignore[no-any-return]


def _counts(report: common_pb2.LoadReport) -> dict[int, tuple[int, int]]:
    return {c.workload_class: (c.running, c.waiting) for c in report.classes}


async def _builtin_greedy(max_new_tokens: int, content: str = QUESTION) -> tuple[int, ...]:
    """The built-in engine's greedy token ids for the same chat prompt, in float32."""
    lm = load_language_model(SMOLLM2, cache_dir=CACHE_DIR)
    prompt = tuple(lm.tokenizer.apply_chat_template([("user", content)]))
    engine = build_engine(lm, max_sequences=1)
    engine.start()
    try:
        stream = engine.submit(
            EngineRequest("ref", prompt, SamplingParams(max_new_tokens=max_new_tokens))
        )
        return tuple([t async for delta in stream for t in delta.token_ids])
    finally:
        engine.close()


async def test_streams_chunks_with_usage_and_the_builtin_engines_greedy_tokens(
    stub: node_pb2_grpc.NodeStub,
) -> None:
    """A greedy request streams chunks ending with a finish reason and usage, and its tokens
    equal the built-in engine's greedy tokens (both float32: exact, no tolerance)."""
    started = time.monotonic()
    chunks = [c async for c in stub.Generate(_request("greedy", 16, ignore_eos=False))]
    seconds = time.monotonic() - started
    last = chunks[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS)
    assert last.usage.prompt_tokens > 0
    tokens = tuple(t for c in chunks for t in c.token_ids)
    assert last.usage.completion_tokens == len(tokens) > 0
    assert "".join(c.text for c in chunks).strip()
    assert chunks[0].node_id == "vllm-smoke"
    print(f"vllm greedy: {len(tokens)} tokens in {seconds:.2f} s")  # noqa: T201
    assert tokens == await _builtin_greedy(16)


async def test_the_node_publishes_that_vllm_paces_its_prompts(
    node: Node, etcd_server: StoreProcess
) -> None:
    """Its registry entry says the engine paces its own lower-class prompts (the pace cap, on
    by default): a scheduler's measured-time brake on prompts then waits for the target."""
    etcd = etcd_client(etcd_server.address)
    try:
        entry = await etcd.get((NODES_PREFIX + "vllm-smoke").encode())
    finally:
        await etcd.close()
    info = common_pb2.NodeInfo.FromString(entry.value)
    assert [(m.name, m.paces_prompts) for m in info.models] == [(SMOLLM2, True)]


async def test_a_cancelled_stream_frees_its_request(stub: node_pb2_grpc.NodeStub) -> None:
    """Cancelling a long stream after its first chunk aborts it in vLLM: the node's load
    report shows nothing running soon after."""
    call = stub.Generate(_request("cancel-me", 1000))
    await anext(aiter(call))
    call.cancel()

    async def idle() -> bool:
        counts = _counts(await _load(stub))
        return all(running == waiting == 0 for running, waiting in counts.values())

    deadline = time.monotonic() + 10
    while not await idle():
        assert time.monotonic() < deadline, "the cancelled request still runs"
        await asyncio.sleep(0.1)


async def test_load_reports_and_realtime_takes_a_batch_seat(
    stub: node_pb2_grpc.NodeStub, node: Node
) -> None:
    """With every slot taken by BATCH streams and two more BATCH waiting, load reports show
    running and waiting by class, KV in use and a decode rate. A REALTIME request sent last
    gets its first token before any of those streams ends: the node preempts the latest
    running BATCH stream for it (the last to arrive; vLLM itself preempts only for KV cache),
    which then ends with every token it was asked for, the same greedy tokens as its longest
    neighbour's."""
    batch = common_pb2.WORKLOAD_CLASS_BATCH
    first_at: dict[str, float] = {}
    end_at: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}

    async def consume(key: str, request: node_pb2.NodeGenerateRequest) -> None:
        async for chunk in stub.Generate(request):
            if chunk.token_ids and key not in first_at:
                first_at[key] = time.monotonic()
            tokens.setdefault(key, []).extend(chunk.token_ids)
            if chunk.finish_reason:
                end_at[key] = time.monotonic()

    # Slots free one at a time (lengths differ), so the first free one decides the order.
    running = [
        asyncio.ensure_future(consume(f"run{i}", _request(f"run{i}", 100 + 25 * i, batch)))
        for i in range(MAX_SEQUENCES)
    ]
    await eventually(lambda: len(first_at) == MAX_SEQUENCES, timeout=60)
    queued = [
        asyncio.ensure_future(consume(f"wait{i}", _request(f"wait{i}", 8, batch))) for i in range(2)
    ]
    report = await _load(stub)
    deadline = time.monotonic() + 10
    while _counts(report)[batch] != (MAX_SEQUENCES, 2):
        assert time.monotonic() < deadline, f"counts {_counts(report)}"
        await asyncio.sleep(0.1)
        report = await _load(stub)
    assert report.kv_budget_bytes > 0
    assert 0 < report.kv_used_bytes <= report.kv_budget_bytes
    assert report.decode_tokens_per_s > 0
    realtime = asyncio.ensure_future(consume("rt", _request("rt", 8)))
    await asyncio.gather(*running, *queued, realtime)
    ran = [f"run{i}" for i in range(MAX_SEQUENCES)]
    assert first_at["rt"] < min(end_at[k] for k in ran), (first_at, end_at)
    assert first_at["rt"] < min(first_at["wait0"], first_at["wait1"]), first_at
    lines = [json.loads(x) for x in node.log.read_text().splitlines() if "sequence_preempted" in x]
    assert [(x["by"], x["request_id"] in ran) for x in lines] == [("rt", True)], lines
    victim = lines[0]["request_id"]
    assert len(tokens[victim]) == 100 + 25 * int(victim.removeprefix("run"))
    reference = max((k for k in ran if k != victim), key=lambda k: len(tokens[k]))
    common = min(len(tokens[victim]), len(tokens[reference]))
    assert tokens[victim][:common] == tokens[reference][:common]


async def test_a_realtime_prompt_goes_before_a_batch_prefill_under_way(
    stub: node_pb2_grpc.NodeStub, node: Node
) -> None:
    """A REALTIME prompt sent while vLLM prefills a long BATCH prompt (about 1,500 tokens, three
    steps) sends that prompt back to vLLM's queue behind it: the REALTIME first token comes
    first, and the BATCH stream, resumed from its cached blocks, still ends with the built-in
    engine's greedy tokens for that prompt (both float32: exact). The same prompt sent again
    finds its blocks in the prefix cache, which the load report's hit ratio shows."""
    batch = common_pb2.WORKLOAD_CLASS_BATCH
    long_text = " ".join(f"item{i} is {i * 7 % 13}" for i in range(300))

    def long_request(key: str, workload_class: int) -> node_pb2.NodeGenerateRequest:
        request = _request(key, 12, workload_class)
        request.request.messages[0].content = long_text
        return request

    first_at: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}

    async def consume(key: str, request: node_pb2.NodeGenerateRequest) -> None:
        async for chunk in stub.Generate(request):
            if chunk.token_ids and key not in first_at:
                first_at[key] = time.monotonic()
            tokens.setdefault(key, []).extend(chunk.token_ids)

    long_prompt = asyncio.ensure_future(consume("long", long_request("long", batch)))
    await asyncio.sleep(0.5)  # its first chunk is being prefilled
    await consume("rt-now", _request("rt-now", 4))
    await long_prompt
    assert first_at["rt-now"] < first_at["long"], first_at
    assert tuple(tokens["long"]) == await _builtin_greedy(12, long_text)
    lines = [json.loads(x) for x in node.log.read_text().splitlines() if "prefill_paused" in x]
    paused = [(x["request_id"], x["by"]) for x in lines if x["by"] == "rt-now"]
    assert paused == [("long", "rt-now")], lines
    await consume("long-again", long_request("long-again", batch))  # its blocks are cached
    (ratio,) = (await _load(stub)).prefix_cache_hit_ratio.values()
    assert 0 < ratio < 1, ratio  # new prompts only: the paused one's resumption is no hit


async def test_drain_finishes_in_flight_then_refuses(
    stub: node_pb2_grpc.NodeStub, node: Node
) -> None:
    """Drain lets a running stream finish, refuses new work UNAVAILABLE while it does, and the
    node exits. (The refusal is asked while the stream runs: once it ends the node stops
    serving, and a call racing that stop may end CANCELLED, which the scheduler blames on the
    node and retries elsewhere.)"""
    call = stub.Generate(_request("last", 24))
    first = await anext(aiter(call))
    reply = await stub.Drain(node_pb2.DrainRequest(grace_seconds=30))
    assert reply.in_flight >= 1
    assert not call.done()  # still streaming: the node is draining, not stopping
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        _ = [c async for c in stub.Generate(_request("too-late", 4))]
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = [c async for c in call]
    assert (rest or [first])[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    await eventually(lambda: node.proc.poll() is not None, timeout=60, interval=0.5)
    assert node.proc.returncode == 0, node.log.read_text()[-3000:]
