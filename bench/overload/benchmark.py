"""The overload benchmark's measurements: load runs keyed by (target, offered rate), reused by
any later run at that rate whose window is no longer; capacity searches; load levels. A rate
can be measured again (:meth:`Benchmark.repeat`): its runs are then pooled under its key, and
each window is kept on its own as well (``windows``).

A level holds ``level_min_requests`` requests on average within ``max_step_s``; the level at 1x
the naive capacity, where REALTIME TTFT is compared, also holds ``realtime_min_requests``
REALTIME requests, on average and in its seeded plan, within ``max_level_s``.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from bench.load.run import LoadResult, make_target, run_client, run_load
from bench.load.scenario import PlannedRequest, Scenario, make_prompt, plan_requests
from bench.load.targets import Target, TargetError
from bench.overload.options import Options
from bench.overload.report import REALTIME
from bench.overload.search import (
    RATE_DIGITS,
    BudgetExhausted,
    PooledProbe,
    SearchResult,
    SearchTerms,
    capacity_probes,
    find_capacity,
)
from bench.overload.servers import Server


class Observer(Protocol):
    """Something that watches each load run, keyed by ``(target, offered rate, window)``: the
    window is 0 for a rate's first run, n for its n-th repeat (:meth:`Benchmark.repeat`)."""

    def watch(self, key: tuple[str, float, int]) -> AbstractContextManager[object]:
        """A context held through the run."""
        ...


def attainment_of(result: LoadResult) -> float:
    """SLO attainment of a run's requests (0 for a run without requests: it passes nothing)."""
    summary = result.summary()
    return float(summary["slo_attainment"]) if summary["requests"] else 0.0


def pooled(earlier: LoadResult, later: LoadResult) -> LoadResult:
    """Two runs at one rate as one: records concatenated, windows and elapsed times summed (a
    rate per second over it is over both windows), the first one's start."""
    return replace(
        earlier,
        records=[*earlier.records, *later.records],
        duration_s=earlier.duration_s + later.duration_s,
        elapsed_s=earlier.elapsed_s + later.elapsed_s,
    )


def realtime_share(scenario: Scenario) -> float:
    """Share of the scenario's offered rate sent by its ``realtime`` tenants (the same at every
    offered rate: a run scales all tenants' rates together)."""
    realtime = sum(t.rate_rps for t in scenario.tenants if t.workload_class == REALTIME)
    return realtime / scenario.total_rps


