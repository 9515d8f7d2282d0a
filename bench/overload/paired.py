"""Servers compared on one scenario, up together and measured in turns: ``make bench-vllm``
(bare vLLM, then Sluice + vLLM) and ``make bench-slo`` (the default suite, then the reference
one) run their phases through :func:`run_paired`.

On this shared 2-core machine the speed changes over minutes (docs/decisions/
bench-machine-speed.md). In turns, each probe of one server is next in time to the other's
(docs/decisions/bench-vllm-paired.md). Where the comparison is of the capacities themselves
(``bench.slo``), the searches' disagreement is probed again (:func:`_confirm_in_turns`,
docs/decisions/bench-slo-paired.md).

Each phase has a :class:`bench.overload.benchmark.Benchmark` of its own, so runs keyed by
(server name, rate) never meet; a server that fails is stopped at once and the others go on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from functools import partial

from bench.load.run import LoadResult
from bench.overload.benchmark import Benchmark
from bench.overload.search import (
    RATE_DIGITS,
    BudgetExhausted,
    PooledProbe,
    SearchResult,
    advance,
    confirm,
    contested_rate,
)
from bench.overload.servers import Server

LevelPlan = Callable[[SearchResult], list[tuple[float, str]]]
"""The first phase's search → the ``(rate, label)`` levels every measured phase runs."""


def multiples_plan(
    search: SearchResult,
    start_rps: float,
    multiples: Sequence[float],
    of: str = "capacity",
    lowest: str = "the lowest rate probed",
) -> list[tuple[float, str]]:
    """Levels at ``multiples`` of the search's capacity at SLO (labelled ``"<m>x <of>"``), or of
    the lowest rate it probed when none met the SLO (``"<m>x <lowest> (no capacity at SLO
    found)"``; ``start_rps`` without a probe)."""
    base = search.capacity_rps
    if base <= 0:
        base = min((s.offered_rps for s in search.steps), default=start_rps)
        of = f"{lowest} (no capacity at SLO found)"
    return [(round(m * base, RATE_DIGITS), f"{m:g}x {of}") for m in multiples]


@dataclass
class Phase:
    """One server's part of a scenario: its search, the levels measured, what failed."""

    bench: Benchmark
    server: Server
    search: SearchResult | None = None
    levels: list[tuple[float, str]] = field(default_factory=list)
    error: str | None = None
    stopped: bool = False
    """Its server was stopped (after a failure, after its search, or at the end)."""
    search_only: bool = False
    """It runs its search (and any confirmation) but no level, and its server is stopped as
    soon as those end, so that it does not sit beside the others' levels."""

    def level_result(self, rate: float) -> LoadResult | None:
        """The run of the level at ``rate``, if that level was run (not a search step's)."""
        rate = round(rate, RATE_DIGITS)
        if all(done != rate for done, _ in self.levels):
            return None
        return self.bench.runs.get((self.server.name, rate))


def run_paired(
    phases: Sequence[Phase],
    start_rps: float,
    warming: tuple[float, float],
    plan: LevelPlan,
    confirm_contested: bool = False,
) -> list[tuple[float, str]]:
    """The phases' servers up at once, measured in turns: start each, warm each
    (``warming``: rate and seconds), then their capacity searches from ``start_rps`` one probe
    each in turn; with ``confirm_contested``, the rate the searches disagree on probed again
    by each in turn (:func:`_confirm_in_turns`). Search-only phases are stopped then; each
    level ``plan`` gives for the first phase's search runs on each other phase in turn.

    A server that fails keeps its error in ``phase.error`` with whatever was measured before it
    and is stopped at once; the others go on. Every server is stopped at the end, each whatever
    the others' stops raise (:func:`_stop_all`). Returns the levels planned (none when the
    first phase's capacity was not measured)."""
    try:
        live = [p for p in phases if _attempt(p, partial(_start, p))]
        live = [p for p in live if _attempt(p, partial(p.bench.warm, p.server, *warming))]
        _search_in_turns(live, start_rps)
        if confirm_contested:
            _confirm_in_turns(live)
        _stop_all([p for p in phases if p.search_only])
        return _levels_in_turns(phases, [p for p in live if not p.search_only], plan)
    finally:
        _stop_all(phases)


def _levels_in_turns(
    phases: Sequence[Phase], measured: Sequence[Phase], plan: LevelPlan
) -> list[tuple[float, str]]:
    """Each level ``plan`` gives for the first phase's search, on each ``measured`` phase
    still without an error in turn; the levels planned."""
    lead = phases[0]
    if lead.search is None:
        missing = f"levels not run: {lead.server.name}'s capacity was not measured"
        for phase in phases[1:]:
            if not phase.search_only:
                phase.error = phase.error or missing
        return []
    try:
        levels = plan(lead.search)
    except Exception as exc:  # no levels for anyone; the searches are kept
        for phase in measured:
            if phase.error is None:
                _fail(phase, exc)
        return []
    for level in levels:
        for phase in [p for p in measured if p.error is None]:
            _attempt(phase, partial(_level, phase, level))
    return levels


