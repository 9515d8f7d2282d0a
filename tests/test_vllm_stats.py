"""The vLLM node's stat logger (:class:`inference_node.engine.vllm_mapping.VllmStats`), fed
the shapes vLLM passes it (duck-typed: no vLLM in this environment), and where a prompt goes
in vLLM's priority queue (:func:`inference_node.engine.vllm_mapping.placement`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from inference_node.engine.step_model import StepCost
from inference_node.engine.vllm_mapping import Placement, VllmStats, Waiting, placement
from sluice.contract import WorkloadClass


def _stats(rows: int, prompt: int, elapsed_ms: float, dummy: bool = False) -> SimpleNamespace:
    details = SimpleNamespace(
        num_generation_requests=rows,
        num_ctx_tokens=prompt,
        elapsed_ms=elapsed_ms,
        is_dummy=dummy,
    )
    return SimpleNamespace(
        num_running_reqs=rows, num_waiting_reqs=0, kv_cache_usage=0.1, iteration_details=details
    )


def test_steps_fit_the_step_time_against_decode_rows_and_prompt_tokens() -> None:
    """Each step's engine time from vLLM's iteration details (20 ms + 5 ms a decode row + 1 ms
    a prompt token, chunks counted as scheduled) gives the fit the built-in engine publishes;
    dummy iterations and stats without details count nothing."""
    stats = VllmStats()
    stats.record(_stats(3, 0, 500.0, dummy=True), None)
    stats.record(SimpleNamespace(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0), None)
    for i in range(64):
        rows, prompt = 1 + i % 8, (i * 7) % 40
        stats.record(_stats(rows, prompt, 20.0 + 5.0 * rows + 1.0 * prompt), None)
    cost = stats.step_model.cost
    assert cost is not None
    assert cost.base_s == pytest.approx(0.020, abs=1e-3)
    assert cost.per_sequence_s == pytest.approx(0.005, abs=2e-4)
    assert cost.per_prefill_token_s == pytest.approx(0.001, abs=1e-4)


COST = StepCost(base_s=0.1, per_sequence_s=0.01, per_prefill_token_s=0.001, samples=64)
RT, BATCH, FT = WorkloadClass.REALTIME, WorkloadClass.BATCH, WorkloadClass.FINETUNE


def _place(budget: float, waiting: list[Waiting], ahead: int = 0, **kw: object) -> Placement:
    cls = kw.get("cls", RT)
    cost = kw.get("cost", COST)
    assert isinstance(cls, WorkloadClass)
    assert cost is None or isinstance(cost, StepCost)
    return placement(cls, budget, 73, waiting, ahead, 12, 512, cost, now=11.0)


def test_realtime_goes_as_late_among_waiting_batch_as_its_first_token_budget_allows() -> None:
    """Fit 0.1 s + 10 ms a decode row + 1 ms a prompt token, 512-token steps, 12 rows: a step
    prefills 500 prompt tokens in 0.22 s + 1 ms each, plus one whole step in flight (0.72 s).
    BATCH prompts of 400 and 600 tokens wait; a 73-token REALTIME prompt's first token behind
    both: 1,073 / 500 steps x 0.22 + 1.073 + 0.72 = 2.27 s; behind the first only: 1.41 s;
    ahead of both: 1.01 s. It takes BATCH's rank and a key at the latest of those places
    within its budget (first come, first served where that fits), else REALTIME's rank."""
    waiting = [Waiting(10.0, False, 400), Waiting(10.5, False, 600)]
    assert _place(2.5, waiting) == Placement(BATCH.rank, 11.0)
    assert _place(2.0, waiting) == Placement(BATCH.rank, pytest.approx(10.5 - 1e-6))
    assert _place(1.2, waiting) == Placement(RT.rank, 11.0), "ahead of both"
    assert _place(0.5, waiting) == Placement(RT.rank, 11.0), "nothing fits: ahead of all BATCH"
    assert _place(2.0, [], ahead=500) == Placement(RT.rank, 11.0), "nothing to wait behind"


def test_realtime_never_goes_ahead_of_a_waiting_realtime_prompt() -> None:
    """A REALTIME prompt placed behind BATCH counted on the prompts ahead of it: a later one
    goes behind it even when its own budget is short or it has none (then right behind it:
    a REALTIME prompt taking REALTIME's rank would go ahead of it)."""
    waiting = [Waiting(10.0, False, 400), Waiting(10.2, True, 100), Waiting(10.5, False, 600)]
    assert _place(1.2, waiting) == Placement(BATCH.rank, pytest.approx(10.5 - 1e-6))
    assert _place(0.0, waiting) == Placement(BATCH.rank, pytest.approx(10.5 - 1e-6))
    assert _place(9.0, waiting, cost=None) == Placement(BATCH.rank, pytest.approx(10.5 - 1e-6))
    assert _place(9.0, waiting) == Placement(BATCH.rank, 11.0)


def test_without_a_budget_a_fit_or_realtime_a_prompt_takes_its_class_rank() -> None:
    """With no REALTIME prompt waiting."""
    waiting = [Waiting(10.0, False, 400)]
    assert _place(0.0, waiting) == Placement(RT.rank, 11.0)
    assert _place(2.0, waiting, cost=None) == Placement(RT.rank, 11.0)
    unpriced = StepCost(base_s=0.1, per_sequence_s=0.01, per_prefill_token_s=0.0, samples=9)
    assert _place(9.0, waiting, cost=unpriced) == Placement(RT.rank, 11.0), "prompts unpriced"
    assert _place(9.0, waiting, cls=BATCH) == Placement(BATCH.rank, 11.0)
    assert _place(9.0, waiting, cls=FT) == Placement(FT.rank, 11.0)


def test_realtime_prompts_placed_one_behind_another_keep_distinct_keys_in_order() -> None:
    """Six REALTIME prompts without a budget, each right behind the last, ahead of a BATCH
    prompt: their keys stay strictly between their neighbours' (the engine's keys count
    seconds from its start, where a float step is tiny), so vLLM keeps their order."""
    now = 1234.5
    waiting = [Waiting(now - 0.5, False, 400), Waiting(now - 0.4, False, 600)]
    assert _place(0.0, waiting) == Placement(RT.rank, 11.0), "nothing REALTIME waits: its rank"
    waiting.insert(0, Waiting(now - 0.6, True, 73))  # as if it had gone in BATCH's band
    for _ in range(6):
        p = placement(RT, 0.0, 73, waiting, 0, 12, 512, COST, now=now)
        assert p.priority == BATCH.rank
        index = next(i for i, w in enumerate(waiting) if w.key > p.key)
        assert waiting[index - 1].key < p.key < waiting[index].key
        assert waiting[index - 1].realtime and not waiting[index].realtime
        waiting.insert(index, Waiting(p.key, True, 73))
    assert [w.realtime for w in waiting] == [True] * 7 + [False, False]


def test_a_prompt_waits_only_behind_prompts_vllm_has_seats_for() -> None:
    """32 seats, 12 rows running: 19 waiting prompts can start beside it; a budget that
    would fit behind 25 BATCH prompts of 10 tokens places it behind 19."""
    waiting = [Waiting(10.0 + i / 100, False, 10) for i in range(25)]
    assert _place(9.0, waiting) == Placement(BATCH.rank, 11.0)
    full = placement(RT, 9.0, 73, waiting, 0, 12, 512, COST, now=11.0, seats=32)
    assert full == Placement(BATCH.rank, pytest.approx(10.19 - 1e-6))