class Benchmark:
    """Runs the measurements and remembers each, keyed by (target, offered rate)."""

    def __init__(
        self,
        scenario: Scenario,
        keys: dict[str, str],
        options: Options,
        observer: Observer | None = None,
    ) -> None:
        self.scenario = scenario
        self.keys = keys
        self.options = options
        self.observer = observer
        """Watches each load run (``bench.slo`` samples the scheduler's metrics through it)."""
        self.runs: dict[tuple[str, float], LoadResult] = {}
        """The run at each (target, rate): every window there pooled (:func:`pooled`)."""
        self.windows: dict[tuple[str, float], list[LoadResult]] = {}
        """Each window at each (target, rate) on its own, in order (what ``runs`` pools)."""
        self.started = time.monotonic()
        self.records_dir: Path | None = None
        """Where each run's requests are written, one JSON line each (``<server>-<rate>.jsonl``,
        a repeat's ``<server>-<rate>-<n>.jsonl``: what a figure was made of, for reading after
        the run); None: nowhere."""

    def duration_for(
        self, rate: float, min_requests: int | None = None, realtime_min_requests: int = 0
    ) -> float:
        """The arrival window at ``rate``: long enough for ``min_requests`` (default: the
        search's) on average and in the run's seeded plan, within ``[step_s, max_step_s]``.

        With ``realtime_min_requests``, lengthened up to ``max_level_s`` (never shortened) so
        that the scenario's realtime share yields that many REALTIME requests on average, and
        the run's seeded plan holds that many (a Poisson draw can fall short of its mean).
        """
        o = self.options
        wanted = min_requests or o.min_requests
        longest = max(o.max_step_s, o.step_s)
        window = min(max(o.step_s, wanted / rate), longest)
        window = max(window, self._planned_window(rate, wanted, longest))  # a short draw
        share = realtime_share(self.scenario)
        if realtime_min_requests <= 0 or share <= 0:
            return window
        on_average = realtime_min_requests / (rate * share)
        cap = o.max_level_s
        needed = max(on_average, self._planned_window(rate, realtime_min_requests, cap, True))
        return max(window, min(needed, cap))

    def _planned_window(self, rate: float, count: int, cap: float, realtime: bool = False) -> float:
        """The shortest whole-second window whose plan at ``rate`` holds ``count`` requests
        (REALTIME ones only with ``realtime``; a longer window's plan extends a shorter
        one's); ``cap`` if none within it does. The scenarios' bursty arrivals (gamma gaps of
        CV 2-3) often fall short of the average: embed-heavy's 0.707 req/s probe of 30 s held
        14 requests, not 21 (bench-slo 2026-12-04 19:25), and one miss failed it."""
        plan = plan_requests(self.scenario, duration_s=cap, total_rps=rate)
        arrivals = [r.scheduled_s for r in plan if not realtime or r.workload_class == REALTIME]
        if len(arrivals) < count:
            return cap
        return math.floor(arrivals[count - 1]) + 1.0  # the plan keeps arrivals before the end

    def _check_budget(self, duration: float) -> None:
        budget = self.options.time_budget_s
        if budget <= 0:
            return
        drain = self.options.drain_s
        needed = duration + (drain if drain is not None else self.scenario.drain_seconds())
        if time.monotonic() - self.started + needed > budget:
            raise BudgetExhausted(f"{needed:.0f} s more would pass the {budget:.0f} s budget")

    def target(self, server: Server, scenario: Scenario) -> Target:
        """The load target that drives ``server`` (by its name, with the tenants' keys)."""
        return make_target(server.name, scenario, server.address, self.keys)

    def measure(
        self,
        server: Server,
        rate: float,
        min_requests: int | None = None,
        realtime_min_requests: int = 0,
    ) -> LoadResult:
        """One load run at ``rate`` with the window :meth:`duration_for` gives; a run of
        ``server`` at that rate with a window at least as long is reused instead; pooled windows
        (:meth:`repeat`) only with as many requests as asked for, since they repeat one short
        window's arrivals, and a bursty plan can hold fewer of them than one window of the
        summed length. A new run replaces what was kept at that rate."""
        rate = round(rate, RATE_DIGITS)
        key = (server.name, rate)
        duration = self.duration_for(rate, min_requests, realtime_min_requests)
        earlier = self.runs.get(key)
        if earlier is not None and self._reusable(earlier, key, duration, min_requests):
            return earlier
        result = self._run(server, rate, duration, 0)
        self.runs[key] = result
        self.windows[key] = [result]
        return result

    def _reusable(
        self, run: LoadResult, key: tuple[str, float], duration: float, wanted: int | None
    ) -> bool:
        """Whether the ``run`` kept at ``key`` stands for a window of ``duration`` planned for
        ``wanted`` requests (see :meth:`measure`)."""
        if run.duration_s < duration - 1e-6:
            return False
        return len(self.windows.get(key, [])) <= 1 or len(run.records) >= (
            wanted or self.options.min_requests
        )

    def repeat(self, server: Server, rate: float) -> LoadResult:
        """One more search-length window of ``server`` at ``rate``, with prompts of its own and
        the same arrivals, pooled with the runs already there (:func:`pooled`); returns the new
        window alone (``runs`` holds the pooled one)."""
        rate = round(rate, RATE_DIGITS)
        key = (server.name, rate)
        earlier = self.runs.get(key)
        kept = self.windows.get(key) or ([earlier] if earlier is not None else [])
        result = self._run(server, rate, self.duration_for(rate), len(kept))
        self.windows[key] = [*kept, result]
        self.runs[key] = result if earlier is None else pooled(earlier, result)
        return result

    def pooled_probe(self, server: Server, rate: float) -> PooledProbe:
        """:meth:`repeat` at ``rate``, judged alone and with every earlier window there."""
        window = self.repeat(server, rate)
        key = (server.name, round(rate, RATE_DIGITS))
        both = self.runs[key]
        return PooledProbe(
            offered_rps=key[1],
            attainment=attainment_of(window),
            pooled_attainment=attainment_of(both),
            pooled_requests=len(both.records),
            probes=len(self.windows[key]),
        )

    def _run(self, server: Server, rate: float, duration: float, window: int) -> LoadResult:
        """One window at ``rate`` (``window``: 0 for the rate's first, n for its n-th repeat),
        watched by the observer, its records written; raises :class:`BudgetExhausted` when the
        budget does not allow it."""
        self._check_budget(duration)
        scenario = self.scenario
        if self.options.drain_s is not None:
            scenario = scenario.model_copy(update={"drain_s": self.options.drain_s})
        # Prompts no other run sends (prefix caches); a repeat has the same arrivals.
        run_salt = f"{rate:g}x{duration:g}" + (f"r{window}" if window else "")

        async def go() -> LoadResult:
            target = self.target(server, scenario)
            key = (server.name, rate, window)
            watch = self.observer.watch(key) if self.observer is not None else nullcontext()
            try:
                with watch:
                    return await run_load(
                        scenario, target, duration_s=duration, total_rps=rate, salt=run_salt
                    )
            finally:
                await target.close()

        result = run_client(go())
        self._write_records(server, rate, window, result)
        s = result.summary()
        again = f" (window {window + 1})" if window else ""
        print(
            f"  {server.name:<6} {rate:7.3f} req/s x {duration:4.0f} s{again}: "
            f"{s['requests']:4d} requests, SLO {s['slo_attainment']:6.1%} (misses: TTFT "
            f"{s['ttft_slo_misses']}, TPOT {s['tpot_slo_misses']}), goodput "
            f"{s['goodput_rps']:.3f}/s, TTFT p99 {s['ttft_p99_s']:.2f} s, refused {s['refused']}, "
            f"errors {s['errors']}, unfinished {s['unfinished']} "
            f"[{time.monotonic() - self.started:.0f} s]",
            flush=True,
        )
        time.sleep(self.options.settle_s)
        return result

    def _write_records(self, server: Server, rate: float, window: int, result: LoadResult) -> None:
        """``<server>-<rate>.jsonl`` under ``records_dir`` (a repeat: ``<server>-<rate>-<n>``,
        n from 2); a first window removes the repeats of the run it replaces."""
        if self.records_dir is None:
            return
        self.records_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{server.name}-{rate:g}"
        if window == 0:
            for stale in self.records_dir.glob(f"{stem}-*.jsonl"):
                stale.unlink()
        name = f"{stem}-{window + 1}.jsonl" if window else f"{stem}.jsonl"
        lines = (json.dumps(r.to_json()) + "\n" for r in result.records)
        (self.records_dir / name).write_text("".join(lines))

    def warm(self, server: Server, rate: float, seconds: float) -> None:
        """``seconds`` of the scenario at ``rate``, recorded nowhere (a fresh server before its
        search); ``RuntimeError`` with the first failure when no request finished, since every
        later run would then measure a broken server."""
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

    def warm_up(self, server: Server, timeout_s: float = 120.0) -> None:
        """A few unmeasured requests so both targets start warm (and Sluice sees its node)."""
        tenant = self.scenario.tenants[0]
        request = PlannedRequest(
            index=-1,
            tenant=tenant.name,
            workload_class=tenant.workload_class,
            scheduled_s=0.0,
            prompt=make_prompt(random.Random(0), 16),
            prompt_tokens=16,
            max_new_tokens=4,
            timeout_s=30.0,
        )

        async def go() -> None:
            target = self.target(server, self.scenario)
            deadline = time.monotonic() + timeout_s
            done = 0
            try:
                while done < self.options.warmup_requests:
                    try:
                        async for _ in target.generate(request):
                            pass
                        done += 1
                    except TargetError as exc:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{server.name} warm-up failed: {exc}") from exc
                        await asyncio.sleep(1.0)
            finally:
                await target.close()

        run_client(go())

    def search(self, server: Server, start_rps: float) -> SearchResult:
        """Capacity at SLO of ``server``, starting at ``start_rps``.

        The search never goes below ``min_requests / max_step_s``, the lowest rate at which a
        run still holds ``min_requests`` requests on average; a run without requests passes
        nothing.
        """
        return find_capacity(
            lambda rate: self.attainment(server, rate), **self.search_terms(start_rps)
        )

    def probes(self, start_rps: float) -> Generator[float, float, SearchResult]:
        """:meth:`search`'s probes one at a time (:func:`capacity_probes`): send each rate's
        :meth:`attainment`."""
        return capacity_probes(**self.search_terms(start_rps))

    def attainment(self, server: Server, rate: float) -> float:
        """SLO attainment of one run of ``server`` at ``rate`` (0 for a run without requests)."""
        return attainment_of(self.measure(server, rate))

    def search_terms(self, start_rps: float) -> SearchTerms:
        """The search's settings from the options (see :meth:`search`)."""
        o = self.options
        return {
            "start_rps": start_rps,
            "factor": o.search_factor,
            "refine_steps": o.refine_steps,
            "max_steps": o.max_search_steps,
            "required": o.required_attainment,
            "min_rps": o.min_requests / max(o.max_step_s, o.step_s),
        }

    def levels(
        self,
        server: Server,
        plan: Sequence[tuple[float, str]],
        realtime_judged_at: float | None = None,
    ) -> list[tuple[float, str]]:
        """Measure each ``(rate, label)`` (reusing runs); returns those the budget allowed.

        The level at ``realtime_judged_at`` (the naive capacity, where REALTIME TTFT is
        compared) holds ``realtime_min_requests`` REALTIME requests.
        """
        o = self.options
        judged = None if realtime_judged_at is None else round(realtime_judged_at, RATE_DIGITS)
        done = []
        for rate, label in plan:
            realtime = o.realtime_min_requests if round(rate, RATE_DIGITS) == judged else 0
            try:
                self.measure(server, rate, o.level_min_requests, realtime)
                done.append((round(rate, RATE_DIGITS), label))
            except BudgetExhausted as exc:
                print(f"  skipped {server.name} at {rate:.3f} req/s: {exc}", flush=True)
        return done


def run_target(bench: Benchmark, server: Server, what: Callable[[], None]) -> None:
    """Start ``server``, warm it up, run ``what``, always stop it."""
    print(f"starting {server.name} ...", flush=True)
    started = time.monotonic()
    server.start()
    try:
        bench.warm_up(server)
        print(f"{server.name} ready at {server.address} in {time.monotonic() - started:.0f} s")
        what()
    finally:
        server.stop()
