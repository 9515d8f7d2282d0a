"""Tests for the SerialEngine, driven by the tiny seeded Llama with its byte tokenizer."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from inference_node.engine import (
    EngineClosedError,
    EngineFaultError,
    EngineFullError,
    EngineRequest,
    FinishReason,
    SamplingParams,
    SerialEngine,
    TokenDelta,
)
from inference_node.models import LanguageModel, load_language_model
from sluice.contract import WorkloadClass


@pytest.fixture
def lm(tmp_path: Path) -> LanguageModel:
    return load_language_model("tiny-random-llama", cache_dir=tmp_path)


@pytest.fixture
async def engine(lm: LanguageModel) -> AsyncIterator[SerialEngine]:
    eng = SerialEngine(lm)
    eng.start()
    yield eng
    eng.close()


def _request(
    lm: LanguageModel,
    request_id: str,
    *,
    prompt: str = "Once upon a time",
    workload_class: int = WorkloadClass.REALTIME,
    **params: Any,
) -> EngineRequest:
    params.setdefault("max_new_tokens", 16)
    ids = tuple(lm.tokenizer.encode(prompt))
    return EngineRequest(request_id, ids, SamplingParams(**params), workload_class)


async def _collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    async with asyncio.timeout(60):
        return [delta async for delta in stream]


def _ids(deltas: list[TokenDelta]) -> list[int]:
    return [i for d in deltas for i in d.token_ids]


def _text(deltas: list[TokenDelta]) -> str:
    return "".join(d.text for d in deltas)


async def test_greedy_is_deterministic_and_exact(engine: SerialEngine, lm: LanguageModel) -> None:
    """Greedy decoding with ignore_eos yields exactly max_new_tokens (one delta per token,
    or fewer carrying several when the consumer fell behind), the same ids every run, ids
    matching a cache-free forward pass, and text equal to the decode of all ids; only the last
    delta finishes, with LENGTH."""
    runs = []
    for n in range(2):
        req = _request(lm, f"greedy-{n}", max_new_tokens=40, ignore_eos=True)
        runs.append(await _collect(engine.submit(req)))
    first, second = runs
    assert len(_ids(first)) == 40 and _ids(first) == _ids(second)
    assert all(d.token_ids for d in first) and len(first) <= 40
    assert [d.finish_reason for d in first[:-1]] == [None] * (len(first) - 1)
    assert first[-1].finish_reason is FinishReason.LENGTH
    assert first[-1].completion_tokens == 40 and first[-1].prompt_tokens == len("Once upon a time")
    assert _text(first) == lm.tokenizer.decode(_ids(first))

    prompt = lm.tokenizer.encode("Once upon a time")
    full = torch.tensor([prompt + _ids(first)[:-1]])
    with torch.inference_mode():
        logits = lm.hf_model()(input_ids=full).logits[0, len(prompt) - 1 :]
    assert logits.argmax(-1).tolist() == _ids(first)


async def test_consumer_that_falls_behind_gets_merged_deltas(
    engine: SerialEngine, lm: LanguageModel
) -> None:
    """Deltas that queue up while the consumer is busy come as one: a request read only after
    it finished arrives in a single delta with every id, the full text and LENGTH, exactly
    what reading it token by token gives."""
    stepwise = await _collect(
        engine.submit(_request(lm, "steps", max_new_tokens=24, ignore_eos=True))
    )
    stream = engine.submit(_request(lm, "late", max_new_tokens=24, ignore_eos=True))
    await engine.drain(timeout=30)  # returns once the request has finished
    await asyncio.sleep(0.05)  # the last deltas' call_soon_threadsafe callbacks
    late = await _collect(stream)
    assert len(late) == 1
    (delta,) = late
    assert delta.token_ids == tuple(_ids(stepwise)) and delta.text == _text(stepwise)
    assert delta.finish_reason is FinishReason.LENGTH and delta.completion_tokens == 24


async def test_seeded_sampling_is_reproducible(engine: SerialEngine, lm: LanguageModel) -> None:
    """Sampling with the same seed repeats itself; a different seed gives different tokens."""

    async def sample(rid: str, seed: int, top_p: float = 1.0) -> list[int]:
        req = _request(
            lm, rid, max_new_tokens=32, temperature=1.0, top_p=top_p, seed=seed, ignore_eos=True
        )
        return _ids(await _collect(engine.submit(req)))

    assert await sample("a", 7) == await sample("b", 7)
    assert await sample("c", 7) != await sample("d", 8)
    assert await sample("e", 3, top_p=0.9) == await sample("f", 3, top_p=0.9)
    unseeded = _request(lm, "g", max_new_tokens=8, temperature=0.7)
    assert len(_ids(await _collect(engine.submit(unseeded)))) <= 8


async def test_stop_string_truncates(engine: SerialEngine, lm: LanguageModel) -> None:
    """Generation ends at the first stop string with STOP; no streamed text contains it."""
    reference = await _collect(engine.submit(_request(lm, "ref", max_new_tokens=80)))
    text = _text(reference)
    start = next(i for i in range(5, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    expected = text[: text.find(stop)]

    deltas = await _collect(
        engine.submit(_request(lm, "stop", max_new_tokens=80, stop=("\x00never", stop)))
    )
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert _text(deltas) == expected
    assert _ids(deltas) == _ids(reference)[: len(_ids(deltas))]
    assert all(stop not in d.text for d in deltas)


async def test_eos_finishes(lm: LanguageModel) -> None:
    """A generated EOS id ends the request with EOS (and is reported), unless ignore_eos."""
    probe = SerialEngine(lm)
    probe.start()
    ids = _ids(await _collect(probe.submit(_request(lm, "probe", max_new_tokens=12))))
    probe.close()
    eos = ids[5]
    lm.eos_token_ids = frozenset({eos})  # a token greedy decoding is known to produce is the EOS
    engine = SerialEngine(lm)
    engine.start()
    try:
        deltas = await _collect(engine.submit(_request(lm, "eos", max_new_tokens=12)))
        ignored = await _collect(
            engine.submit(_request(lm, "ign", max_new_tokens=12, ignore_eos=True))
        )
    finally:
        engine.close()
    assert deltas[-1].finish_reason is FinishReason.EOS
    assert _ids(deltas) == ids[: ids.index(eos) + 1]
    assert ignored[-1].finish_reason is FinishReason.LENGTH and _ids(ignored) == ids


async def test_aclose_cancels_and_frees_engine(engine: SerialEngine, lm: LanguageModel) -> None:
    """Closing a stream mid-generation cancels it; the next request then completes."""
    stream = engine.submit(_request(lm, "long", max_new_tokens=1900, ignore_eos=True))
    assert (await anext(stream)).finish_reason is None
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    deltas = await _collect(engine.submit(_request(lm, "next", max_new_tokens=5)))
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    stats = engine.stats()
    assert sum(stats.running.values()) == 0 and sum(stats.waiting.values()) == 0
    assert stats.realtime_ahead_tokens is None  # it runs one request alone: no prompts ahead


async def test_task_cancel_and_dropped_stream_cancel(
    engine: SerialEngine, lm: LanguageModel
) -> None:
    """Cancelling the consuming task, or dropping a started stream, cancels the request."""

    async def consume(stream: AsyncIterator[TokenDelta], started: asyncio.Event) -> None:
        async for _ in stream:
            started.set()

    started = asyncio.Event()
    task = asyncio.create_task(
        consume(engine.submit(_request(lm, "t", max_new_tokens=1900, ignore_eos=True)), started)
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    del task
    assert (await _collect(engine.submit(_request(lm, "after-task", max_new_tokens=3))))[-1]

    stream = engine.submit(_request(lm, "dropped", max_new_tokens=1900, ignore_eos=True))
    await anext(stream)
    del stream
    gc.collect()
    deltas = await _collect(engine.submit(_request(lm, "after-drop", max_new_tokens=3)))
    assert deltas[-1].finish_reason is FinishReason.LENGTH


async def test_realtime_overtakes_waiting_batch(engine: SerialEngine, lm: LanguageModel) -> None:
    """A realtime request queued behind waiting batch requests runs before them."""
    order: list[str] = []

    async def consume(rid: str, stream: AsyncIterator[TokenDelta]) -> None:
        async for _ in stream:
            if rid not in order:
                order.append(rid)

    running = engine.submit(
        _request(
            lm, "batch-0", workload_class=WorkloadClass.BATCH, max_new_tokens=300, ignore_eos=True
        )
    )
    await anext(running)
    order.append("batch-0")
    streams = {"batch-0": running}
    for rid in ("batch-1", "batch-2"):
        streams[rid] = engine.submit(
            _request(lm, rid, workload_class=WorkloadClass.BATCH, max_new_tokens=4)
        )
    streams["realtime"] = engine.submit(_request(lm, "realtime", max_new_tokens=4))
    stats = engine.stats()
    assert stats.running == {1: 0, 2: 1, 3: 0}
    assert stats.waiting == {1: 1, 2: 2, 3: 0}
    assert stats.queued_tokens > 3 * len("Once upon a time")
    async with asyncio.timeout(60):
        await asyncio.gather(*(consume(rid, s) for rid, s in streams.items()))
    assert order == ["batch-0", "realtime", "batch-1", "batch-2"]


async def test_invalid_requests_are_rejected(engine: SerialEngine, lm: LanguageModel) -> None:
    """Prompts that do not fit the context and invalid parameters raise ValueError at submit."""
    with pytest.raises(ValueError, match="context"):
        engine.submit(_request(lm, "long", prompt="x" * 2000, max_new_tokens=100))
    with pytest.raises(ValueError):
        engine.submit(_request(lm, "p", top_p=0.0))
    with pytest.raises(ValueError):
        engine.submit(_request(lm, "s", stop=("",)))
    with pytest.raises(ValueError):
        engine.submit(_request(lm, "w", workload_class=7))
    with pytest.raises(ValueError):
        engine.submit(EngineRequest("v", (1, 999), SamplingParams(max_new_tokens=2)))
    fits = _request(lm, "fits", prompt="x" * 2000, max_new_tokens=48, ignore_eos=True)
    assert (await _collect(engine.submit(fits)))[-1].completion_tokens == 48


async def test_waiting_queue_is_bounded(lm: LanguageModel) -> None:
    """Submitting past max_waiting raises EngineFullError; close cancels what is queued."""
    engine = SerialEngine(lm, max_waiting=2)  # not started: everything waits
    streams = [engine.submit(_request(lm, f"r{i}")) for i in range(2)]
    with pytest.raises(EngineFullError):
        engine.submit(_request(lm, "r2"))
    assert engine.stats().waiting[WorkloadClass.REALTIME] == 2
    engine.close()
    for stream in streams:
        deltas = await _collect(stream)
        assert [d.finish_reason for d in deltas] == [FinishReason.CANCELLED]
    with pytest.raises(EngineClosedError):
        engine.submit(_request(lm, "late"))


async def test_drain_lets_in_flight_finish(engine: SerialEngine, lm: LanguageModel) -> None:
    """drain refuses new requests with EngineClosedError and lets in-flight ones finish."""
    stream = engine.submit(_request(lm, "inflight", max_new_tokens=200, ignore_eos=True))
    first = await anext(stream)
    drain = asyncio.create_task(engine.drain(timeout=30))
    await asyncio.sleep(0)
    with pytest.raises(EngineClosedError):
        engine.submit(_request(lm, "refused"))
    rest = await _collect(stream)
    await drain
    assert rest[-1].finish_reason is FinishReason.LENGTH
    assert len(_ids([first, *rest])) == 200


async def test_drain_timeout_cancels(engine: SerialEngine, lm: LanguageModel) -> None:
    """Requests still running when drain's timeout expires are cancelled."""
    stream = engine.submit(_request(lm, "slow", max_new_tokens=1900, ignore_eos=True))
    queued = engine.submit(_request(lm, "queued", max_new_tokens=4))
    await anext(stream)
    await engine.drain(timeout=0.05)
    deltas = await _collect(stream)
    assert deltas[-1].finish_reason is FinishReason.CANCELLED
    assert deltas[-1].completion_tokens < 1900
    assert [d.finish_reason for d in await _collect(queued)] == [FinishReason.CANCELLED]


