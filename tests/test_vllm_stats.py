"""The vLLM node's stat logger (:class:`inference_node.engine.vllm_mapping.VllmStats`), fed
the shapes vLLM passes it (duck-typed: no vLLM in this environment)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from inference_node.engine.vllm_mapping import VllmStats


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
