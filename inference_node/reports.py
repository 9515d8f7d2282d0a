"""Pieces of the node's load reports built from engine state."""

from __future__ import annotations

from inference_node.engine.step_model import StepCost
from inference_node.engine.types import EngineStats
from sluice.contract import WorkloadClass
from sluice.v1 import common_pb2


def step_cost_proto(model: str, cost: StepCost) -> common_pb2.StepCost:
    """A model's fitted step cost as the load report carries it (its ``timed`` terms under
    no model name)."""
    return common_pb2.StepCost(
        model=model,
        base_s=cost.base_s,
        per_sequence_s=cost.per_sequence_s,
        per_prefill_token_s=cost.per_prefill_token_s,
        samples=cost.samples,
        timed=step_cost_proto("", cost.timed) if cost.timed is not None else None,
    )


def add_engine_stats(
    report: common_pb2.LoadReport,
    model: str,
    stats: EngineStats,
    running: dict[WorkloadClass, int],
    waiting: dict[WorkloadClass, int],
) -> None:
    """Add one generation engine's ``stats`` (serving ``model``) to ``report``: its step cost,
    queue and prefix cache under the model's name, the rest summed (its sequences into
    ``running`` and ``waiting`` by class, which the caller writes out)."""
    if stats.step_cost is not None:
        report.step_costs.append(step_cost_proto(model, stats.step_cost))
    for cls, n in stats.running.items():
        running[cls] = running.get(cls, 0) + n
    for cls, n in stats.waiting.items():
        waiting[cls] = waiting.get(cls, 0) + n
    report.kv_used_bytes += stats.kv_used_bytes
    report.kv_budget_bytes += stats.kv_budget_bytes
    report.decode_tokens_per_s += stats.decode_tokens_per_s
    report.queued_tokens += stats.queued_tokens
    report.pinned_sequences += stats.pinned
    if stats.realtime_ahead_tokens is not None:
        report.realtime_prefill_ahead_tokens[model] = stats.realtime_ahead_tokens
    if stats.prefix_hit_ratio is not None:
        report.prefix_cache_hit_ratio[model] = stats.prefix_hit_ratio
