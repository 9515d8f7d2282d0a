"""How many sequences a node may decode together and still meet an inter-token target.

A node fits its step time as ``base + per_sequence × sequences`` (+ prompt tokens prefilled,
:mod:`inference_node.engine.step_model`) and publishes the fit in its load reports. A
sequence's *step budget* is the longest decode step its inter-token target allows (the
scheduler sends it with the request: the target times its ``itl_step_share``, the rest left
for the prefills that share steps). The node's batch may hold at most :func:`batch_limit`
sequences for the tightest budget among those it runs; the scheduler counts the same limit
before it sends one more (docs/decisions/scheduler-itl-guard.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol


class StepFit(Protocol):
    """A fitted step time: the node's :class:`~inference_node.engine.step_model.StepCost` or
    a load report's ``StepCost``."""

    @property
    def base_s(self) -> float: ...

    @property
    def per_sequence_s(self) -> float: ...


def batch_limit(base_s: float, per_sequence_s: float, budget_s: float) -> int | None:
    """Most sequences whose predicted step fits ``budget_s`` (at least 1: a sequence alone is
    never refused for being slow); None when the fit sets no limit (no budget, or a step
    that does not grow with sequences)."""
    if not 0 < budget_s < math.inf or not 0 < per_sequence_s < math.inf:
        return None
    fits = (budget_s - base_s) / per_sequence_s + 1e-6
    return max(1, math.floor(fits)) if math.isfinite(fits) else None


def tightest(budgets: Iterable[float]) -> float:
    """The smallest positive finite budget of ``budgets`` (0 when none is set: 0, negative,
    NaN and infinite budgets set none)."""
    return min((b for b in budgets if 0 < b < math.inf), default=0.0)


def fitted_limit(fit: StepFit | None, budgets: Iterable[float]) -> int | None:
    """:func:`batch_limit` of ``fit`` for the tightest of ``budgets``; None without a fit or
    a budget."""
    if fit is None:
        return None
    return batch_limit(fit.base_s, fit.per_sequence_s, tightest(budgets))


def full_step_s(fit: StepFit, slots: int, budgets: Iterable[float] = ()) -> float:
    """Seconds of a decode step by ``fit`` with the node full: ``slots`` sequences, or the
    batch the tightest of ``budgets`` allows when that is fewer (the scheduler prices a
    lower-class request's decode at it, the node a sequence's remaining tokens)."""
    limit = fitted_limit(fit, budgets)
    full = slots if limit is None else min(slots, limit)
    return fit.base_s + fit.per_sequence_s * full


class PrefillFit(StepFit, Protocol):
    """One model's step fit that also prices each prompt token prefilled in the step (a load
    report's ``StepCost``: the scheduler predicts a prompt's prefill from it)."""

    @property
    def model(self) -> str: ...

    @property
    def per_prefill_token_s(self) -> float: ...
