"""Serving LoRA adapters: the batching engine's greedy output with an adapter equals the
peft-merged transformers model's; one batch mixes adapters and the base model with each row
getting what it gets alone; the node's adapter cache is an LRU bounded by bytes that never
evicts an adapter in use; the store refuses what it cannot serve; a node serves ``adapter=``
requests over gRPC and answers NOT_FOUND / INVALID_ARGUMENT for the others."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import peft
import pytest
import torch
from google.rpc import error_details_pb2

from inference_node.adapters import (
    AdapterCache,
    AdapterInvalidError,
    AdapterNotFoundError,
    AdapterRef,
    AdapterStore,
    AdapterTooLargeError,
    factor_bytes,
    parse_reference,
)
from inference_node.engine import (
    BatchingConfig,
    BatchingEngine,
    EngineRequest,
    InvalidRequestError,
    SamplingParams,
    TokenDelta,
    build_engine,
)
from inference_node.engine.lora_rows import LoraRows
from inference_node.lora import TARGET_MODULES, LoraAdapter, LoraConfig, target_shapes
from inference_node.lora.weights import WEIGHTS_FILE
from inference_node.models import LanguageModel
from sluice.contract import WorkloadClass
from sluice.v1 import common_pb2, inference_pb2, node_pb2, node_pb2_grpc
from tests.harness import Suite
from tests.test_end_to_end import details_of, unpack

TENANT = "alpha"
ATTENTION = LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
EVERYWHERE = LoraConfig(rank=8, alpha=4, target_modules=TARGET_MODULES)
PROMPTS = [[5, 6, 7, 8, 9, 10], [72, 101, 108, 108, 111, 32, 119, 111, 114], [33] * 17]


def make_adapter(lm: LanguageModel, config: LoraConfig, seed: int) -> LoraAdapter:
    """An adapter whose B is non-zero (a fresh one would leave the model unchanged)."""
    adapter = LoraAdapter.for_model(lm, config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    for pair in adapter.pairs.values():
        pair.b.copy_(torch.randn(pair.b.shape, generator=generator) * 0.2)
    return adapter


@pytest.fixture
def store(tmp_path: Path, tiny_lm: LanguageModel) -> AdapterStore:
    """A store holding ``alpha/attn`` (rank 4, attention) and ``alpha/all`` (rank 8, all
    seven projections) of the tiny Llama."""
    s = AdapterStore(tmp_path / "adapters")
    s.publish(make_adapter(tiny_lm, ATTENTION, 1), AdapterRef(TENANT, tiny_lm.name, "attn"))
    s.publish(make_adapter(tiny_lm, EVERYWHERE, 2), AdapterRef(TENANT, tiny_lm.name, "all"))
    return s


@pytest.fixture
def engine(tiny_lm: LanguageModel, store: AdapterStore) -> Iterator[BatchingEngine]:
    eng = BatchingEngine(
        tiny_lm,
        BatchingConfig(max_sequences=8, kv_budget_bytes=16 * 1024**2),
        AdapterCache(store, tiny_lm, 64 * 1024**2),
    )
    eng.start()
    yield eng
    eng.close()


def merged_greedy(lm: LanguageModel, directory: Path | None, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of the transformers model built from ``lm``'s weights (copied: merging
    writes into them), with the adapter at ``directory`` merged by peft."""
    weights = {k: v.clone() for k, v in lm.weights.items()}
    model = dataclasses.replace(lm, _hf=None, weights=weights).hf_model()
    if directory is not None:
        model = peft.PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, len(ids) :]]


def request(rid: str, ids: list[int], n: int, adapter: str = "") -> EngineRequest:
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    return EngineRequest(rid, tuple(ids), params, adapter=adapter)


async def tokens(stream: AsyncIterator[TokenDelta]) -> list[int]:
    async with asyncio.timeout(120):
        return [i async for d in stream for i in d.token_ids]


def record_steps(monkeypatch: pytest.MonkeyPatch, engine: BatchingEngine) -> list[set[int]]:
    """Record, for every engine step, the adapter indices of its rows ({-1}: base only, no
    LoRA work) and whether it decoded while prefilling (-2 added)."""
    steps: list[set[int]] = []
    real = engine._runner.step

    def step(decode: list[int], positions: list[int], prefills: list[Any], lora: Any) -> Any:
        rows = {-1}
        if isinstance(lora, LoraRows):
            rows = set(lora.decode.tolist()) if lora.decode is not None else set()
            rows |= {-1} if decode and lora.decode is None else set()
            rows |= {j for _, _, j in lora.chunks}
            rows |= {-1} if len(lora.chunks) < len(prefills) else set()
        steps.append(rows | ({-2} if decode and prefills else set()))
        return real(decode, positions, prefills, lora)

    monkeypatch.setattr(engine._runner, "step", step)
    return steps


