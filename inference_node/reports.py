"""Pieces of the node's load reports built from engine state."""

from __future__ import annotations

from inference_node.engine.step_model import StepCost
from sluice.v1 import common_pb2


def step_cost_proto(model: str, cost: StepCost) -> common_pb2.StepCost:
    """A model's fitted step cost as the load report carries it."""
    return common_pb2.StepCost(
        model=model,
        base_s=cost.base_s,
        per_sequence_s=cost.per_sequence_s,
        per_prefill_token_s=cost.per_prefill_token_s,
        samples=cost.samples,
    )
