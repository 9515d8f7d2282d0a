"""Metrics read at scrape time: the engine's step-time histogram as the node exports it, the
training counters from zero, the step-cost fit load reports carry."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry

from inference_node.engine.step_model import StepModel
from inference_node.engine.step_times import StepTimes
from inference_node.engine.types import EngineStats
from inference_node.metrics import EngineCollector, TrainingMetrics
from sluice.contract import WorkloadClass


def test_step_times_are_a_cumulative_histogram_the_node_exports_per_model() -> None:
    """Each step lands in the first bucket whose bound is not below it; the export is
    cumulative with ``+Inf`` equal to the count, and the sum is the steps' seconds."""
    times = StepTimes((0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 2.0):
        times.observe(seconds)
    snap = times.snapshot()
    assert snap.buckets == ((0.01, 2), (0.1, 3), (float("inf"), 4))
    assert snap.count == 4 and abs(snap.sum_s - 2.065) < 1e-9
    zero = dict.fromkeys(WorkloadClass, 0)
    stats = EngineStats(zero, zero, 0, 1, 0.0, 0, steps=snap)
    untimed = EngineStats(zero, zero, 0, 1, 0.0, 0)
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: {"m": stats, "other": untimed}))
    value = registry.get_sample_value
    assert value("sluice_node_step_seconds_bucket", {"model": "m", "le": "0.1"}) == 3
    assert value("sluice_node_step_seconds_bucket", {"model": "m", "le": "+Inf"}) == 4
    assert value("sluice_node_step_seconds_count", {"model": "m"}) == 4
    assert value("sluice_node_step_seconds_count", {"model": "other"}) is None


def test_training_counters_exist_at_zero_before_the_first_event() -> None:
    """A node's training counters have every model's series from the start, at 0 (the live
    dashboards and alerts read them before the first checkpoint)."""
    registry = CollectorRegistry()
    TrainingMetrics(registry).start_at_zero(["m"])
    for name in ("tokens", "steps", "checkpoints"):
        value = registry.get_sample_value(f"sluice_node_training_{name}_total", {"model": "m"})
        assert value == 0


def test_the_step_model_recovers_a_linear_step_cost_and_keeps_terms_non_negative() -> None:
    """Steps costing 20 ms + 3 ms a sequence + 0.5 ms a prefilled token (with noise) fit
    back to about those, warm-up steps and a stall left out; a cost that falls with prefill
    tokens drops that term rather than predict cheaper steps for more work; nothing is
    published before 16 steps, nor while the rows never varied (an engine that never batched
    says nothing of what one more sequence costs)."""
    rng = random.Random(5)
    model = StepModel(window=256, refit_every=8)
    for _ in range(8):
        model.observe(2.0, 1, 0)  # warm-up: compilation, allocation
    for _ in range(40):
        model.observe(0.02, 1, 0)
    assert model.cost is None  # one row each time: no slope to read
    model.observe(3.0, 16, 0)  # a stall: clipped to 5x the median
    for _ in range(256):
        rows, tokens = rng.randint(1, 32), rng.choice([0, 0, 0, 64, 128])
        model.observe(0.020 + 0.003 * rows + 0.0005 * tokens + rng.gauss(0, 0.001), rows, tokens)
    cost = model.cost
    assert cost is not None and cost.samples == 256  # the window
    assert abs(cost.base_s - 0.020) < 0.002
    assert abs(cost.per_sequence_s - 0.003) < 0.0002
    assert abs(cost.per_prefill_token_s - 0.0005) < 0.00005
    assert abs(cost.predict(10, 64) - (0.020 + 0.030 + 0.032)) < 0.003
    falling = StepModel(refit_every=1, skip=0)
    for i in range(64):
        rows, tokens = 1 + i % 8, 16 * (i % 4)
        falling.observe(0.05 + 0.002 * rows - 0.0001 * tokens, rows, tokens)
    assert falling.cost is not None and falling.cost.per_prefill_token_s == 0
    assert falling.cost.per_sequence_s > 0


def test_the_timed_terms_keep_the_full_chunk_steps_the_median_clip_cuts() -> None:
    """Decode steps of 50-65 ms and one step in eight prefilling a full 512-token chunk at
    1.1 ms a token (0.6 s, as on vLLM's CPU engine): the median clip cuts those steps to
    about 0.3 s and prices a prompt token at about half its cost; the ``timed`` terms bound
    each step by its own work's cost and recover it. A stall is still clipped there."""
    rng = random.Random(7)
    model = StepModel(window=256, refit_every=8, skip=0)
    model.observe(30.0, 20, 0)  # a stall
    for i in range(256):
        rows, tokens = rng.randint(20, 30), 512 if i % 8 == 0 else 0
        model.observe(0.02 + 0.0015 * rows + 0.0011 * tokens + rng.gauss(0, 0.002), rows, tokens)
    cost = model.cost
    assert cost is not None and cost.timed is not None
    assert cost.per_prefill_token_s < 0.0007  # the median clip
    assert abs(cost.timed.per_prefill_token_s - 0.0011) < 0.0001
    assert cost.timed.predict(25, 512) == pytest.approx(0.02 + 0.0015 * 25 + 0.0011 * 512, rel=0.05)
    assert cost.predict(25, 512) < 0.4
    assert cost.timed.samples == cost.samples == 256 and cost.timed.timed is None
