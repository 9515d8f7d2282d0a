"""Overload benchmark: Sluice against the naive one-at-a-time server, same machine, same model.

``python -m bench.overload`` (``make bench``) serves the traffic mix of
``bench/scenarios/overload.yaml`` (tenants A and B ``REALTIME`` with weights 2 and 1, C a
``BATCH`` flood) to one target at a time:

1. the naive server (:mod:`bench.naive_server`, a child process): its capacity at SLO by a
   stepped search, then 1x, 2x and 4x that rate;
2. the Sluice suite (``sluice up``'s supervisor: etcd, Redis, cache, one node, scheduler, with a
   tenants file written for the scenario's tenants): the same absolute rates (1x, 2x, 4x the
   naive capacity), its own capacity at SLO, then 1x, 2x and 4x its own capacity.

*Capacity at SLO* is the highest offered rate at which at least 95 % of requests finish with
TTFT <= 2 s and mean TPOT <= 0.25 s. The search starts at ``--naive-start-rps`` (Sluice: at the
naive capacity), multiplies by ``--search-factor`` while steps pass (divides while they fail),
then refines between the last pass and the first failure with ``--refine-steps`` geometric
midpoints. A run at some rate is reused for any later one at that rate whose window is no longer
(a level equal to a search step reuses that step's run unless the level needs a longer window).
Every figure in the results comes from this run.

Levels hold ``--level-min-requests`` requests on average, within ``--max-step-s``. The level at
1x the naive capacity, where REALTIME TTFT is compared, lasts long enough to hold
``--realtime-min-requests`` REALTIME requests (pooled over the realtime tenants): on average, at
the scenario's realtime share of the offered rate, and in the seeded plan itself; it may exceed
``--max-step-s`` but not ``--max-level-s``.

Results: ``overload.json`` (schema in :mod:`bench.overload_report`), ``overload.md``,
``overload.png`` and ``overload_shares.png`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import yaml

from bench.load import LoadResult, make_target, run_load
from bench.load_scenario import (
    PlannedRequest,
    Scenario,
    load_scenario,
    make_prompt,
    plan_requests,
)
from bench.load_targets import TargetError
from bench.overload_report import (
    REALTIME,
    build_report,
    capacity_label,
    render_text,
    write_outputs,
)
from sluice.local.stores import environment_without_proxies, free_port
from sluice.local.up import Supervisor, UpConfig, wait_serving
from sluice.runtime.auth import hash_api_key, new_api_key

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIO = REPO_ROOT / "bench" / "scenarios" / "overload.yaml"
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MODEL_CPU_NICE = UpConfig.node_cpu_nice
"""Nice increment of both targets' model processes (the naive server and Sluice's node), as
``sluice up`` gives its nodes: the load client, the scheduler and the stores share these two
cores with the model, and a node would have its own machine in production."""
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


class Server(Protocol):
    """A target's server process(es), started and stopped around its runs."""

    name: str
    address: str

    def start(self) -> None:
        """Start and wait until it serves."""
        ...

    def stop(self) -> None:
        """Stop everything started."""
        ...


class NaiveProcess:
    """``python -m bench.naive_server`` as a child process on a free loopback port."""

    name = "naive"

    def __init__(self, model: str, run_dir: Path, startup_timeout_s: float = 600.0) -> None:
        self.model = model
        self.run_dir = run_dir
        self.startup_timeout_s = startup_timeout_s
        self.address = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait for ``SERVING`` (its model is loaded and warm by then)."""
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        log_path = self.run_dir / "naive_server.log"
        self._log = log_path.open("ab")
        env = {**environment_without_proxies(), **CHILD_ENV}
        argv = [sys.executable, "-m", "bench.naive_server", "--model", self.model]
        argv += ["--port", str(port), "--log-format", "json", "--cpu-nice", str(MODEL_CPU_NICE)]
        self._proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_serving(self.address, self._proc, log_path, self.startup_timeout_s)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; by PID only."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()


class SluiceSuite:
    """The whole suite through ``sluice up``'s supervisor, with the scenario's tenants."""

    name = "sluice"

    def __init__(
        self,
        scenario: Scenario,
        keys: dict[str, str],
        run_dir: Path,
        nodes: int = 1,
        max_sequences: int | None = None,
    ) -> None:
        self.scenario = scenario
        self.keys = keys
        self.run_dir = run_dir
        self.nodes = nodes
        self.max_sequences = max_sequences
        self.address = ""
        self._supervisor: Supervisor | None = None

    def write_tenants(self) -> Path:
        """A tenants file holding each scenario tenant's weight and key hash."""
        path = self.run_dir / "tenants.yaml"
        tenants = [
            {
                "name": t.name,
                "api_key_hashes": [hash_api_key(self.keys[t.name])],
                "weight": t.weight,
            }
            for t in self.scenario.tenants
        ]
        path.write_text(yaml.safe_dump({"tenants": tenants}, sort_keys=False))
        return path

    def start(self) -> None:
        """Start etcd, Redis, cache, node(s) and scheduler; returns once all serve."""
        config = UpConfig(
            run_dir=self.run_dir / "suite",
            nodes=self.nodes,
            models=[self.scenario.model],
            tenants_file=self.write_tenants(),
            max_sequences=self.max_sequences,
            node_cpu_nice=MODEL_CPU_NICE,
        )
        self._supervisor = Supervisor(config)
        try:
            endpoints = self._supervisor.start()
        except BaseException:
            self._supervisor.stop()
            raise
        self.address = endpoints.scheduler["grpc"]

    def stop(self) -> None:
        """Stop every child, then the stores."""
        if self._supervisor is not None:
            self._supervisor.stop()


