"""The continuous-batching engine: exactness against HF generate, batching, preemption,
cancellation, memory budget, drain. Correctness only; speed is measured by
``python -m bench.engine``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from inference_node.engine import (
    BatchingConfig,
    BatchingEngine,
    DeltaStream,
    EngineClosedError,
    EngineRequest,
    FinishReason,
    RequestTooLargeError,
    SamplingParams,
    TokenDelta,
    build_engine,
)
from inference_node.engine.step_model import StepCost, StepModel
from inference_node.models import LanguageModel, load_language_model
from sluice.contract import WorkloadClass

BATCH = WorkloadClass.BATCH


@pytest.fixture
def lm(tmp_path: Path) -> LanguageModel:
    return load_language_model("tiny-random-llama", cache_dir=tmp_path)


def make_engine(lm: LanguageModel, **config: Any) -> BatchingEngine:
    config.setdefault("kv_budget_bytes", 64 * 1024**2)
    engine = BatchingEngine(lm, BatchingConfig(**config))
    engine.start()
    return engine


@pytest.fixture
async def engine(lm: LanguageModel) -> AsyncIterator[BatchingEngine]:
    eng = make_engine(lm, max_sequences=8)
    yield eng
    eng.close()


def prompts(lm: LanguageModel, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = lm.vocab_size
    return [torch.randint(3, min(vocab, 250), (n,), generator=g).tolist() for n in lengths]


def request(
    rid: str, ids: list[int], n: int, workload_class: int = WorkloadClass.REALTIME, **params: Any
) -> EngineRequest:
    params.setdefault("ignore_eos", True)
    return EngineRequest(
        rid, tuple(ids), SamplingParams(max_new_tokens=n, **params), workload_class
    )


async def collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    async with asyncio.timeout(120):
        return [d async for d in stream]


def ids_of(deltas: list[TokenDelta]) -> list[int]:
    return [i for d in deltas for i in d.token_ids]


def hf_greedy(lm: LanguageModel, ids: list[int], n: int) -> list[int]:
    out = lm.hf_model().generate(
        torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, len(ids) :].tolist()


def test_build_engine_picks_batching_for_llama(lm: LanguageModel) -> None:
    """Llama-family models get the batching engine."""
    engine = build_engine(lm, max_sequences=4, kv_budget_bytes=16 * 1024**2)
    assert isinstance(engine, BatchingEngine)
    engine.close()


async def test_greedy_batch_of_mixed_lengths_equals_hf_generate(
    engine: BatchingEngine, lm: LanguageModel
) -> None:
    """Requests of mixed prompt and output lengths, batched together, produce exactly the
    tokens HF generate produces for each alone."""
    batch = prompts(lm, [3, 17, 60, 9, 33])
    lengths = [12, 5, 20, 16, 1]
    streams = [
        engine.submit(request(f"r{i}", p, n))
        for i, (p, n) in enumerate(zip(batch, lengths, strict=True))
    ]
    results = await asyncio.gather(*(collect(s) for s in streams))
    for p, n, deltas in zip(batch, lengths, results, strict=True):
        assert ids_of(deltas) == hf_greedy(lm, p, n)
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert deltas[-1].completion_tokens == n


async def test_chunked_prefill_equals_hf_generate(lm: LanguageModel) -> None:
    """A prompt longer than the step budget is prefilled in chunks with the same result."""
    engine = make_engine(lm, max_sequences=2, max_batched_tokens=16)
    try:
        (long_prompt,) = prompts(lm, [70], seed=3)
        deltas = await collect(engine.submit(request("long", long_prompt, 10)))
    finally:
        engine.close()
    assert ids_of(deltas) == hf_greedy(lm, long_prompt, 10)


async def test_greedy_equals_hf_generate_on_smollm2(smollm2: LanguageModel) -> None:
    """The real model, batched (mixed lengths), matches HF generate token for token."""
    engine = make_engine(smollm2, max_sequences=4, kv_budget_bytes=256 * 1024**2)
    try:
        texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land"]
        batch = [smollm2.tokenizer.encode(t) for t in texts]
        streams = [engine.submit(request(f"s{i}", p, 12)) for i, p in enumerate(batch)]
        results = await asyncio.gather(*(collect(s) for s in streams))
    finally:
        engine.close()
    for p, deltas in zip(batch, results, strict=True):
        assert ids_of(deltas) == hf_greedy(smollm2, p, 12)


async def test_short_request_does_not_wait_for_a_long_one(
    engine: BatchingEngine, lm: LanguageModel
) -> None:
    """A request arriving while a long generation runs joins the batch and finishes first."""
    long_p, short_p = prompts(lm, [10, 10])
    done: list[str] = []

    async def run(rid: str, stream: AsyncIterator[TokenDelta]) -> None:
        await collect(stream)
        done.append(rid)

    long_stream = engine.submit(request("long", long_p, 400))
    await anext(long_stream)
    short_stream = engine.submit(request("short", short_p, 5))
    await asyncio.gather(run("long", long_stream), run("short", short_stream))
    assert done == ["short", "long"]


async def test_cancelled_stream_frees_its_slot(lm: LanguageModel) -> None:
    """With one slot, closing a running stream lets the next request run to completion."""
    engine = make_engine(lm, max_sequences=1)
    try:
        a, b = prompts(lm, [8, 8])
        running = engine.submit(request("a", a, 500))
        await anext(running)
        waiting = engine.submit(request("b", b, 4))
        assert engine.stats().waiting[WorkloadClass.REALTIME] == 1
        await running.aclose()
        deltas = await collect(waiting)
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert engine.stats().running[WorkloadClass.REALTIME] == 0
    finally:
        engine.close()


async def test_realtime_preempts_batch_and_batch_still_completes_exactly(
    lm: LanguageModel,
) -> None:
    """With every slot held by BATCH work, a REALTIME request preempts one; the preempted
    request is recomputed later and its tokens equal an uninterrupted greedy run."""
    engine = make_engine(lm, max_sequences=2)
    try:
        b1, b2, rt = prompts(lm, [12, 14, 6], seed=7)
        batch1 = engine.submit(request("b1", b1, 120, WorkloadClass.BATCH))
        batch2 = engine.submit(request("b2", b2, 120, WorkloadClass.BATCH))
        first1, first2 = await anext(batch1), await anext(batch2)
        assert engine.stats().running[WorkloadClass.BATCH] == 2
        realtime = await collect(engine.submit(request("rt", rt, 8)))
        assert realtime[-1].finish_reason is FinishReason.LENGTH
        rest1, rest2 = await asyncio.gather(collect(batch1), collect(batch2))
    finally:
        engine.close()
    assert ids_of([first1, *rest1]) == hf_greedy(lm, b1, 120)
    assert ids_of([first2, *rest2]) == hf_greedy(lm, b2, 120)
    assert ids_of(realtime) == hf_greedy(lm, rt, 8)


async def test_a_prompt_done_behind_a_preemptors_partial_prompt_trades_slots_with_it(
    lm: LanguageModel,
) -> None:
    """Every slot taken: X and Y decode, A's prompt finishes in the step in which REALTIME C
    preempts Y and takes its slot for the first chunk of its own prompt. A then trades slots
    with C (no slot is free to park C in; it used to fail the step with ValueError), and
    every generation, Y's recomputed, equals HF generate. Stepped by hand: the order matters."""
    engine = BatchingEngine(
        lm, BatchingConfig(max_sequences=3, max_batched_tokens=16, kv_budget_bytes=64 * 1024**2)
    )
    x, y, a, c = prompts(lm, [4, 4, 20, 30], seed=11)
    sizes = {"x": 40, "y": 40, "a": 10, "c": 5}
    streams: dict[str, DeltaStream] = {}

    def step(*new: tuple[str, list[int], WorkloadClass]) -> None:
        for rid, ids, cls in new:
            streams[rid] = engine.submit(request(rid, ids, sizes[rid], cls))
        assert engine._intake()
        engine._step()

    try:
        step(("x", x, BATCH), ("y", y, BATCH))  # both prefilled: two running
        step(("a", a, BATCH))  # 14 of A's 20 prompt tokens
        step(("c", c, WorkloadClass.REALTIME))  # A's last 6; C preempts Y, 8 of its 30
        stats = engine.stats()
        assert stats.running[BATCH] == 2 and stats.running[WorkloadClass.REALTIME] == 1
        engine.start()
        results = await asyncio.gather(*(collect(s) for s in streams.values()))
    finally:
        engine.close()
    for rid, ids, deltas in zip(streams, (x, y, a, c), results, strict=True):
        assert ids_of(deltas) == hf_greedy(lm, ids, sizes[rid])


