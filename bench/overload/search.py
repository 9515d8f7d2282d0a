"""The capacity search: the highest offered rate whose SLO attainment passes, by stepped probes.

Pure: :func:`find_capacity` calls back for each probe's attainment, so it is tested without
servers. Rates are rounded to :data:`RATE_DIGITS` decimals, and runs are keyed by them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

RATE_DIGITS = 4  # offered rates are rounded to this many decimals (and runs keyed by them)


class BudgetExhausted(Exception):
    """The time budget does not allow another run."""


@dataclass
class SearchStep:
    """One probe of a capacity search."""

    offered_rps: float
    attainment: float
    passed: bool


@dataclass
class SearchResult:
    """A capacity search: the highest passing rate (0.0 if none passed) and its steps."""

    capacity_rps: float
    steps: list[SearchStep] = field(default_factory=list)
    stopped_by_budget: bool = False

    @property
    def bracketed(self) -> bool:
        """Whether a failing rate above the capacity was seen (else it is only a lower bound)."""
        return any(not s.passed and s.offered_rps > self.capacity_rps for s in self.steps)


def find_capacity(
    attainment_at: Callable[[float], float],
    *,
    start_rps: float,
    factor: float = 2.0,
    refine_steps: int = 1,
    max_steps: int = 8,
    required: float = 0.95,
    min_rps: float = 1e-3,
) -> SearchResult:
    """Stepped search for the highest rate whose SLO attainment is at least ``required``.

    Up by ``factor`` while steps pass, down while they fail (never below ``min_rps``), until one
    of each is known; then ``refine_steps`` geometric midpoints between them. At most
    ``max_steps`` probes.
    """
    result = SearchResult(0.0)
    best_pass: float | None = None
    first_fail: float | None = None

    def probe(rate: float) -> bool:
        rate = round(rate, RATE_DIGITS)
        attainment = attainment_at(rate)
        passed = attainment >= required
        result.steps.append(SearchStep(rate, attainment, passed))
        return passed

    rate = max(start_rps, min_rps)
    try:
        while len(result.steps) < max_steps and rate >= min_rps:
            if probe(rate):
                best_pass = rate
                if first_fail is not None:
                    break
                rate *= factor
            else:
                first_fail = rate
                if best_pass is not None:
                    break
                rate /= factor
        for _ in range(refine_steps):
            if best_pass is None or first_fail is None or len(result.steps) >= max_steps:
                break
            mid = math.sqrt(best_pass * first_fail)
            if probe(mid):
                best_pass = mid
            else:
                first_fail = mid
    except BudgetExhausted:
        result.stopped_by_budget = True
    result.capacity_rps = round(best_pass, RATE_DIGITS) if best_pass is not None else 0.0
    return result
