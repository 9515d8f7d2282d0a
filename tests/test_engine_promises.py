"""Deadlines kept through preemption (:mod:`inference_node.engine.promises`): a lower-class
sequence that cannot afford a pause before its caller's deadline is not preempted, and a
waiting one whose deadline nears goes before waiting REALTIME. Stepped by hand, with a fixed
step fit (0.1 s a step), so every slack is known."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from inference_node.engine import BatchingConfig, BatchingEngine, DeltaStream, EngineRequest
from inference_node.engine.promises import Costs, time_left
from inference_node.engine.step_model import StepCost
from inference_node.models import LanguageModel, load_language_model
from sluice.contract import WorkloadClass
from tests.test_engine_batching import collect, hf_greedy, ids_of, prompts, request

RT, BATCH = WorkloadClass.REALTIME, WorkloadClass.BATCH
STEP = StepCost(base_s=0.1, per_sequence_s=0.0, per_prefill_token_s=0.0, samples=64)


@pytest.fixture
def lm(tmp_path: Path) -> LanguageModel:
    return load_language_model("tiny-random-llama", cache_dir=tmp_path)


def engine_of(lm: LanguageModel, slots: int) -> BatchingEngine:
    engine = BatchingEngine(lm, BatchingConfig(max_sequences=slots, kv_budget_bytes=64 * 1024**2))
    engine.step_model.cost = STEP
    return engine


def with_deadline(req: EngineRequest, seconds: float) -> EngineRequest:
    return dataclasses.replace(req, time_left_s=seconds)


def running_ids(engine: BatchingEngine) -> set[str]:
    return {s.job.request.request_id for s in engine._slots if s is not None}


async def test_preemption_spares_a_sequence_that_cannot_afford_a_pause(lm: LanguageModel) -> None:
    """Two BATCH sequences fill both slots: the later one has 5 s to make 40 tokens (4.8 s
    at 0.1 s a step, 1.2 times over), the earlier one all the time it wants. REALTIME
    preempts the earlier one, not the latest arrival as before; every output is exact."""
    engine = engine_of(lm, 2)
    loose, tight, rt = prompts(lm, [10, 12, 6], seed=3)
    streams: dict[str, DeltaStream] = {}
    try:
        streams["loose"] = engine.submit(request("loose", loose, 40, BATCH))
        streams["tight"] = engine.submit(with_deadline(request("tight", tight, 40, BATCH), 5.0))
        assert engine._intake()
        engine._step()
        assert running_ids(engine) == {"loose", "tight"}
        streams["rt"] = engine.submit(request("rt", rt, 8))
        assert engine._intake()
        engine._step()
        assert running_ids(engine) == {"tight", "rt"}
        assert engine.stats().pinned == 1
        engine.start()
        results = dict(
            zip(streams, await asyncio.gather(*(collect(s) for s in streams.values())), strict=True)
        )
    finally:
        engine.close()
    assert ids_of(results["loose"]) == hf_greedy(lm, loose, 40)
    assert ids_of(results["tight"]) == hf_greedy(lm, tight, 40)
    assert ids_of(results["rt"]) == hf_greedy(lm, rt, 8)


async def test_a_waiting_sequence_whose_deadline_nears_goes_before_waiting_realtime(
    lm: LanguageModel,
) -> None:
    """One slot, held by REALTIME. BATCH with 1.5 s for 5 tokens (0.6 s needed: slack under
    the margin) is pinned and takes the slot when it frees, before a REALTIME request that
    came earlier; BATCH without a deadline stays behind REALTIME."""
    engine = engine_of(lm, 1)
    first, late, urgent, calm = prompts(lm, [6, 6, 6, 6], seed=5)
    streams: list[DeltaStream] = []
    order: list[str] = []
    try:
        streams.append(engine.submit(request("first", first, 2)))
        assert engine._intake()
        engine._step()
        order += running_ids(engine)
        streams.append(engine.submit(request("late", late, 2)))
        streams.append(engine.submit(request("calm", calm, 2, BATCH)))
        streams.append(engine.submit(with_deadline(request("urgent", urgent, 5, BATCH), 1.5)))
        for _ in range(40):
            engine._intake()
            engine._step()
            order += [rid for rid in running_ids(engine) if rid not in order]
            if len(order) == 4:
                break
        engine.start()
        await asyncio.gather(*(collect(s) for s in streams))
    finally:
        engine.close()
    assert order == ["first", "urgent", "late", "calm"]


async def test_a_running_sequence_is_pinned_once_its_slack_runs_out(lm: LanguageModel) -> None:
    """One slot, BATCH with all the time it wants: its caller's deadline then comes to 5 s
    away (40 tokens need 4.8): it is pinned as it runs, REALTIME waits for its end instead of
    preempting it, and the load report counts it."""
    engine = engine_of(lm, 1)
    batch, rt = prompts(lm, [10, 6], seed=9)
    streams: list[DeltaStream] = []
    try:
        streams.append(engine.submit(request("b", batch, 40, BATCH)))
        assert engine._intake()
        engine._step()
        (seq,) = [s for s in engine._slots if s is not None]
        assert not seq.pinned
        seq.job.deadline = time.monotonic() + 5.0
        streams.append(engine.submit(request("rt", rt, 4)))
        assert engine._intake()
        engine._step()
        assert seq.pinned and running_ids(engine) == {"b"}
        stats = engine.stats()
        assert stats.pinned == 1 and stats.waiting[RT] == 1
        engine.start()
        results = await asyncio.gather(*(collect(s) for s in streams))
    finally:
        engine.close()
    assert ids_of(results[0]) == hf_greedy(lm, batch, 40)
    assert ids_of(results[1]) == hf_greedy(lm, rt, 4)


async def test_a_pinned_request_takes_its_slot_from_its_own_class_when_it_can_afford_it(
    lm: LanguageModel,
) -> None:
    """Both slots hold BATCH without deadlines; BATCH whose deadline is near arrives pinned
    and preempts the later of them rather than wait behind every running stream."""
    engine = engine_of(lm, 2)
    first, second, urgent = prompts(lm, [8, 8, 8], seed=13)
    streams: list[DeltaStream] = []
    try:
        streams.append(engine.submit(request("first", first, 30, BATCH)))
        streams.append(engine.submit(request("second", second, 30, BATCH)))
        assert engine._intake()
        engine._step()
        streams.append(engine.submit(with_deadline(request("urgent", urgent, 5, BATCH), 1.5)))
        assert engine._intake()
        engine._step()
        assert running_ids(engine) == {"first", "urgent"}
        engine.start()
        results = await asyncio.gather(*(collect(s) for s in streams))
    finally:
        engine.close()
    for ids, n, deltas in zip((first, second, urgent), (30, 30, 5), results, strict=True):
        assert ids_of(deltas) == hf_greedy(lm, ids, n)


def test_needs_are_priced_at_a_full_batch_s_step() -> None:
    """Without a fit nothing is priced (a sequence's slack is its time left); with one, a
    token costs the step of a full batch (every slot, or the batch the tightest step budget
    there allows) and a prompt token its fitted prefill cost; an expired deadline is kept
    as the least time left, none as none."""
    assert Costs.of(None, 32) == Costs()
    fit = StepCost(0.05, 0.01, 0.002, 64)
    costs = Costs.of(fit, 10)
    assert costs.token_s == pytest.approx(0.15) and costs.prefill_token_s == pytest.approx(0.002)
    assert Costs.of(fit, 32, [0.0, 1.0, 0.16]).token_s == pytest.approx(0.16)
    loaded = Costs.of(fit, 10, prefill_per_step=25.0)
    assert loaded.token_s == pytest.approx(0.2), "steps carry 25 prompt tokens lately"
    assert loaded.slot_wait_s == 0.0, "nothing runs: a slot is free"
    assert time_left(None) == 0.0 and time_left(0.0) > 0 and time_left(3.5) == 3.5


async def test_a_full_node_of_sequences_it_cannot_displace_prices_the_wait_for_a_slot(
    lm: LanguageModel,
) -> None:
    """Two slots held by REALTIME asking 3 and 8 tokens: after the first step (2 and 7 left)
    a slot frees in 2 steps (0.2 s at 0.1 s a step), after the second in 1, which a
    lower-class sequence's slack counts (it waits that long once preempted). With an
    unpinned BATCH sequence in one of them a pinned one would take its slot: no wait."""
    a, b, c = prompts(lm, [6, 6, 6], seed=5)
    for pair, waits in (
        ((request("rt1", a, 3), request("rt2", b, 8)), (0.2, 0.1)),
        ((request("rt", a, 8), request("b", c, 8, BATCH)), (0.0, 0.0)),
    ):
        engine = engine_of(lm, 2)
        streams = [engine.submit(r) for r in pair]  # held: a dropped stream cancels its request
        try:
            assert engine._intake()
            for wait in waits:
                engine._step()
                assert engine._costs().slot_wait_s == pytest.approx(wait)
        finally:
            for stream in streams:
                await stream.aclose()
            engine.close()
