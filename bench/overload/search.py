"""The capacity search: the highest offered rate whose SLO attainment passes, by stepped probes.

Pure: :func:`find_capacity` calls back for each probe's attainment (:func:`capacity_probes`
takes them one at a time, :func:`advance` measures one), so it is tested without servers.
Rates are rounded to :data:`RATE_DIGITS` decimals, and runs are keyed by them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial
from typing import Required, TypedDict, Unpack

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


class SearchTerms(TypedDict, total=False):
    """:func:`capacity_probes`' settings, as keywords (``start_rps`` required)."""

    start_rps: Required[float]
    factor: float
    refine_steps: int
    max_steps: int
    required: float
    min_rps: float


def find_capacity(
    attainment_at: Callable[[float], float], **terms: Unpack[SearchTerms]
) -> SearchResult:
    """Stepped search for the highest rate whose SLO attainment is at least ``required``:
    :func:`capacity_probes` (with ``terms``) driven by ``attainment_at`` (a
    :class:`BudgetExhausted` it raises ends the search with what it found)."""
    probes = capacity_probes(**terms)
    try:
        rate = next(probes)
        while True:
            rate = advance(probes, partial(attainment_at, rate))
    except StopIteration as done:
        result: SearchResult = done.value
        return result


def advance(
    probes: Generator[float, float, SearchResult], attainment: Callable[[], float]
) -> float:
    """One probe of a search: ``attainment()`` of the rate ``probes`` gave last, sent in (a
    :class:`BudgetExhausted` it raises is thrown in instead). The next rate to probe; the
    search's end raises ``StopIteration`` with the :class:`SearchResult` as its value."""
    try:
        measured = attainment()
    except BudgetExhausted as exc:
        return probes.throw(exc)
    except StopIteration as exc:  # the probe's own failure, not the search's end
        raise RuntimeError(f"probe raised {exc!r}") from exc
    return probes.send(measured)


def capacity_probes(
    *,
    start_rps: float,
    factor: float = 2.0,
    refine_steps: int = 1,
    max_steps: int = 8,
    required: float = 0.95,
    min_rps: float = 1e-3,
) -> Generator[float, float, SearchResult]:
    """The search's probes one at a time: yields each rate to probe and takes its attainment
    (``send``), so two searches can take turns (``bench.vllm`` alternates two servers'); a
    :class:`BudgetExhausted` thrown in stops it. Returns the :class:`SearchResult`.

    Up by ``factor`` while steps pass, down while they fail (never below ``min_rps``), until one
    of each is known; then ``refine_steps`` geometric midpoints between them. At most
    ``max_steps`` probes.
    """
    result = SearchResult(0.0)
    best_pass: float | None = None
    first_fail: float | None = None

    def step(rate: float, attainment: float) -> bool:
        passed = attainment >= required
        result.steps.append(SearchStep(round(rate, RATE_DIGITS), attainment, passed))
        return passed

    rate = max(start_rps, min_rps)
    try:
        while len(result.steps) < max_steps and rate >= min_rps:
            if step(rate, (yield round(rate, RATE_DIGITS))):
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
            if step(mid, (yield round(mid, RATE_DIGITS))):
                best_pass = mid
            else:
                first_fail = mid
    except BudgetExhausted:
        result.stopped_by_budget = True
    result.capacity_rps = round(best_pass, RATE_DIGITS) if best_pass is not None else 0.0
    return result