async def test_stats_count_the_prompt_tokens_ahead_of_a_realtime_prompt(lm: LanguageModel) -> None:
    """A prompt being prefilled counts whole until its first token, a waiting REALTIME one
    too; a waiting BATCH one does not (a REALTIME prompt goes before it), nor does a stream
    past its first token. Stepped by hand."""
    engine = BatchingEngine(
        lm, BatchingConfig(max_sequences=3, max_batched_tokens=16, kv_budget_bytes=64 * 1024**2)
    )
    x, a, r, b = prompts(lm, [4, 20, 6, 8], seed=3)
    streams = [engine.submit(request("x", x, 40, BATCH))]
    try:
        assert engine.stats().realtime_ahead_tokens == 0  # a waiting BATCH prompt
        assert engine._intake()
        engine._step()  # x prefilled: it decodes
        streams.append(engine.submit(request("a", a, 10, BATCH)))
        assert engine._intake()
        engine._step()  # 15 of A's 20 prompt tokens
        streams.append(engine.submit(request("r", r, 5)))
        streams.append(engine.submit(request("b", b, 5, BATCH)))
        assert engine.stats().realtime_ahead_tokens == 20 + 6
    finally:
        engine.close()
        for stream in streams:
            await stream.aclose()


async def test_request_beyond_memory_budget_is_refused(lm: LanguageModel) -> None:
    """A request whose prompt plus output cannot fit a KV slot is refused at submit."""
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, layers, KV heads, head size, float32 bytes
    engine = make_engine(lm, max_sequences=2, kv_budget_bytes=2 * 100 * per_token)
    try:
        assert engine.slot_tokens == 100
        (p,) = prompts(lm, [50])
        with pytest.raises(RequestTooLargeError, match="at most 100"):
            engine.submit(request("big", p, 51))
        assert (await collect(engine.submit(request("fits", p, 50))))[-1].completion_tokens == 50
    finally:
        engine.close()


