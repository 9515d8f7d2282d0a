"""How much prompt prefill a node may take while streams decode there.

A prompt's prefill runs in the node's steps beside the decoding streams: every second spent
on prompts is a second no stream on the node advances. A stream's time per output token is
then about its decode step over the share of time left to decoding, so the slot limit
(:mod:`sluice.itl`) alone does not hold an inter-token target once prompts are long or come in
bursts (chat-longtail: a burst of 1,000-token prompts stalls every stream for seconds).

Each node's :class:`PrefillBucket` is a token bucket in seconds of prefill: the prompts this
scheduler sent there (each priced by the node's fitted cost per prompt token) fill it, and it
drains at the share of the node's time prompts may take while the streams running there keep
the tightest inter-token target among them (``1 - predicted step / target``, at least
``min_share``). A prompt may start while the bucket holds at most ``burst_s`` with it, its
class below REALTIME at most ``lower_class_share`` of that (the rest kept for REALTIME's
prompts); an empty bucket takes a prompt of any size. A class with no stream of its own or a
higher class running on the node has nothing to protect there and is not held.
Figures: docs/decisions/scheduler-prefill-bucket.md. Failure mode: only this replica's
prompts are counted; another replica's add load the bucket does not see.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from sluice.contract import WorkloadClass
from sluice.itl import tightest

EMPTY_S = 1e-6
"""Debt at or below this counts as an empty bucket."""
TOP = min(WorkloadClass, key=lambda c: c.rank)
"""REALTIME, whose inter-token target sets the bucket's depth."""


@dataclass(frozen=True)
class PrefillGuard:
    """The prefill bucket's settings, shared by every node."""

    itl_targets: Mapping[WorkloadClass, float] = field(default_factory=dict)
    """Each class's inter-token target in seconds (0: none)."""
    burst_intervals: float = 8.0
    """Depth of the bucket in the tightest inter-token target (0: no guard)."""
    lower_class_share: float = 0.5
    """Share of the depth classes below REALTIME may fill."""
    min_share: float = 0.1
    """Least share of a node's time prompts may take (a batch already at its target still
    takes new prompts, slowly, rather than none until a stream ends)."""
    measured_share: float = 1.0
    """Share of the tightest target the REALTIME streams' measured mean time per token may
    reach before prompts get only ``min_share`` (the step budget's share: the guard plans the
    streams' steps within it; docs/decisions/scheduler-live-token-mean.md)."""
    paced_measured_share: float = 1.0
    """The same on a node whose engine paces its own lower-class prompts
    (``ModelInfo.paces_prompts``): it already caps them to keep the streams at pace, so the
    rule waits for the target itself there (``math.inf``: never)."""

    @property
    def burst_s(self) -> float:
        """Prefill seconds the bucket holds: ``burst_intervals`` REALTIME inter-token targets
        (0, the guard off, without one)."""
        return max(0.0, self.burst_intervals) * max(0.0, self.itl_targets.get(TOP, 0.0))

    def allowance(self, workload_class: WorkloadClass) -> float:
        """Prefill seconds ``workload_class``'s prompts may bring the bucket to."""
        share = 1.0 if workload_class.is_top else min(1.0, max(0.0, self.lower_class_share))
        return self.burst_s * share

    def drain_share(
        self,
        step_s: float,
        running: set[WorkloadClass],
        measured_s: float = 0.0,
        *,
        paced: bool = False,
    ) -> float:
        """Share of the node's time prompts may take while ``running`` classes decode in
        steps of ``step_s``: 1 with none running or no target among them; ``min_share``
        while the streams' measured time per token (``measured_s``, 0: none) is over
        ``measured_share`` of the target (``paced_measured_share`` on a node that ``paced``
        its own prompts; the fit missed something: long contexts, another tenant's load)."""
        target = tightest(self.itl_targets.get(c, 0.0) for c in running)
        if target <= 0 or step_s <= 0:
            return 1.0
        if measured_s > target * (self.paced_measured_share if paced else self.measured_share):
            return self.min_share
        return min(1.0, max(self.min_share, 1.0 - step_s / target))


class PrefillBucket:
    """One node's prefill debt (seconds of prompts sent, not yet drained)."""

    def __init__(self) -> None:
        self.debt_s = 0.0
        self._at: float | None = None

    def settle(self, now: float, share: float) -> None:
        """Drain what ``share`` of the time since the last settle paid off."""
        if self._at is not None and now > self._at:
            self.debt_s = max(0.0, self.debt_s - (now - self._at) * share)
        self._at = now if self._at is None else max(self._at, now)

    def add(self, cost_s: float) -> None:
        """A prompt of ``cost_s`` prefill seconds was sent (settle first)."""
        if cost_s > 0 and math.isfinite(cost_s):
            self.debt_s += cost_s

    def wait(self, cost_s: float, allowance_s: float, share: float, ahead_s: float = 0.0) -> float:
        """Seconds until a prompt of ``cost_s``, behind ``ahead_s`` of prompts still to be
        sent, fits under ``allowance_s`` at ``share`` (0: now): the debt before it must fall
        to the allowance less its cost (to nothing for a prompt larger than the allowance,
        which waits only for an empty bucket). A prompt that costs nothing never waits."""
        before = self.debt_s + max(0.0, ahead_s)
        if cost_s <= 0 or before <= EMPTY_S or allowance_s <= 0:
            return 0.0
        over = before - max(0.0, allowance_s - cost_s)
        return over / share if over > 0 else 0.0