async def test_engine_errors_reach_the_stream(lm: LanguageModel) -> None:
    """An exception in the model is raised from that request's stream; the engine keeps serving."""

    class Flaky:
        def __init__(self, model: Any) -> None:
            self.model, self.failed = model, False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.model, name)

        def __call__(self, **kwargs: Any) -> Any:
            if not self.failed:
                self.failed = True
                raise RuntimeError("boom")
            return self.model(**kwargs)

    engine = SerialEngine(lm)
    lm._hf = Flaky(lm.hf_model())
    engine.start()
    try:
        with pytest.raises(EngineFaultError) as err:  # a failed forward is the engine's fault
            await _collect(engine.submit(_request(lm, "fails")))
        assert isinstance(err.value.__cause__, RuntimeError)
        assert str(err.value.__cause__) == "boom"
        deltas = await _collect(engine.submit(_request(lm, "works", max_new_tokens=3)))
    finally:
        engine.close()
    assert deltas[-1].finish_reason is not None


async def test_stats_report_kv_and_rate(engine: SerialEngine, lm: LanguageModel) -> None:
    """Stats show KV bytes in use while running, the budget, and a positive decode rate."""
    stream = engine.submit(_request(lm, "kv", max_new_tokens=100, ignore_eos=True))
    await anext(stream)
    await anext(stream)
    stats = engine.stats()
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, layers, KV heads, head size, float32 bytes
    assert stats.kv_budget_bytes == per_token * lm.max_context_tokens
    assert stats.kv_used_bytes >= per_token * len("Once upon a time")
    await _collect(stream)
    assert engine.stats().decode_tokens_per_s > 0
    assert engine.stats().kv_used_bytes == 0
