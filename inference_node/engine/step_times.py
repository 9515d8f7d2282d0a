"""A histogram of an engine's step times, kept on the engine thread and read at scrape time."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

STEP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
"""Seconds: a decode step of a small model on a GPU (a few ms) to a loaded CPU node's."""


@dataclass(frozen=True)
class StepSnapshot:
    """Cumulative counts per upper bound (``+Inf`` last), their sum and count."""

    buckets: tuple[tuple[float, int], ...]
    sum_s: float
    count: int


class StepTimes:
    """Counts of steps by duration. Written by one thread (the engine's); a reader may see a
    step counted in its bucket and not yet in the sum, never a torn value."""

    def __init__(self, bounds: tuple[float, ...] = STEP_BUCKETS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """One step took ``seconds``."""
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def snapshot(self) -> StepSnapshot:
        """The histogram as Prometheus exposes it (cumulative)."""
        counts = list(self._counts)
        total, out = 0, []
        for bound, n in zip((*self._bounds, float("inf")), counts, strict=True):
            total += n
            out.append((bound, total))
        return StepSnapshot(tuple(out), self._sum, total)