async def test_seeded_sampling_is_reproducible_inside_a_batch(
    engine: BatchingEngine, lm: LanguageModel
) -> None:
    """A seeded sampled request gives the same tokens alone and batched with others."""
    p, other = prompts(lm, [10, 20])
    alone = await collect(engine.submit(request("alone", p, 20, temperature=0.9, seed=11)))
    crowd = engine.submit(request("crowd", other, 30))
    again = await collect(engine.submit(request("again", p, 20, temperature=0.9, seed=11)))
    await collect(crowd)
    assert ids_of(alone) == ids_of(again)


async def test_stop_string_and_stats(engine: BatchingEngine, lm: LanguageModel) -> None:
    """Stop strings end a sequence; stats count running sequences and KV bytes in use."""
    (p,) = prompts(lm, [10])
    reference = await collect(engine.submit(request("ref", p, 30)))
    text = "".join(d.text for d in reference)
    stop = text[5:7]
    stopped = await collect(engine.submit(request("stop", p, 30, stop=(stop,))))
    assert stopped[-1].finish_reason is FinishReason.STOP
    assert "".join(d.text for d in stopped) == text[: text.find(stop)]
    stream = engine.submit(request("kv", p, 300))
    await anext(stream)
    stats = engine.stats()
    assert stats.running[WorkloadClass.REALTIME] == 1
    assert stats.kv_used_bytes > 0
    await stream.aclose()


async def test_drain_finishes_in_flight_and_refuses_new(
    engine: BatchingEngine, lm: LanguageModel
) -> None:
    """drain() lets running streams finish, then submit raises EngineClosedError."""
    (p,) = prompts(lm, [10])
    stream = engine.submit(request("inflight", p, 40))
    await anext(stream)
    drain = asyncio.create_task(engine.drain(30))
    deltas = await collect(stream)
    await drain
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    with pytest.raises(EngineClosedError):
        engine.submit(request("late", p, 2))


async def test_step_budgets_bound_the_batch_and_realtime_preempts_batch_down_to_its_own(
    lm: LanguageModel,
) -> None:
    """With a step fitted at 10 ms + 10 ms a sequence, BATCH requests whose step budget is
    50 ms run four at once out of eight slots; a REALTIME request with a 30 ms budget preempts
    them down to one beside it, and every generation still ends exactly."""
    engine = make_engine(lm, max_sequences=8)
    engine.step_model = StepModel(refit_every=10**9)  # the fit is set, not learned
    engine.step_model.cost = StepCost(0.010, 0.010, 0.0, samples=100)
    try:
        ids = prompts(lm, [8, 9, 10, 11, 12, 13, 6], seed=3)

        def budgeted(rid: str, p: list[int], cls: WorkloadClass, budget: float) -> EngineRequest:
            params = SamplingParams(max_new_tokens=60, ignore_eos=True)
            return EngineRequest(rid, tuple(p), params, cls, step_budget_s=budget)

        batch = [engine.submit(budgeted(f"b{i}", p, BATCH, 0.05)) for i, p in enumerate(ids[:6])]
        firsts = [await anext(s) for s in batch[:4]]
        stats = engine.stats()
        assert stats.running[BATCH] == 4 and stats.waiting[BATCH] == 2
        realtime = engine.submit(budgeted("rt", ids[6], WorkloadClass.REALTIME, 0.03))
        rt_first = await anext(realtime)
        stats = engine.stats()
        assert stats.running[WorkloadClass.REALTIME] == 1 and stats.running[BATCH] == 1
        rt_rest = await collect(realtime)
        rests = await asyncio.gather(*(collect(s) for s in batch))
    finally:
        engine.close()
    assert ids_of([rt_first, *rt_rest]) == hf_greedy(lm, ids[6], 60)
    for i in (0, 3):  # preempted or not, each equals an uninterrupted greedy run
        assert ids_of([firsts[i], *rests[i]]) == hf_greedy(lm, ids[i], 60)
