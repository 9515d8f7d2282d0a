"""This replica's requests on nodes, for the waits admission predicts: when the running
requests a queued one waits for are predicted to end, and the pace each lower class gets.

The fluid estimate (cost ahead / service rate, :mod:`scheduler.admission`) spreads the next
free slot evenly over the running requests' work. Right after a burst filled a node every
request there has just started, and the next end is most of a request away: in
``make bench-slo`` (overload at 4x, 2026-12-04) a REALTIME request predicted to wait 1.16 s
waited 3.1 s and was then shed, a refusal 3 s late. So a request that finds no room also
waits at least until as many of the running requests it cannot preempt have ended as there
are queued before it, plus one: each predicted to end after the tokens its tenant's
requests lately use (:meth:`~scheduler.shares.DemandMeter.expected_tokens`) less those it
streamed, at the time per token the nodes show.

Below REALTIME, a stream's pace is not the nodes' time per token: the engine preempts it for
REALTIME and its prompt waits in the prefill bucket, so at 4x the same run had BATCH streams
with 4 s from dispatch to first token, cut by the caller's 20-s deadline after admission
counted 96 tokens at the REALTIME pace. :meth:`RunningBook.pace` is each lower class's
seconds per generated token from dispatch to end of its streams that finished lately (an
exponential average), which admission counts for their decode when it is the slower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scheduler.queues import Clock, QueuedRequest
from sluice.contract import WorkloadClass

PACE_ALPHA = 0.2
"""Weight of each finished stream in a lower class's pace."""


@dataclass
class _Run:
    item: QueuedRequest
    started: float
    generated: int = 0


class RunningBook:
    """Requests this replica handed a node and that have not ended, by request id."""

    def __init__(self, clock: Clock, expected_tokens: Callable[[QueuedRequest], float]) -> None:
        self._clock = clock
        self._expected = expected_tokens
        self._runs: dict[str, _Run] = {}
        self._pace: dict[tuple[str, WorkloadClass], float] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def started(self, item: QueuedRequest) -> None:
        """``item`` was booked on a node now."""
        self._runs[item.request_id] = _Run(item, self._clock())

    def streamed(self, item: QueuedRequest, tokens: int) -> None:
        """``item`` streamed ``tokens`` more generated tokens."""
        run = self._runs.get(item.request_id)
        if run is not None:
            run.generated += tokens

    def ended(self, item: QueuedRequest, generated: int | None) -> None:
        """``item`` ended; ``generated``: its tokens when it ran to its end (a lower class's
        pace learns from it)."""
        run = self._runs.pop(item.request_id, None)
        if run is None or not generated or item.workload_class.is_top:
            return
        pace = (self._clock() - run.started) / generated
        key = (item.model, item.workload_class)
        old = self._pace.get(key)
        self._pace[key] = pace if old is None else old + PACE_ALPHA * (pace - old)

    def pace(self, model: str, workload_class: WorkloadClass) -> float:
        """Seconds per generated token, dispatch to end, of the class's streams lately (0:
        none finished yet, or REALTIME, which the nodes' time per token describes)."""
        return self._pace.get((model, workload_class), 0.0)

    def end_wait(
        self, model: str, workload_class: WorkloadClass, queued_before: int, token_s: float
    ) -> float:
        """Seconds until the running requests of ``model`` that ``workload_class`` cannot
        preempt (its class and those above) have freed ``queued_before`` + 1 slots, ends
        predicted at ``token_s`` per token; 0 when nothing is known. With more queued than
        running, the first end (a lower bound: slots freed later may turn over faster)."""
        if token_s <= 0:
            return 0.0
        now, rank = self._clock(), workload_class.rank
        ends = sorted(
            max(0.0, self._expected(r.item) - r.generated) * token_s
            for r in list(self._runs.values())
            if r.item.model == model
            and r.item.workload_class.rank <= rank
            and r.item.deadline > now  # a leak never holds the estimate
        )
        if not ends:
            return 0.0
        return ends[queued_before] if queued_before < len(ends) else ends[0]