@dataclass(frozen=True)
class Options:
    """How the benchmark runs (flags of the same names, see ``--help``)."""

    step_s: float = 45.0
    """Arrival window of each run, unless ``min_requests`` needs longer."""
    min_requests: int = 15
    """Requests a search step should hold on average: slow rates get longer windows."""
    level_min_requests: int = 25
    """Requests a load level should hold on average (a shorter search step at the same rate
    is measured again, longer, so tail latencies rest on more samples)."""
    max_step_s: float = 300.0
    """Longest window; with ``min_requests`` it sets the lowest rate the search probes (0.05
    req/s: the naive server's 0.1 req/s step can miss 95 % on one slow request of 13)."""
    realtime_min_requests: int = 16
    """REALTIME requests (all realtime tenants together) the level at 1x the naive capacity must
    hold, on average and in its seeded plan: its REALTIME TTFT p99s are compared (0: no such
    lengthening)."""
    max_level_s: float = 900.0
    """Longest window of that level (it may exceed ``max_step_s``)."""
    drain_s: float | None = None
    """Override of the scenario's drain (wait for requests in flight after the window)."""
    settle_s: float = 2.0
    """Pause between runs."""
    naive_start_rps: float = 0.2
    """First rate the naive search probes (Sluice's starts at the naive capacity)."""
    search_factor: float = 2.0
    """Rate multiplier between search steps."""
    refine_steps: int = 2
    """Geometric midpoints probed once the capacity is bracketed."""
    max_search_steps: int = 7
    """Most runs one search makes."""
    required_attainment: float = 0.95
    """Share of requests that must meet the SLO for a rate to pass."""
    naive_multiples: tuple[float, ...] = (1.0, 2.0, 4.0)
    """Levels offered to both targets, as multiples of the naive capacity."""
    own_multiples: tuple[float, ...] = (1.0, 2.0, 4.0)
    """Levels offered to Sluice, as multiples of its own capacity."""
    warmup_requests: int = 3
    """Unmeasured requests sent to each target before its first run."""
    time_budget_s: float = 0.0
    """Skip runs that would end past this many seconds (0: no limit)."""
    node_max_sequences: int = 16
    """Batch cap of Sluice's node, sized to the scenario's SLO as an operator would: on the
    2-core VM SmolLM2-135M decodes 84 tokens/s at 8 sequences and 112 at 32
    (``bench/results/engine.md``), a step of about 0.03 s + 0.008 s per sequence. At 32 a
    full batch spends 0.28 s per token, past the 0.25 s TPOT SLO, and a 96-token answer needs
    27 s, past the 20 s deadline: admitted streams ran out of time as the batch filled. At
    16 the same fit gives about 0.16 s per token, for about 10 % less throughput."""


def realtime_share(scenario: Scenario) -> float:
    """Share of the scenario's offered rate sent by its ``realtime`` tenants (the same at every
    offered rate: a run scales all tenants' rates together)."""
    realtime = sum(t.rate_rps for t in scenario.tenants if t.workload_class == REALTIME)
    return realtime / scenario.total_rps


