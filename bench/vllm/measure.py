"""Load runs for ``make bench-vllm``: the overload benchmark's :class:`Benchmark` (capacity
search, levels, runs keyed by server and rate) with each server's target chosen by name, so the
bare vLLM server is driven over HTTP (:mod:`bench.load.openai_target`) and Sluice through its
SDK, under the same scenario, arrivals and windows.

:meth:`TargetBenchmark.target` is the only change: :class:`Benchmark` runs every load through
it, and :func:`bench.load.run.make_target` knows ``sluice`` and ``naive`` only.
:func:`run_paired` runs both servers' phases of a scenario up together and in turns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from bench.load.openai_target import openai_target
from bench.load.run import LoadResult, make_target, run_client, run_load
from bench.load.scenario import Scenario
from bench.load.targets import Target
from bench.overload.benchmark import Benchmark
from bench.overload.options import Options
from bench.overload.search import RATE_DIGITS, SearchResult, advance
from bench.overload.servers import Server
from bench.slo.figures import OVERLOAD_MULTIPLES
from bench.vllm.servers import VLLM_SERVER

TargetFactory = Callable[[str, Scenario, str], Target]
"""``(server name, scenario, address)`` → the target to drive that server with."""


def target_factory(keys: Mapping[str, str]) -> TargetFactory:
    """The bare vLLM server through the OpenAI target, any other server as
    :func:`bench.load.run.make_target` reaches it (Sluice with the tenants' ``keys``)."""

    def make(name: str, scenario: Scenario, address: str) -> Target:
        if name == VLLM_SERVER:
            return openai_target(scenario, address)
        return make_target(name, scenario, address, keys)

    return make


class TargetBenchmark(Benchmark):
    """:class:`Benchmark` whose runs reach each server through ``make`` (module doc)."""

    def __init__(
        self, scenario: Scenario, keys: dict[str, str], options: Options, make: TargetFactory
    ) -> None:
        super().__init__(scenario, keys, options)
        self.make = make

    def target(self, server: Server, scenario: Scenario) -> Target:
        """The target ``make`` gives for ``server`` (bare vLLM over HTTP, Sluice through its
        SDK); every run of :class:`Benchmark` goes through it."""
        return self.make(server.name, scenario, server.address)

    def warm(self, server: Server, rate: float, seconds: float) -> None:
        """``seconds`` of the scenario at ``rate``, recorded nowhere (as ``bench.slo`` warms a
        suite before its search); ``RuntimeError`` with the first failure when no request
        finished, since every later run would then measure a broken server."""
        if seconds <= 0:
            return

        async def go() -> LoadResult:
            target = self.target(server, self.scenario)
            try:
                return await run_load(
                    self.scenario, target, duration_s=seconds, total_rps=rate, salt="warm"
                )
            finally:
                await target.close()

        records = run_client(go()).records
        if records and not any(r.finished for r in records):
            first = records[0]
            raise RuntimeError(
                f"{server.name}: no warm-up request finished (first: {first.status} "
                f"{first.details})"
            )


@dataclass
class Phase:
    """One server's part of a scenario: its search, the levels measured, what failed."""

    bench: TargetBenchmark
    server: Server
    search: SearchResult | None = None
    levels: list[tuple[float, str]] = field(default_factory=list)
    error: str | None = None
    stopped: bool = False
    """Its server was stopped (after a failure, or at the end)."""

    def level_result(self, rate: float) -> LoadResult | None:
        """The run of the level at ``rate``, if that level was run (not a search step's)."""
        rate = round(rate, RATE_DIGITS)
        if all(done != rate for done, _ in self.levels):
            return None
        return self.bench.runs.get((self.server.name, rate))


def level_plan(search: SearchResult, start_rps: float) -> list[tuple[float, str]]:
    """The overload levels both servers run: 2x and 4x bare vLLM's capacity at SLO, or of the
    lowest rate its search probed when none met the SLO (the labels say which)."""
    base, of = search.capacity_rps, "bare vLLM's capacity"
    if base <= 0:
        base = min((s.offered_rps for s in search.steps), default=start_rps)
        of = "the lowest rate probed on bare vLLM (no capacity at SLO found)"
    return [(round(m * base, RATE_DIGITS), f"{m:g}x {of}") for m in OVERLOAD_MULTIPLES]


def run_paired(
    phases: Sequence[Phase],
    start_rps: float,
    warming: tuple[float, float],
    plan: Callable[[SearchResult], list[tuple[float, str]]],
) -> list[tuple[float, str]]:
    """Both servers up at once, measured in turns (docs/decisions/bench-vllm-paired.md): start
    each, warm each (``warming``: rate and seconds), then their capacity searches from
    ``start_rps`` one probe each in turn, then each level ``plan`` gives for the first phase's
    search on each server in turn. A server that fails keeps its error in ``phase.error`` with
    whatever was measured before it and is stopped at once; the others go on. Every server is
    stopped at the end, each whatever the others' stops raise (:func:`_stop_all`). Returns the
    levels planned (none when the first phase's capacity was not measured)."""
    try:
        live = [p for p in phases if _attempt(p, partial(_start, p))]
        live = [p for p in live if _attempt(p, partial(p.bench.warm, p.server, *warming))]
        _search_in_turns(live, start_rps)
        lead = phases[0]
        if lead.search is None:
            for phase in phases[1:]:
                missing = f"levels not run: {lead.server.name}'s capacity was not measured"
                phase.error = phase.error or missing
            return []
        try:
            levels = plan(lead.search)
        except Exception as exc:  # no levels for anyone; the searches are kept
            for phase in live:
                if phase.error is None:
                    _fail(phase, exc)
            return []
        for level in levels:
            for phase in [p for p in live if p.error is None]:
                _attempt(phase, partial(_level, phase, level))
        return levels
    finally:
        _stop_all(phases)


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
