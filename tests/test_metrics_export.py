"""Metrics read at scrape time: the engine's step-time histogram as the node exports it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from inference_node.engine.step_times import StepTimes
from inference_node.engine.types import EngineStats
from inference_node.metrics import EngineCollector
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
