"""The jobs planner, I/O-free: which job's lines to take next, how many lines to keep in
flight, and whether a new job's window can be met.

- **Order** (:func:`order`): earliest deadline first, weighted fairly across tenants. A tenant
  holding less than its weighted share of this replica's lines in flight goes before one
  holding more; within each group, the earliest deadline goes first. Work-conserving: a
  tenant over its share still gets lines when nobody under it has any.
- **How many** (:class:`LineWindow`): as TCP does, slow start (one more line per line admitted,
  so the window doubles each round until the first refusal), then additive increase (1/window
  per line admitted) and multiplicative decrease (a refusal halves it and pauses new lines for
  its RetryInfo). So the lines in flight follow the room the nodes leave, without a flood of
  refusals.
- **Feasibility** (:func:`plan`): the jobs run one after another in deadline order at the
  measured rate (weighted tokens per second). A new job is accepted when it, and every job
  with a later deadline that was on time without it, still finish by their deadlines; its
  predicted completion is its place in that sequence. Refused: retry after the time the
  backlog needs to shrink enough.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Runnable:
    """A job with lines to take, as the planner sees it."""

    job_id: str
    tenant: str
    deadline_ms: int


def order(
    jobs: Sequence[Runnable],
    in_flight: Mapping[str, int],
    weights: Mapping[str, float],
    window: float,
) -> list[Runnable]:
    """``jobs`` in the order their lines should be taken (see the module docstring)."""
    tenants = {j.tenant for j in jobs}
    total_weight = sum(max(weights.get(t, 1.0), 1e-9) for t in tenants) or 1.0

    def over_share(tenant: str) -> bool:
        share = window * max(weights.get(tenant, 1.0), 1e-9) / total_weight
        return in_flight.get(tenant, 0) >= max(1.0, share)

    return sorted(jobs, key=lambda j: (over_share(j.tenant), j.deadline_ms, j.job_id))


class LineWindow:
    """How many lines this replica keeps in flight: TCP's slow start, then AIMD."""

    def __init__(self, initial: float = 4.0, maximum: float = 64.0) -> None:
        self.size = initial
        self.maximum = maximum
        self.threshold = maximum
        """Below it the window grows by one per admitted line (doubling per round); above it
        by 1/window (one per round). Set to half the window at each refusal."""
        self.paused_until = 0.0
        """Monotonic time before which no new line starts (a refusal's RetryInfo)."""

    def admitted(self) -> None:
        """A line got a node slot: widen."""
        step = 1.0 if self.size < self.threshold else 1.0 / self.size
        self.size = min(self.maximum, self.size + step)

    def refused(self, now: float, retry_after_s: float) -> None:
        """A line was refused for overload: halve (once per pause: a burst of refusals from
        the same moment is one congestion signal) and wait out the refusal's hint."""
        if now >= self.paused_until:
            self.size = max(1.0, self.size / 2)
            self.threshold = self.size
        self.paused_until = max(self.paused_until, now + max(0.05, retry_after_s))

    def room(self, now: float, in_flight: int) -> int:
        """Lines that may start now."""
        if now < self.paused_until:
            return 0
        return max(0, math.floor(self.size) - in_flight)


@dataclass(frozen=True)
class Backlog:
    """A job's remaining work, for feasibility."""

    job_id: str
    deadline_ms: int
    tokens: float


@dataclass(frozen=True)
class Plan:
    """The verdict on a new job."""

    feasible: bool
    predicted_ms: int
    """When the new job is expected to finish (Unix ms)."""
    retry_after_s: float = 0.0
    """When refused: how long until the backlog has shrunk enough."""
    late: tuple[str, ...] = ()
    """Jobs (the new one or others) that would miss their deadline."""


def completions(backlog: Sequence[Backlog], rate: float, now_ms: int) -> dict[str, int]:
    """Each job's predicted completion (Unix ms) when jobs run in deadline order at ``rate``
    weighted tokens per second."""
    out: dict[str, int] = {}
    done = 0.0
    for job in sorted(backlog, key=lambda b: (b.deadline_ms, b.job_id)):
        done += job.tokens
        out[job.job_id] = now_ms + math.ceil(done / max(rate, 1e-9) * 1000)
    return out


def plan(backlog: Sequence[Backlog], new: Backlog, rate: float, now_ms: int) -> Plan:
    """Accept ``new`` or not, given the jobs already queued (see the module docstring)."""
    before = completions(backlog, rate, now_ms)
    after = completions([*backlog, new], rate, now_ms)
    on_time_before = {b.job_id for b in backlog if before[b.job_id] <= b.deadline_ms}
    late = [
        b.job_id
        for b in [*backlog, new]
        if after[b.job_id] > b.deadline_ms and (b is new or b.job_id in on_time_before)
    ]
    if not late:
        return Plan(True, after[new.job_id])
    overshoot_ms = max(after[b.job_id] - b.deadline_ms for b in [*backlog, new] if b.job_id in late)
    return Plan(False, after[new.job_id], overshoot_ms / 1000, tuple(late))
