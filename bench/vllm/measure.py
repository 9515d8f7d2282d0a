"""Load runs for ``make bench-vllm``: the overload benchmark's :class:`Benchmark` (capacity
search, levels, runs keyed by server and rate) with each server's target chosen by name, so the
bare vLLM server is driven over HTTP (:mod:`bench.load.openai_target`) and Sluice through its
SDK, under the same scenario, arrivals and windows.

:meth:`TargetBenchmark.target` is the only change: :class:`Benchmark` runs every load through
it, and :func:`bench.load.run.make_target` knows ``sluice`` and ``naive`` only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bench.load.openai_target import openai_target
from bench.load.run import LoadResult, make_target, run_load
from bench.load.scenario import Scenario
from bench.load.targets import Target
from bench.overload.benchmark import Benchmark
from bench.overload.options import Options
from bench.overload.search import RATE_DIGITS, SearchResult
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

        records = asyncio.run(go()).records
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


def run_phase(
    phase: Phase,
    start_rps: float,
    warming: tuple[float, float],
    plan: Callable[[SearchResult], list[tuple[float, str]]],
) -> None:
    """Start the phase's server, warm it (``warming``: rate and seconds), search its capacity
    from ``start_rps``, run the levels ``plan`` gives for that search, and always stop it; a
    failure is kept in ``phase.error`` with whatever was measured before it."""
    server = phase.server
    print(f"starting {server.name} ...", flush=True)
    started = time.monotonic()
    try:
        server.start()
        print(f"{server.name} ready at {server.address} in {time.monotonic() - started:.0f} s")
        phase.bench.warm(server, *warming)
        phase.search = phase.bench.search(server, start_rps)
        phase.levels = phase.bench.levels(server, plan(phase.search))
    except Exception as exc:  # what was measured is kept; the entry says what failed
        phase.error = f"{type(exc).__name__}: {exc}"
        print(f"{server.name}: {phase.error}", flush=True)
    finally:
        server.stop()
