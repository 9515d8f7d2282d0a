"""This replica's requests on nodes, for the waits admission predicts: when the running
requests a queued one waits for are predicted to end, and the pace each lower class gets.

The fluid estimate (cost ahead / service rate, :mod:`scheduler.admission`) spreads the next
free slot evenly over the running requests' work. Right after a burst filled a node every
request there has just started, and the next end is most of a request away: in
``make bench-slo`` (overload at 4x, 2026-12-04) a REALTIME request predicted to wait 1.16 s
waited 3.1 s and was then shed, a refusal 3 s late. So a request that finds no room also
waits at least until a slot is left for it once those queued before it (in the same pool,
of its class or above) took the slots the running requests it cannot preempt free: each
running request predicted to end after the tokens its tenant's requests lately use
(:meth:`~scheduler.shares.DemandMeter.expected_tokens`) less those it streamed, each queued
one to hold its slot for its own expected tokens, at the time per token the nodes show.

Below REALTIME, a stream's pace is not the nodes' time per token: the engine preempts it for
REALTIME and its prompt waits in the prefill bucket, so at 4x the same run had BATCH streams
with 4 s from dispatch to first token, cut by the caller's 20-s deadline after admission
counted 96 tokens at the REALTIME pace. :meth:`RunningBook.pace` is each lower class's
seconds per generated token from first token to end of its streams of at least
``PACE_MIN_TOKENS`` that finished lately (an exponential average, forgotten after
``PACE_STALE_S`` without one), which admission counts for their decode when it is the slower
(at most ``PACE_MAX_FACTOR`` times the nodes' time per token). Before any finished, a pace
learned on a half-empty node said nothing of the burst that filled it next: in ``make
bench-slo`` (overload 4x, 2026-12-04) BATCH admitted in the first second of the burst at
the idle node's 0.05 s per token got 0.13-0.2 s and three were cut by their deadline. So a
lower-class decode is never priced below a full node's step (:meth:`lower_token_s`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scheduler.queues import Clock, QueuedRequest
from sluice.contract import WorkloadClass

PACE_ALPHA = 0.2
"""Weight of each finished stream in a lower class's pace."""
PACE_MIN_TOKENS = 8
"""Streams shorter than this say little about a pace and are left out."""
PACE_STALE_S = 30.0
"""A pace no stream updated for this long is forgotten (0 again)."""
PACE_MAX_FACTOR = 3.0
"""A lower class's pace counts at most this many times the nodes' time per token."""
END_WAIT_HORIZON = 32
"""Queued requests :meth:`RunningBook.end_wait` lets take slots before the one it predicts
for (further back, the fluid estimate of the cost ahead is the better one, and each decision
is on the refusal path)."""
LEAK_GRACE_S = 60.0
"""A run still here this long after its deadline is dropped (its end was never told)."""


@dataclass
class _Run:
    item: QueuedRequest
    started: float
    generated: int = 0
    first_at: float | None = None


class RunningBook:
    """Requests this replica handed a node and that have not ended, by request id."""

    def __init__(
        self,
        clock: Clock,
        expected_tokens: Callable[[QueuedRequest], float],
        pool_of: Mapping[WorkloadClass, str],
        full_token_s: Callable[[str], float] | None = None,
    ) -> None:
        self._clock = clock
        self._full = full_token_s
        self._expected = expected_tokens
        self._pool_of = pool_of
        self._runs: dict[str, _Run] = {}
        self._pace: dict[tuple[str, WorkloadClass], tuple[float, float]] = {}  # (pace, at)

    def __len__(self) -> int:
        return len(self._runs)

    def started(self, item: QueuedRequest) -> None:
        """``item`` was booked on a node now."""
        self._runs[item.request_id] = _Run(item, self._clock())

    def streamed(self, item: QueuedRequest, tokens: int) -> None:
        """``item`` streamed ``tokens`` more generated tokens."""
        run = self._runs.get(item.request_id)
        if run is not None:
            if run.first_at is None:
                run.first_at = self._clock()
            run.generated += tokens

    def ended(self, item: QueuedRequest, generated: int | None) -> None:
        """``item`` ended; ``generated``: its tokens when it ran to its end (a lower class's
        pace learns from it)."""
        run = self._runs.pop(item.request_id, None)
        if run is None or item.workload_class.is_top or run.first_at is None:
            return
        if generated is None or generated < PACE_MIN_TOKENS:
            return
        now = self._clock()
        pace = (now - run.first_at) / (generated - 1)
        key = (item.model, item.workload_class)
        old = self._pace.get(key)
        if old is not None and now - old[1] < PACE_STALE_S:
            pace = old[0] + PACE_ALPHA * (pace - old[0])
        self._pace[key] = (pace, now)

    def pace(self, model: str, workload_class: WorkloadClass, token_s: float) -> float:
        """Seconds per generated token the class's streams got lately, first token to end, at
        most ``PACE_MAX_FACTOR`` x ``token_s`` (0: none lately, or REALTIME, which the
        nodes' time per token describes)."""
        known = self._pace.get((model, workload_class))
        if known is None or self._clock() - known[1] >= PACE_STALE_S:
            return 0.0
        return min(known[0], PACE_MAX_FACTOR * token_s) if token_s > 0 else known[0]

    def lower_token_s(self, model: str, workload_class: WorkloadClass, token_s: float) -> float:
        """Seconds per token a lower-class request's decode is priced at: the slowest of the
        nodes' ``token_s`` now, the class's :meth:`pace` and a full node's step
        (``full_token_s``): what it gets if higher classes fill the node once it started."""
        full = self._full(model) if self._full is not None else 0.0
        return max(token_s, self.pace(model, workload_class, token_s), full)

    def end_wait(
        self,
        model: str,
        workload_class: WorkloadClass,
        before: Sequence[QueuedRequest],
        token_s: float,
    ) -> float:
        """Seconds until a slot is left for a ``workload_class`` request of ``model`` once
        ``before`` (queued ahead of it, in order) took the slots that the running requests
        it cannot preempt (its class and those above, in its pool) free, every time at
        ``token_s`` per token; 0 when nothing is known or none of those runs."""
        if token_s <= 0:
            return 0.0
        now, rank, pool = self._clock(), workload_class.rank, self._pool_of.get(workload_class)
        ends: list[float] = []
        for rid, run in list(self._runs.items()):
            item = run.item
            if item.deadline < now - LEAK_GRACE_S:
                del self._runs[rid]
            elif (
                item.model == model
                and item.workload_class.rank <= rank
                and self._pool_of.get(item.workload_class) == pool
            ):
                ends.append(max(0.0, self._expected(item) - run.generated) * token_s)
        if not ends:
            return 0.0
        heapq.heapify(ends)
        for queued in before[:END_WAIT_HORIZON]:  # each takes the next slot that frees
            freed = heapq.heappop(ends)
            heapq.heappush(ends, freed + self._expected(queued) * token_s)
        return ends[0]
