"""Deadlines kept through preemption: a lower-class sequence is preempted only while it can
afford a pause, and a waiting one whose deadline nears goes back first.

The scheduler admits a BATCH request only when it can finish before its caller's deadline;
the engine preempts it for REALTIME when every slot is taken, and a preempted sequence waits
until no REALTIME request does. Under a REALTIME overload that can be until its deadline: in
``make bench-slo`` (overload at 4x, 2026-12-04, two runs) three BATCH streams admitted in the
first seconds of the burst were preempted two or three times each and cut by their 20-s
deadline. So each request carries the time left before its caller's deadline
(``EngineRequest.time_left_s``) and its *slack* is that time less what it still needs: its
remaining tokens at a full batch's step with the prompt tokens steps carried lately
(``SAFETY`` times over), plus, as if it were preempted now, prefilling again what preemption
would drop and waiting for a slot (while every slot is taken, until the running sequence
nearest its end ends). A sequence is preempted only while its slack is over ``MARGIN_S``; a
waiting one whose slack fell to it is *pinned*: it goes before every waiting request,
REALTIME too, and is never preempted again. A request without a deadline (a detached one, a
caller that set none) has all the slack in the world.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from inference_node.engine.sequences import BatchSequence
from inference_node.engine.step_model import StepCost
from sluice.itl import fitted_limit, full_step_s

MARGIN_S = 1.0
"""Slack a sequence keeps: preempted only above it, pinned at it."""
SAFETY = 1.2
"""Times over its remaining tokens' decode is counted."""


def time_left(remaining: float | None) -> float:
    """``EngineRequest.time_left_s`` for a call whose gRPC ``time_remaining()`` is
    ``remaining`` (None: no deadline; 0: already passed, kept as the least time left)."""
    return 0.0 if remaining is None else max(remaining, 1e-3)


@dataclass(frozen=True)
class Costs:
    """What a sequence still needs is priced at: seconds per generated token with a full
    batch, per prompt token prefilled again, and the wait for a slot (all 0 before the engine
    has a step fit: every sequence then has its whole time left as slack)."""

    token_s: float = 0.0
    prefill_token_s: float = 0.0
    slot_wait_s: float = 0.0

    @classmethod
    def of(
        cls,
        fit: StepCost | None,
        slots: int,
        budgets: Iterable[float] = (),
        prefill_per_step: float = 0.0,
        running: Iterable[BatchSequence] = (),
    ) -> Costs:
        """The costs a step fit gives with the node full: ``slots`` sequences, or the batch
        the tightest of ``budgets`` (the step budgets of the requests there) allows, each
        step also prefilling ``prefill_per_step`` prompt tokens (what steps carried lately:
        under a REALTIME overload new prompts ride along every step). While ``running``
        fills that batch with sequences a pinned one cannot take a slot from (top class, or
        pinned), a slot frees when the one of them nearest its end ends."""
        if fit is None:
            return cls()
        budgets = list(budgets)
        prefill_token_s = max(0.0, fit.per_prefill_token_s)
        token_s = max(0.0, full_step_s(fit, slots, budgets)) + prefill_token_s * prefill_per_step
        held = [s for s in running if s.pinned or s.job.workload_class.is_top]
        full = len(held) >= min(slots, fitted_limit(fit, budgets) or slots) > 0
        return cls(token_s, prefill_token_s, min(map(_remaining, held)) * token_s if full else 0)


def _remaining(seq: BatchSequence) -> int:
    return max(0, seq.job.request.params.max_new_tokens - len(seq.text.generated))


def slack_s(seq: BatchSequence, costs: Costs, now: float) -> float:
    """Seconds ``seq`` could still pause and finish before its deadline: its remaining tokens
    and, as if it were preempted now, the wait for a slot and its whole prompt and output
    prefilled again."""
    if not math.isfinite(seq.deadline):
        return math.inf
    again = len(seq.tokens) * costs.prefill_token_s + costs.slot_wait_s
    return seq.deadline - now - _remaining(seq) * costs.token_s * SAFETY - again


def victims(running: Iterable[BatchSequence], rank: int, count: int) -> list[BatchSequence] | None:
    """``count`` sequences of classes below ``rank`` that can afford a pause (unpinned: call
    :func:`pin_due` first in the same step), the lowest class and latest arrival first; None
    when fewer than that can."""
    lower = [s for s in running if s.job.workload_class.rank > rank and not s.pinned]
    chosen = sorted(lower, key=lambda s: s.key, reverse=True)[:count]
    return chosen if len(chosen) == count else None


def pin_due(
    waiting: list[tuple[tuple[int, int], BatchSequence]],
    running: Iterable[BatchSequence],
    costs: Callable[[], Costs],
) -> None:
    """Pin every sequence below the top class, running or in ``waiting`` (the engine's heap of
    (key, sequence)), whose slack fell to ``MARGIN_S`` before its deadline passed (one past
    it is lost either way and holds nobody back), and restore the heap for the new keys.
    ``costs`` is asked only when some such sequence has a deadline (a step without one pays
    a scan of flags, no pricing)."""
    now = time.monotonic()
    open_ = [
        s
        for s in [*running, *(s for _, s in waiting)]
        if not s.pinned and not s.job.workload_class.is_top and now < s.deadline < math.inf
    ]
    if not open_:
        return
    priced = costs()
    due = [s for s in open_ if slack_s(s, priced, now) <= MARGIN_S]
    for seq in due:
        seq.pinned = True
    if due:
        waiting[:] = [(s.key, s) for _, s in waiting]
        heapq.heapify(waiting)
