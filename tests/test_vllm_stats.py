"""The vLLM node's stat logger (:class:`inference_node.engine.vllm_mapping.VllmStats`), fed
the shapes vLLM passes it (duck-typed: no vLLM in this environment), and the priority it gives
a request (:func:`inference_node.engine.vllm_mapping.priority`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from inference_node.engine.step_model import StepCost
from inference_node.engine.vllm_mapping import VllmStats, priority
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


def test_realtime_keeps_arrival_order_while_its_first_token_fits_its_budget() -> None:
    """Fit 0.1 s + 10 ms a decode row + 1 ms a prompt token, 512-token steps, 12 rows
    decoding: 1,000 prompt tokens waiting and 73 of its own take 1,073 / 500 = 2.15 steps,
    2.15 x 0.22 + 1.073 = 1.545 s, plus a whole step in flight (0.72 s): 2.26 s. Within a
    2.5-s budget REALTIME takes BATCH's rank (first come, first served with BATCH); within
    2 s it overtakes (REALTIME's rank). No budget, no fit, or another class: the class's
    rank."""
    rt, batch, ft = WorkloadClass.REALTIME, WorkloadClass.BATCH, WorkloadClass.FINETUNE
    assert priority(rt, 2.5, 1000, 73, 12, 512, COST) == batch.rank
    assert priority(rt, 2.0, 1000, 73, 12, 512, COST) == rt.rank
    assert priority(rt, 2.0, 0, 73, 12, 512, COST) == batch.rank, "nothing waits before it"
    assert priority(rt, 0.0, 0, 73, 12, 512, COST) == rt.rank
    assert priority(rt, 2.0, 0, 73, 12, 512, None) == rt.rank
    assert priority(batch, 9.0, 0, 73, 12, 512, COST) == batch.rank
    assert priority(ft, 9.0, 0, 73, 12, 512, COST) == ft.rank
    no_prompt_term = StepCost(base_s=0.1, per_sequence_s=0.01, per_prefill_token_s=0.0, samples=9)
    assert priority(rt, 9.0, 5000, 73, 12, 512, no_prompt_term) == rt.rank, "prompts unpriced"
