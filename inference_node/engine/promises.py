"""Deadlines kept through preemption: a lower-class sequence is preempted only while it can
afford a pause, and a waiting one whose deadline nears goes back first.

The scheduler admits a BATCH request only when it can finish before its caller's deadline;
the engine preempts it for REALTIME when every slot is taken, and a preempted sequence waits
until no REALTIME request does. Under a REALTIME overload that can be until its deadline: in
``make bench-slo`` (overload at 4x, 2026-12-04, two runs) three BATCH streams admitted in the
first seconds of the burst were preempted two or three times each and cut by their 20-s
deadline. So each request carries the time left before its caller's deadline
(``EngineRequest.time_left_s``) and its *slack* is that time less what it still needs: its
remaining tokens at a full batch's step (``SAFETY`` times over), plus prefilling again what
preemption dropped. A sequence is preempted only while its slack is over ``MARGIN_S``; a
waiting one whose slack fell to it is *pinned*: it goes before every waiting request,
REALTIME too, and is never preempted again. A request without a deadline (a detached one, a
caller that set none) has all the slack in the world.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from inference_node.engine.sequences import BatchSequence
from inference_node.engine.step_model import StepCost

MARGIN_S = 1.0
"""Slack a sequence keeps: preempted only above it, pinned at it."""
SAFETY = 1.2
"""Times over its remaining tokens' decode is counted."""


@dataclass(frozen=True)
class Costs:
    """What a sequence still needs is priced at: seconds per generated token with a full
    batch, and per prompt token prefilled again (both 0 before the engine has a step fit:
    every sequence then has its whole time left as slack)."""

    token_s: float = 0.0
    prefill_token_s: float = 0.0

    @classmethod
    def of(cls, fit: StepCost | None, full_batch: int) -> Costs:
        """The costs a step fit gives with ``full_batch`` sequences decoding."""
        if fit is None:
            return cls()
        return cls(max(0.0, fit.predict(full_batch)), max(0.0, fit.per_prefill_token_s))


def slack_s(seq: BatchSequence, costs: Costs, now: float) -> float:
    """Seconds ``seq`` could still pause and finish before its deadline."""
    if not math.isfinite(seq.deadline):
        return math.inf
    remaining = max(0, seq.job.request.params.max_new_tokens - len(seq.text.generated))
    again = (len(seq.tokens) - seq.computed) * costs.prefill_token_s
    return seq.deadline - now - remaining * costs.token_s * SAFETY - again


def victims(
    running: Iterable[BatchSequence], rank: int, count: int, costs: Costs
) -> list[BatchSequence] | None:
    """``count`` sequences of classes below ``rank`` that can afford a pause, the lowest
    class and latest arrival first; None when fewer than that can."""
    now = time.monotonic()
    lower = [
        s
        for s in running
        if s.job.workload_class.rank > rank and not s.pinned and slack_s(s, costs, now) > MARGIN_S
    ]
    chosen = sorted(lower, key=lambda s: s.key, reverse=True)[:count]
    return chosen if len(chosen) == count else None


def pin_due(waiting: list[tuple[tuple[int, int], BatchSequence]], costs: Costs) -> None:
    """Pin every sequence of ``waiting`` (the engine's heap of (key, sequence)) below the top
    class whose slack fell to ``MARGIN_S``, and restore the heap for their new keys."""
    now = time.monotonic()
    due = [
        s
        for _, s in waiting
        if not s.pinned and not s.job.workload_class.is_top and slack_s(s, costs, now) <= MARGIN_S
    ]
    for seq in due:
        seq.pinned = True
    if due:
        waiting[:] = [(s.key, s) for _, s in waiting]
        heapq.heapify(waiting)
