"""The capacity search: the highest offered rate whose SLO attainment passes, by stepped probes.

Pure: :func:`find_capacity` calls back for each probe's attainment (:func:`capacity_probes`
takes them one at a time, :func:`advance` measures one), so it is tested without servers.
Rates are rounded to :data:`RATE_DIGITS` decimals, and runs are keyed by them.

Two searches compared (``make bench-slo``'s two arms) may end on neighbouring rates of their
grids on one probe's luck. :func:`contested_rate` names the rate they disagree on, and
:func:`confirm` judges an arm there on all its probes at that rate pooled
(docs/decisions/bench-slo-paired.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable
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


@dataclass(frozen=True)
class PooledProbe:
    """One more probe at a rate, and every probe of the same server at that rate pooled."""

    offered_rps: float
    attainment: float
    """The new probe's alone."""
    pooled_attainment: float
    """Over the requests of every probe at the rate (the search's, if it probed there)."""
    pooled_requests: int
    probes: int
    """How many probes were pooled (the new one included)."""


@dataclass
class Confirmation:
    """A contested rate probed once more after the search, and what its pooled verdict did to
    the capacity (:func:`confirm`)."""

    offered_rps: float
    attainment: float
    """The new probe's alone."""
    pooled_attainment: float
    pooled_requests: int
    probes: int
    passed: bool
    """Whether the pooled attainment met the required share."""
    capacity_before_rps: float
    capacity_rps: float


@dataclass
class SearchResult:
    """A capacity search: the highest passing rate (0.0 if none passed) and its steps; after a
    confirmation (:func:`confirm`), the capacity it left and the confirmations made."""

    capacity_rps: float
    steps: list[SearchStep] = field(default_factory=list)
    stopped_by_budget: bool = False
    """The time budget ended the search (or a confirmation round after it)."""
    confirmations: list[Confirmation] = field(default_factory=list)

    @property
    def bracketed(self) -> bool:
        """Whether a failing rate above the capacity was seen (else it is only a lower bound)."""
        seen: list[SearchStep | Confirmation] = [*self.steps, *self.confirmations]
        return any(not s.passed and s.offered_rps > self.capacity_rps for s in seen)


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


def contested_rate(capacities: Iterable[float]) -> float | None:
    """The rate two or more searches disagree on: the highest of their capacities when they
    differ, None when they agree (or fewer than two were measured)."""
    found = {round(c, RATE_DIGITS) for c in capacities}
    return max(found) if len(found) > 1 else None


def capacity_after(search: SearchResult, rate: float, passed: bool) -> float:
    """The capacity ``search`` is left with once ``rate`` was judged on its pooled probes:
    at least ``rate`` when they passed; else the highest rate below ``rate`` that passed in
    the search (0.0 if none did)."""
    rate = round(rate, RATE_DIGITS)
    if passed:
        return max(search.capacity_rps, rate)
    below = [s.offered_rps for s in search.steps if s.passed and s.offered_rps < rate]
    return max(below, default=0.0)


def confirm(search: SearchResult, probe: PooledProbe, required: float) -> Confirmation:
    """Judge ``search``'s server at a contested rate on ``probe`` (its probes there pooled):
    passed when the pooled attainment is at least ``required``. Sets the search's capacity
    (:func:`capacity_after`) and keeps the confirmation on it; returns that."""
    passed = probe.pooled_attainment >= required
    before = search.capacity_rps
    done = Confirmation(
        offered_rps=round(probe.offered_rps, RATE_DIGITS),
        attainment=probe.attainment,
        pooled_attainment=probe.pooled_attainment,
        pooled_requests=probe.pooled_requests,
        probes=probe.probes,
        passed=passed,
        capacity_before_rps=before,
        capacity_rps=capacity_after(search, probe.offered_rps, passed),
    )
    search.capacity_rps = done.capacity_rps
    search.confirmations.append(done)
    return done