class Benchmark:
    """Runs the measurements and remembers each, keyed by (target, offered rate)."""

    def __init__(self, scenario: Scenario, keys: dict[str, str], options: Options) -> None:
        self.scenario = scenario
        self.keys = keys
        self.options = options
        self.runs: dict[tuple[str, float], LoadResult] = {}
        self.started = time.monotonic()

    def duration_for(
        self, rate: float, min_requests: int | None = None, realtime_min_requests: int = 0
    ) -> float:
        """The arrival window at ``rate``: long enough for ``min_requests`` (default: the
        search's), within ``[step_s, max_step_s]``.

        With ``realtime_min_requests``, lengthened up to ``max_level_s`` (never shortened) so
        that the scenario's realtime share yields that many REALTIME requests on average, and
        the run's seeded plan holds that many (a Poisson draw can fall short of its mean).
        """
        o = self.options
        wanted = (min_requests or o.min_requests) / rate
        window = min(max(o.step_s, wanted), max(o.max_step_s, o.step_s))
        share = realtime_share(self.scenario)
        if realtime_min_requests <= 0 or share <= 0:
            return window
        on_average = realtime_min_requests / (rate * share)
        needed = max(on_average, self._planned_realtime_window(rate, realtime_min_requests))
        return max(window, min(needed, o.max_level_s))

    def _planned_realtime_window(self, rate: float, count: int) -> float:
        """The shortest whole-second window whose plan at ``rate`` holds ``count`` REALTIME
        requests (a longer window's plan extends a shorter one's); ``max_level_s`` if none
        within it does."""
        cap = self.options.max_level_s
        plan = plan_requests(self.scenario, duration_s=cap, total_rps=rate)
        arrivals = [r.scheduled_s for r in plan if r.workload_class == REALTIME]
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

    def measure(
        self,
        server: Server,
        rate: float,
        min_requests: int | None = None,
        realtime_min_requests: int = 0,
    ) -> LoadResult:
        """One load run at ``rate`` with the window :meth:`duration_for` gives; a run of
        ``server`` at that rate with a window at least as long is reused instead."""
        rate = round(rate, RATE_DIGITS)
        key = (server.name, rate)
        duration = self.duration_for(rate, min_requests, realtime_min_requests)
        earlier = self.runs.get(key)
        if earlier is not None and earlier.duration_s >= duration - 1e-6:
            return earlier
        self._check_budget(duration)
        scenario = self.scenario
        if self.options.drain_s is not None:
            scenario = scenario.model_copy(update={"drain_s": self.options.drain_s})

        async def go() -> LoadResult:
            target = make_target(server.name, scenario, server.address, self.keys)
            try:
                return await run_load(scenario, target, duration_s=duration, total_rps=rate)
            finally:
                await target.close()

        result = asyncio.run(go())
        self.runs[key] = result
        s = result.summary()
        print(
            f"  {server.name:<6} {rate:7.3f} req/s x {duration:4.0f} s: "
            f"{s['requests']:4d} requests, SLO {s['slo_attainment']:6.1%} (misses: TTFT "
            f"{s['ttft_slo_misses']}, TPOT {s['tpot_slo_misses']}), goodput "
            f"{s['goodput_rps']:.3f}/s, TTFT p99 {s['ttft_p99_s']:.2f} s, refused {s['refused']}, "
            f"errors {s['errors']}, unfinished {s['unfinished']} "
            f"[{time.monotonic() - self.started:.0f} s]",
            flush=True,
        )
        time.sleep(self.options.settle_s)
        return result

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
            target = make_target(server.name, self.scenario, server.address, self.keys)
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

        asyncio.run(go())

    def search(self, server: Server, start_rps: float) -> SearchResult:
        """Capacity at SLO of ``server``, starting at ``start_rps``.

        The search never goes below ``min_requests / max_step_s``, the lowest rate at which a
        run still holds ``min_requests`` requests on average; a run without requests passes
        nothing.
        """
        o = self.options

        def attainment(rate: float) -> float:
            summary = self.measure(server, rate).summary()
            return float(summary["slo_attainment"]) if summary["requests"] else 0.0

        return find_capacity(
            attainment,
            start_rps=start_rps,
            factor=o.search_factor,
            refine_steps=o.refine_steps,
            max_steps=o.max_search_steps,
            required=o.required_attainment,
            min_rps=o.min_requests / max(o.max_step_s, o.step_s),
        )

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


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    o = Options()
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    p.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO)
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--step-s", type=float, default=o.step_s, help="arrival window per run")
    p.add_argument("--min-requests", type=int, default=o.min_requests)
    p.add_argument("--level-min-requests", type=int, default=o.level_min_requests)
    p.add_argument("--max-step-s", type=float, default=o.max_step_s)
    p.add_argument(
        "--realtime-min-requests",
        type=int,
        default=o.realtime_min_requests,
        help="REALTIME requests the level at 1x the naive capacity holds (0: no lengthening)",
    )
    p.add_argument(
        "--max-level-s", type=float, default=o.max_level_s, help="longest window of that level"
    )
    p.add_argument("--drain-s", type=float, default=None, help="override the scenario's drain")
    p.add_argument("--settle-s", type=float, default=o.settle_s)
    p.add_argument("--naive-start-rps", type=float, default=o.naive_start_rps)
    p.add_argument("--search-factor", type=float, default=o.search_factor)
    p.add_argument("--refine-steps", type=int, default=o.refine_steps)
    p.add_argument("--max-search-steps", type=int, default=o.max_search_steps)
    p.add_argument("--naive-multiples", type=_floats, default=o.naive_multiples)
    p.add_argument("--own-multiples", type=_floats, default=o.own_multiples)
    p.add_argument("--warmup-requests", type=int, default=o.warmup_requests)
    p.add_argument(
        "--time-budget-s", type=float, default=o.time_budget_s, help="0: no limit (default)"
    )
    p.add_argument(
        "--node-max-sequences",
        type=int,
        default=o.node_max_sequences,
        help="batch cap of Sluice's node (sized to the SLO; see Options)",
    )
    p.add_argument("--run-dir", type=Path, default=None, help="logs of the servers")
    args = p.parse_args(argv)
    if args.search_factor <= 1 or args.step_s <= 0 or args.naive_start_rps <= 0:
        p.error("--search-factor must exceed 1; --step-s and --naive-start-rps must be positive")
    if args.realtime_min_requests < 0 or args.max_level_s <= 0:
        p.error("--realtime-min-requests must not be negative; --max-level-s must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole benchmark and write its results."""
    args = parse_args(argv)
    scenario = load_scenario(args.scenario)
    options = Options(
        step_s=args.step_s,
        min_requests=args.min_requests,
        level_min_requests=args.level_min_requests,
        max_step_s=args.max_step_s,
        realtime_min_requests=args.realtime_min_requests,
        max_level_s=args.max_level_s,
        drain_s=args.drain_s,
        settle_s=args.settle_s,
        naive_start_rps=args.naive_start_rps,
        search_factor=args.search_factor,
        refine_steps=args.refine_steps,
        max_search_steps=args.max_search_steps,
        naive_multiples=args.naive_multiples,
        own_multiples=args.own_multiples,
        warmup_requests=args.warmup_requests,
        time_budget_s=args.time_budget_s,
        node_max_sequences=args.node_max_sequences,
    )
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="overload-", dir=_scratch()))
    run_dir.mkdir(parents=True, exist_ok=True)
    keys = {t.name: new_api_key() for t in scenario.tenants}
    bench = Benchmark(scenario, keys, options)
    started_at = time.time()
    print(f"overload benchmark: {scenario.name} on {scenario.model}; logs in {run_dir}")
    searches: dict[str, SearchResult] = {}
    levels: dict[str, list[tuple[float, str]]] = {"naive": [], "sluice": []}

    def naive() -> None:
        searches["naive"] = bench.search(naive_server, options.naive_start_rps)
        base = _base(searches["naive"], options.naive_start_rps)
        plan = _plan(options.naive_multiples, base, "naive")
        levels["naive"] = bench.levels(naive_server, plan, realtime_judged_at=base)

    def sluice() -> None:
        naive_search = searches.get("naive", SearchResult(0.0))
        naive_base = _base(naive_search, options.naive_start_rps)
        searches["sluice"] = bench.search(suite, naive_base)
        own = _base(searches["sluice"], naive_base)
        plan = _plan(options.naive_multiples, naive_base, "naive")
        plan += _plan(options.own_multiples, own, "sluice")
        levels["sluice"] = bench.levels(suite, plan, realtime_judged_at=naive_base)

    naive_server = NaiveProcess(scenario.model, run_dir)
    suite = SluiceSuite(scenario, keys, run_dir, max_sequences=options.node_max_sequences)
    failures: list[str] = []
    for server, what in ((naive_server, naive), (suite, sluice)):
        try:
            run_target(bench, server, what)
        except Exception as exc:  # keep what was measured; the report says what failed
            failures.append(f"{server.name}: {type(exc).__name__}: {exc}")
            print(f"{server.name} failed: {exc}", file=sys.stderr, flush=True)
    report = build_report(
        scenario=scenario,
        runs=bench.runs,
        searches=searches,
        levels=levels,
        options=options,
        argv=list(sys.argv[1:] if argv is None else argv),
        started_at=started_at,
        duration_s=time.monotonic() - bench.started,
    )
    report["failures"] = failures
    paths = write_outputs(report, args.out_dir)
    print()
    print(render_text(report))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 1 if failures else 0


def _base(search: SearchResult, fallback: float) -> float:
    """The capacity to scale levels from; the lowest probed rate when nothing passed."""
    if search.capacity_rps > 0:
        return search.capacity_rps
    return min((s.offered_rps for s in search.steps), default=fallback)


def _plan(multiples: Sequence[float], base: float, of: str) -> list[tuple[float, str]]:
    """``(rate, label)`` of each multiple of ``base``, e.g. ``(0.4, "2x naive capacity")``."""
    return [(m * base, capacity_label(m, of)) for m in multiples]


def _scratch() -> Path:
    path = REPO_ROOT / ".sluice" / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
