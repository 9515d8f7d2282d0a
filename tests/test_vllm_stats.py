"""The vLLM node's stat logger (:class:`inference_node.engine.vllm_mapping.VllmStats`), fed
the shapes vLLM passes it (duck-typed: no vLLM in this environment)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from inference_node.engine.vllm_mapping import VllmStats


def test_steps_fit_the_step_time_against_decode_rows_and_prompt_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Steps timed by the gaps between vLLM's outputs (20 ms + 5 ms a row + 1 ms a prompt
    token) give the same fit the built-in engine publishes, once enough steps were seen; an
    idle engine's first output, and outputs with no token, time nothing."""
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    stats = VllmStats()
    busy = SimpleNamespace(num_running_reqs=4, num_waiting_reqs=0, kv_cache_usage=0.1)
    stats.record(busy, None)  # becomes busy: nothing timed yet
    for i in range(64):
        rows, prompt = 1 + i % 8, (i * 7) % 40
        now[0] += 0.020 + 0.005 * rows + 0.001 * prompt
        stats.record(busy, SimpleNamespace(num_generation_tokens=rows, num_prompt_tokens=prompt))
    cost = stats.step_model.cost
    assert cost is not None
    assert cost.base_s == pytest.approx(0.020, abs=1e-3)
    assert cost.per_sequence_s == pytest.approx(0.005, abs=2e-4)
    assert cost.per_prefill_token_s == pytest.approx(0.001, abs=1e-4)
    assert stats.decode_rate > 0