async def test_served_adapter_greedy_equals_the_peft_merged_model(
    engine: BatchingEngine, store: AdapterStore, tiny_lm: LanguageModel
) -> None:
    """For both adapters (rank 4 on attention, rank 8 on all seven projections) and prompts
    of several lengths, the engine's greedy tokens equal those of the transformers model with
    the adapter merged by ``PeftModel.from_pretrained(...).merge_and_unload()``."""
    for name in ("attn", "all"):
        directory = store.directory(AdapterRef(TENANT, tiny_lm.name, name))
        for i, ids in enumerate(PROMPTS):
            expected = merged_greedy(tiny_lm, directory, ids, 16)
            got = await tokens(engine.submit(request(f"{name}-{i}", ids, 16, f"{TENANT}/{name}")))
            assert got == expected, (name, i)
    base = merged_greedy(tiny_lm, None, PROMPTS[0], 16)
    assert base != merged_greedy(
        tiny_lm, store.directory(AdapterRef(TENANT, tiny_lm.name, "all")), PROMPTS[0], 16
    )


async def test_one_batch_mixes_adapters_and_the_base_model_exactly(
    engine: BatchingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two adapters and the base model in the same steps, prefill and decode, a newcomer's
    prefill riding along the others' decode: every request gets exactly the tokens it gets
    alone."""
    plan = [("", 0, 64), ("alpha/attn", 1, 64), ("alpha/all", 2, 64), ("alpha/attn", 2, 12)]
    plan.append(("", 1, 12))
    alone = [
        await tokens(engine.submit(request(f"alone-{i}", PROMPTS[p], n, a)))
        for i, (a, p, n) in enumerate(plan)
    ]
    steps = record_steps(monkeypatch, engine)
    streams = [
        engine.submit(request(f"mixed-{i}", PROMPTS[p], n, a))
        for i, (a, p, n) in enumerate(plan[:3])
    ]
    firsts = [await anext(s) for s in streams]  # the first three decode from here on
    streams += [
        engine.submit(request(f"late-{i}", PROMPTS[p], n, a))
        for i, (a, p, n) in enumerate(plan[3:])
    ]
    got = [list(f.token_ids) + await tokens(s) for f, s in zip(firsts, streams, strict=False)]
    got += [await tokens(s) for s in streams[3:]]
    assert got == alone
    assert {-1, 0, 1} in [rows - {-2} for rows in steps]  # base and both adapters in one step
    assert any({-2, 0, 1} <= rows for rows in steps)  # ...while decoding and prefilling


async def test_base_model_steps_do_no_lora_work(
    engine: BatchingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps whose rows all use the base model get no LoRA rows (the runner's base path,
    unchanged), even on an engine that serves adapters and has served one."""
    await tokens(engine.submit(request("warm", PROMPTS[0], 4, "alpha/attn")))
    steps = record_steps(monkeypatch, engine)
    results = await asyncio.gather(
        *(tokens(engine.submit(request(f"b{i}", ids, 8))) for i, ids in enumerate(PROMPTS))
    )
    assert all(len(r) == 8 for r in results)
    assert steps and all(rows <= {-1, -2} for rows in steps)
    assert engine._adapters._stacks is None


async def test_unknown_and_malformed_adapters_end_only_their_request(
    engine: BatchingEngine,
) -> None:
    """An adapter the store lacks ends its stream with AdapterNotFoundError before any
    token; a malformed name is refused at submit naming the field; a request beside them is
    served."""
    with pytest.raises(InvalidRequestError) as refused:
        engine.submit(request("bad", PROMPTS[0], 4, "../etc"))
    assert [f for f, _ in refused.value.violations] == ["adapter"]
    neighbour = engine.submit(request("ok", PROMPTS[1], 8, "alpha/all"))
    with pytest.raises(AdapterNotFoundError):
        await tokens(engine.submit(request("missing", PROMPTS[0], 4, "alpha/nope")))
    assert len(await tokens(neighbour)) == 8
    assert engine.stats().adapter_bytes > 0
    assert engine.stats().adapter_budget_bytes == 64 * 1024**2


class GatedStore(AdapterStore):
    """A store whose weight reads wait for ``gate``: a slow shared file system."""

    def __init__(self, root: Path, gate: threading.Event) -> None:
        super().__init__(root)
        self.gate = gate

    def load(self, ref: AdapterRef, lm: LanguageModel, config: LoraConfig) -> LoraAdapter:
        assert self.gate.wait(60)
        return super().load(ref, lm, config)


async def test_a_loading_adapter_holds_up_no_one_and_a_cancelled_wait_unpins_it(
    store: AdapterStore, tiny_lm: LanguageModel
) -> None:
    """While an adapter's weights are being read, a base request is served from start to
    end; a request cancelled while waiting for the load ends at once, and once the load
    completes the other request is served and nothing stays pinned."""
    gate = threading.Event()
    cache = AdapterCache(GatedStore(store.root, gate), tiny_lm, 64 * 1024**2)
    engine = BatchingEngine(tiny_lm, BatchingConfig(max_sequences=4, kv_budget_bytes=2**24), cache)
    engine.start()
    try:
        waiting = engine.submit(request("adapted", PROMPTS[0], 8, "alpha/all"))
        cancelled = engine.submit(request("cancelled", PROMPTS[1], 8, "alpha/all"))
        assert len(await tokens(engine.submit(request("base", PROMPTS[1], 24)))) == 24
        await cancelled.aclose()
        assert engine.stats().waiting[WorkloadClass.REALTIME] == 1
        gate.set()
        assert len(await tokens(waiting)) == 8
        ref = AdapterRef(TENANT, tiny_lm.name, "all")
        assert cache.cached() == [ref]
        assert cache._entries[ref].pins == 0
    finally:
        gate.set()
        engine.close()


def test_an_engine_without_adapters_refuses_adapter_requests(tiny_lm: LanguageModel) -> None:
    """No adapter cache (``adapter_cache_bytes`` 0): INVALID_ARGUMENT naming ``adapter``."""
    engine = build_engine(tiny_lm, max_sequences=2, kv_budget_bytes=8 * 1024**2)
    try:
        with pytest.raises(InvalidRequestError) as refused:
            engine.submit(request("x", PROMPTS[0], 4, "alpha/attn"))
        assert [f for f, _ in refused.value.violations] == ["adapter"]
    finally:
        engine.close()


# -- the cache and the store ----------------------------------------------------------------


def publish(store: AdapterStore, lm: LanguageModel, names: list[str]) -> list[AdapterRef]:
    refs = [AdapterRef(TENANT, lm.name, n) for n in names]
    for i, ref in enumerate(refs):
        store.publish(make_adapter(lm, ATTENTION, 10 + i), ref)
    return refs


def size(lm: LanguageModel) -> int:
    return factor_bytes(ATTENTION, target_shapes(lm, ATTENTION))


def test_the_cache_evicts_the_least_recently_used_adapter_by_bytes(
    tmp_path: Path, tiny_lm: LanguageModel
) -> None:
    """Room for two and a half adapters: loading a third evicts the least recently acquired
    unpinned one, never going over the bound."""
    store = AdapterStore(tmp_path)
    a, b, c = publish(store, tiny_lm, ["a", "b", "c"])
    cache = AdapterCache(store, tiny_lm, size(tiny_lm) * 5 // 2)
    try:
        for ref in (a, b):
            cache.acquire(ref).result(30)
            cache.release(ref)
        cache.acquire(a).result(30)  # a is now more recent than b
        cache.release(a)
        cache.acquire(c).result(30)
        assert cache.cached() == [a, c]
        assert cache.used_bytes == 2 * size(tiny_lm) <= cache.capacity_bytes
    finally:
        cache.close()


def test_adapters_in_use_are_never_evicted_and_a_load_waits_for_room(
    tmp_path: Path, tiny_lm: LanguageModel
) -> None:
    """With both slots pinned a third adapter's load waits; the first release makes room
    (evicting the released one) and the load completes."""
    store = AdapterStore(tmp_path)
    a, b, c = publish(store, tiny_lm, ["a", "b", "c"])
    cache = AdapterCache(store, tiny_lm, size(tiny_lm) * 2)
    try:
        cache.acquire(a).result(30)
        cache.acquire(b).result(30)
        waiting = cache.acquire(c)
        with pytest.raises(TimeoutError):
            waiting.result(0.3)
        assert cache.cached() == [a, b]
        cache.release(b)
        waiting.result(30)
        assert cache.cached() == [a, c]
        assert cache.used_bytes <= cache.capacity_bytes
    finally:
        cache.close()


def test_an_adapter_larger_than_the_cache_is_refused(
    tmp_path: Path, tiny_lm: LanguageModel
) -> None:
    store = AdapterStore(tmp_path)
    (a,) = publish(store, tiny_lm, ["a"])
    cache = AdapterCache(store, tiny_lm, size(tiny_lm) - 1)
    try:
        with pytest.raises(AdapterTooLargeError):
            cache.acquire(a).result(30)
        assert cache.cached() == [] and cache.used_bytes == 0
    finally:
        cache.close()


def test_the_store_refuses_what_it_cannot_serve(tmp_path: Path, tiny_lm: LanguageModel) -> None:
    """Names that leave the store, a pickle-only adapter, a weights file larger than its
    shapes allow (refused unread) and an adapter of another model's shapes."""
    store = AdapterStore(tmp_path)
    for text in ("../x", "alpha/..", "alpha", "alpha/a/b", "a b/c", f"alpha/{'x' * 129}"):
        with pytest.raises(AdapterInvalidError):
            parse_reference(text, tiny_lm.name)
    (padded,) = publish(store, tiny_lm, ["padded"])
    weights = store.directory(padded) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes() + b" " * 200_000)
    pickled = store.directory(AdapterRef(TENANT, tiny_lm.name, "pickled"))
    pickled.mkdir(parents=True)
    (pickled / "adapter_config.json").write_text(
        (store.directory(padded) / "adapter_config.json").read_text()
    )
    (pickled / "adapter_model.bin").write_bytes(b"not unpickled")
    wrong = AdapterRef(TENANT, tiny_lm.name, "wrong")
    other = make_adapter(tiny_lm, ATTENTION, 3)
    first = next(iter(other.pairs))
    other.pairs[first] = dataclasses.replace(other.pairs[first], a=torch.zeros(4, 3))
    other.save(store.directory(wrong))
    pickled_ref = AdapterRef(TENANT, tiny_lm.name, pickled.name)
    for ref, why in ((padded, "bytes, over"), (pickled_ref, "pickle"), (wrong, "does not fit")):
        with pytest.raises(AdapterInvalidError, match=why):
            store.load(ref, tiny_lm, store.read_config(ref))
    with pytest.raises(AdapterNotFoundError):
        store.read_config(AdapterRef(TENANT, tiny_lm.name, "absent"))


# -- a node over gRPC -------------------------------------------------------------------------


def node_request(tiny_lm: LanguageModel, prompt: str, adapter: str) -> node_pb2.NodeGenerateRequest:
    generate = inference_pb2.GenerateRequest(
        model=tiny_lm.name,
        prompt=prompt,
        options=common_pb2.GenerationOptions(max_new_tokens=10, ignore_eos=True),
    )
    return node_pb2.NodeGenerateRequest(
        request=generate, tenant="beta", request_id=uuid.uuid4().hex, adapter=adapter
    )


async def test_a_node_serves_adapter_requests_over_grpc(
    suite: Suite, store: AdapterStore, tiny_lm: LanguageModel
) -> None:
    """A node on the shared store serves ``adapter="alpha/all"`` (what the peft-merged model
    generates) beside a base request; an unknown adapter is NOT_FOUND (ADAPTER_NOT_FOUND), a
    malformed one INVALID_ARGUMENT naming ``adapter``; the engine counts the adapter's bytes."""
    node = await suite.start_node("lora", adapters_dir=store.root, adapter_cache_bytes=2**24)
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    prompt = "Hello, adapter"
    ids = tiny_lm.tokenizer.encode(prompt)
    directory = store.directory(AdapterRef(TENANT, tiny_lm.name, "all"))

    async def generate(adapter: str) -> list[int]:
        call = stub.Generate(node_request(tiny_lm, prompt, adapter), timeout=60)
        return [t async for chunk in call for t in chunk.token_ids]

    adapted, base = await asyncio.gather(generate("alpha/all"), generate(""))
    assert adapted == merged_greedy(tiny_lm, directory, ids, 10)
    assert base == merged_greedy(tiny_lm, None, ids, 10)
    assert node.engines[tiny_lm.name].stats().adapter_bytes >= factor_bytes(
        EVERYWHERE, target_shapes(tiny_lm, EVERYWHERE)
    )
    for adapter, code, reason in (
        ("alpha/nope", grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND"),
        ("../all", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(adapter)
        assert err.value.code() == code
        info = unpack(details_of(err.value), error_details_pb2.ErrorInfo)
        assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == reason
    assert await generate("") == base  # the node serves on