def _stop_all(phases: Sequence[Phase]) -> None:
    """Stop every phase's server; a stop that raises is printed and the others still stop (the
    run's results are written all the same)."""
    for phase in phases:
        try:
            _stop(phase)
        except Exception as exc:  # its processes may be left: say so, and go on
            print(f"{phase.server.name}: stop failed: {exc!r}", file=sys.stderr, flush=True)


def _stop(phase: Phase) -> None:
    """Stop the phase's server unless that already succeeded (a failed stop is tried again)."""
    if not phase.stopped:
        phase.server.stop()
        phase.stopped = True


def _start(phase: Phase) -> None:
    server, started = phase.server, time.monotonic()
    print(f"starting {server.name} ...", flush=True)
    server.start()
    print(f"{server.name} ready at {server.address} in {time.monotonic() - started:.0f} s")


def _level(phase: Phase, level: tuple[float, str]) -> None:
    phase.levels.extend(phase.bench.levels(phase.server, [level]))


def _attempt(phase: Phase, step: Callable[[], object]) -> bool:
    """Run ``step``; on an exception the phase fails (:func:`_fail`) and this is False."""
    try:
        step()
    except Exception as exc:  # what was measured is kept; the entry says what failed
        _fail(phase, exc)
        return False
    return True


def _fail(phase: Phase, exc: Exception) -> None:
    """Keep ``exc`` as the phase's error and stop its server now, so that it does not load the
    machine while the other is measured."""
    phase.error = f"{type(exc).__name__}: {exc}"
    print(f"{phase.server.name}: {phase.error}", flush=True)
    _stop_all([phase])  # tried again at the end if it failed


def _search_in_turns(phases: Sequence[Phase], start_rps: float) -> None:
    """Each phase's capacity search, one probe of each in turn until all ended."""
    turns: dict[int, Generator[float, float, SearchResult]] = {}
    rates: dict[int, float] = {}
    for i, phase in enumerate(phases):
        try:
            turns[i] = phase.bench.probes(start_rps)
            rates[i] = next(turns[i])
        except StopIteration as done:  # no probe allowed (max_steps 0)
            phase.search = done.value
        except Exception as exc:
            _fail(phase, exc)
    while rates:
        for i in list(rates):
            phase, probes = phases[i], turns[i]
            try:
                measure = partial(phase.bench.attainment, phase.server, rates[i])
                rates[i] = advance(probes, measure)
            except StopIteration as done:
                phase.search = done.value
                del rates[i]
            except Exception as exc:  # this server's search ends; the other goes on
                _fail(phase, exc)
                del rates[i]


def _confirm_in_turns(phases: Sequence[Phase]) -> None:
    """While the searched phases' capacities differ, the highest of them (the contested rate,
    :func:`bench.overload.search.contested_rate`) is probed once more by each phase in turn,
    and each is judged there on all its probes at that rate pooled
    (:func:`bench.overload.search.confirm`), which sets its capacity.

    Rounds end when the capacities agree, or when one passed the contested rate and another
    did not (that rate is then confirmed already). A round where both failed goes on at the
    next disagreement below, so that an arm that fell is judged where the other's search passed
    and its own never probed (a rate lower than the last, so the rounds end). A phase that
    fails, or a budget that allows no more probes, ends the confirmation and leaves that
    round's capacities as they were."""
    confirmed: set[float] = set()
    while True:
        judged = [(p, p.search) for p in phases if p.error is None and p.search is not None]
        rate = contested_rate(search.capacity_rps for _, search in judged)
        if len(judged) < len(phases) or rate is None or rate in confirmed:
            return
        confirmed.add(rate)
        print(f"  contested rate {rate:g} req/s: each probes it once more", flush=True)
        probes: list[tuple[SearchResult, PooledProbe, float]] = []
        for phase, search in judged:
            try:
                probe = phase.bench.pooled_probe(phase.server, rate)
            except BudgetExhausted as exc:
                print(f"  confirmation at {rate:g} req/s not run: {exc}", flush=True)
                for _, unconfirmed in judged:
                    unconfirmed.stopped_by_budget = True
                return
            except Exception as exc:  # the comparison has lost an arm: no capacity moves
                _fail(phase, exc)
                return
            probes.append((search, probe, phase.bench.options.required_attainment))
        for search, probe, required in probes:
            confirm(search, probe, required)
