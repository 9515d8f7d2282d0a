"""``python -m bench.overload`` (``make bench``): both targets in turn, then the report.

The naive server first: its capacity at SLO, then 1x, 2x and 4x that rate. Then the Sluice
suite: the same absolute rates, its own capacity at SLO, then 1x, 2x and 4x its own capacity.
What was measured is reported even when a target fails; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.load.scenario import load_scenario
from bench.overload.benchmark import Benchmark, run_target
from bench.overload.options import Options
from bench.overload.render import render_text, write_outputs
from bench.overload.report import build_report, capacity_label
from bench.overload.search import SearchResult
from bench.overload.servers import NaiveProcess, SluiceSuite
from bench.paths import RESULTS_DIR, SCENARIOS_DIR, SCRATCH_DIR
from sluice.runtime.auth import new_api_key

DEFAULT_SCENARIO = SCENARIOS_DIR / "overload.yaml"


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    o = Options()
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__)
    p.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
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
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    return SCRATCH_DIR
