"""``python -m bench.slo`` (``make bench-slo``): issue 20's overload figures on every scenario
with `sluice up`'s default node settings, and the autoscaling signals that chose issue 21's
scaling metric; writes ``slo.json`` and ``slo.md`` under ``--out-dir`` with this run's figures
only.

For each scenario (default: every file of ``bench/scenarios`` but ``smoke.yaml``), with the
overload benchmark's machinery (:class:`bench.overload.benchmark.Benchmark`), Sluice only:

1. *reference*: a suite under the original scenario's terms before the inter-token guard (the
   node capped at 16 sequences as ``make bench`` runs it, the guard off); its capacity at SLO;
2. *default*: a suite as `sluice up` starts it (32 sequences, the guard on); its capacity at
   SLO, then the scenario at 1x, 2x and 4x that capacity.

Each suite first gets ``WARM_S`` of the scenario, unmeasured (:func:`warm`).

The scheduler's metrics are sampled through every run (:mod:`bench.slo.signals`). Every process
started is stopped by its PID (the suite's supervisor), on errors too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.load.records import RequestRecord, meets_slo
from bench.load.run import LoadResult, make_target, run_client, run_load
from bench.load.scenario import Scenario, load_scenario
from bench.overload.benchmark import Benchmark, run_target
from bench.overload.options import Options
from bench.overload.search import RATE_DIGITS, SearchResult
from bench.overload.servers import SluiceSuite
from bench.paths import RESULTS_DIR, SCENARIOS_DIR, SCRATCH_DIR
from bench.slo.figures import by_class, capacity_verdict, level_verdict, refusals
from bench.slo.report import markdown
from bench.slo.signals import Sampler, bins, score_signals
from sluice.runtime.auth import new_api_key
from sluice.runtime.runner import event_loop_kind

REFERENCE_MAX_SEQUENCES = 16
GUARD_OFF = [
    "--realtime-itl-target-seconds", "0",
    "--batch-itl-target-seconds", "0",
    "--finetune-itl-target-seconds", "0",
    "--realtime-ttft-target-seconds", "0",
    "--realtime-embed-target-seconds", "0",
]  # fmt: skip
"""The reference scheduler's flags: no inter-token, TTFT or embed target, slots alone (the
1.5 s REALTIME queue bound it had then stays)."""
MULTIPLES = (1.0, 2.0, 4.0)


def default_scenarios() -> list[Path]:
    """Every scenario file but the smoke one."""
    return sorted(p for p in SCENARIOS_DIR.glob("*.yaml") if p.name != "smoke.yaml")


def options(args: argparse.Namespace) -> Options:
    """The overload benchmark's options for these runs."""
    return Options(
        step_s=args.step_s,
        min_requests=args.min_requests,
        level_min_requests=args.level_min_requests,
        max_step_s=args.max_step_s,
        realtime_min_requests=0,
        drain_s=args.drain_s,
        settle_s=args.settle_s,
        refine_steps=args.refine_steps,
        max_search_steps=args.max_search_steps,
        node_max_sequences=0,
    )


WARM_S = 20.0
"""The scenario's traffic a fresh suite gets, unmeasured, before its search: the node fits its
step time only once its batch has varied, and a first probe on a cold suite ran without the
guard and with a cold prompt path (the overload scenario's first probe missed the SLO on a
fresh suite and passed later at twice its rate: 2026-12-03, ``bench/results/slo.md``)."""


def warm(bench: Benchmark, suite: SluiceSuite, rate: float, seconds: float = WARM_S) -> None:
    """``seconds`` of the scenario at ``rate`` against ``suite``, recorded nowhere."""

    async def go() -> None:
        target = make_target(suite.name, bench.scenario, suite.address, bench.keys)
        try:
            await run_load(bench.scenario, target, duration_s=seconds, total_rps=rate, salt="warm")
        finally:
            await target.close()

    run_client(go())


def _meets(result: LoadResult) -> Callable[[RequestRecord], bool]:
    slo = result.slo
    return lambda r: meets_slo(r, slo)


def run_scenario(
    scenario: Scenario, opts: Options, start_rps: float, run_dir: Path, reference: bool
) -> dict[str, Any]:
    """Both suites on one scenario (the reference first); the scenario's entry."""
    keys = {t.name: new_api_key() for t in scenario.tenants}
    entry: dict[str, Any] = {"scenario": scenario.name, "model": scenario.model}
    all_bins: list[dict[str, Any]] = []
    if reference:
        ref_dir = run_dir / f"{scenario.name}-reference"
        ref_dir.mkdir(parents=True, exist_ok=True)
        ref = _search_only(scenario, keys, opts, start_rps, ref_dir, all_bins)
        entry["reference"] = ref
    sampler = Sampler(lambda: suite.metrics_address)
    bench = Benchmark(scenario, keys, opts, observer=sampler)
    own_dir = run_dir / f"{scenario.name}-default"
    own_dir.mkdir(parents=True, exist_ok=True)
    bench.records_dir = own_dir / "records"
    suite = SluiceSuite(scenario, keys, own_dir, max_sequences=None)
    searched: dict[str, SearchResult] = {}
    done: list[tuple[float, str]] = []

    def measure() -> None:
        warm(bench, suite, start_rps)
        searched["default"] = bench.search(suite, start_rps)
        cap = searched["default"].capacity_rps
        of = "capacity"
        if cap <= 0:  # no rate met the SLO: the levels say what they are multiples of
            cap = min((s.offered_rps for s in searched["default"].steps), default=start_rps)
            of = "the lowest rate probed (no capacity at SLO found)"
        plan = [(m * cap, f"{m:g}x {of}") for m in MULTIPLES]
        done.extend(bench.levels(suite, plan))

    try:
        run_target(bench, suite, measure)
    except Exception as exc:  # what was measured is kept; the entry says what failed
        entry["error"] = f"{type(exc).__name__}: {exc}"
        print(f"{scenario.name}: {entry['error']}", file=sys.stderr, flush=True)
    search = searched.get("default")
    entry["capacity_rps"] = search.capacity_rps if search else None
    entry["search"] = [vars(s) for s in search.steps] if search else []
    entry["levels"] = _levels(bench, sampler, done, all_bins)
    one_x = entry["levels"][0] if entry["levels"] else None
    for level in entry["levels"][1:]:
        level["verdict"] = level_verdict(level, one_x)
    _search_bins(bench, sampler, all_bins, {round(r, RATE_DIGITS) for r, _ in done})
    entry["capacity"] = capacity_verdict(
        entry["capacity_rps"] or 0.0, (entry.get("reference") or {}).get("capacity_rps")
    )
    if "error" in entry:
        entry["capacity"]["pass"] = False
    entry["bins"] = all_bins
    return entry


def _search_only(
    scenario: Scenario,
    keys: dict[str, str],
    opts: Options,
    start_rps: float,
    run_dir: Path,
    all_bins: list[dict[str, Any]],
) -> dict[str, Any]:
    suite = SluiceSuite(
        scenario, keys, run_dir, max_sequences=REFERENCE_MAX_SEQUENCES, scheduler_args=GUARD_OFF
    )
    sampler = Sampler(lambda: suite.metrics_address)
    bench = Benchmark(scenario, keys, opts, observer=sampler)
    bench.records_dir = run_dir / "records"
    found: dict[str, SearchResult] = {}
    out: dict[str, Any] = {
        "max_sequences": REFERENCE_MAX_SEQUENCES,
        "scheduler_flags": GUARD_OFF,
    }
    try:

        def measure() -> None:
            warm(bench, suite, start_rps)
            found["ref"] = bench.search(suite, start_rps)

        run_target(bench, suite, measure)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    search = found.get("ref")
    out["capacity_rps"] = search.capacity_rps if search else None
    out["search"] = [vars(s) for s in search.steps] if search else []
    _search_bins(bench, sampler, all_bins, set(), label="reference")
    return out


def _levels(
    bench: Benchmark,
    sampler: Sampler,
    done: Sequence[tuple[float, str]],
    all_bins: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    out = []
    for rate, label in done:
        key = ("sluice", rate)
        result = bench.runs[key]
        meets = _meets(result)
        series = sampler.series.get(key)
        run_bins = (
            bins(series.points, result.records, result.started_at_unix_s, result.duration_s, meets)
            if series
            else []
        )
        all_bins.extend({"run": label, **b} for b in run_bins)
        out.append(
            {
                "label": label,
                "offered_rps": rate,
                "window_s": result.duration_s,
                "classes": by_class(result.records, result.slo, result.duration_s),
                "refusals": refusals(result.records),
            }
        )
    return out


def _search_bins(
    bench: Benchmark,
    sampler: Sampler,
    all_bins: list[dict[str, Any]],
    skip: set[float],
    label: str = "search",
) -> None:
    for (_, rate), result in bench.runs.items():
        series = sampler.series.get(("sluice", rate))
        if rate in skip or series is None:
            continue
        meets = _meets(result)
        run_bins = bins(
            series.points, result.records, result.started_at_unix_s, result.duration_s, meets
        )
        all_bins.extend({"run": f"{label} {rate:g} req/s", **b} for b in run_bins)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m bench.slo", description=__doc__)
    p.add_argument("--scenario", type=Path, action="append", help="repeatable; default: all")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--start-rps", type=float, default=0.5, help="first rate each search probes")
    p.add_argument("--step-s", type=float, default=30.0)
    p.add_argument("--min-requests", type=int, default=20)
    p.add_argument("--level-min-requests", type=int, default=60)
    p.add_argument("--max-step-s", type=float, default=120.0)
    p.add_argument("--drain-s", type=float, default=None)
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument("--refine-steps", type=int, default=1)
    p.add_argument("--max-search-steps", type=int, default=5)
    p.add_argument("--no-reference", action="store_true", help="skip the reference suites")
    p.add_argument(
        "--rescore",
        type=Path,
        help="no runs: score the signals of an earlier slo.json from its own bins and write "
        "it and slo.md again (the report's code changed, not the measurements)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every scenario, write slo.json and slo.md; exit 1 when one could not be measured."""
    args = parse_args(argv)
    if args.rescore is not None:
        earlier: dict[str, Any] = json.loads(args.rescore.read_text())
        bins_read = [b for e in earlier["scenarios"] for b in e.get("bins", [])]
        write({**earlier, "signals": score_signals(bins_read)}, args.rescore.parent)
        return 0
    paths = args.scenario or default_scenarios()
    opts = options(args)
    SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="slo-", dir=SCRATCH_DIR))
    started, started_at = time.monotonic(), datetime.now(UTC)
    print(f"bench-slo: {len(paths)} scenarios; logs in {run_dir}", flush=True)
    entries = []
    for path in paths:
        scenario = load_scenario(path)
        print(f"== {scenario.name}", flush=True)
        entries.append(run_scenario(scenario, opts, args.start_rps, run_dir, not args.no_reference))
    all_bins = [b for e in entries for b in e["bins"]]
    doc: dict[str, Any] = {
        "generated_at": started_at.isoformat(timespec="seconds"),
        "wall_s": round(time.monotonic() - started, 1),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "options": asdict(opts),
        "scenarios": entries,
        "signals": score_signals(all_bins),
        "client_loop": event_loop_kind(),
        "refusal_p99_over": "level",
    }
    write(doc, args.out_dir)
    return 1 if any("error" in e for e in entries) else 0


def write(doc: dict[str, Any], out_dir: Path) -> None:
    """``slo.json`` and ``slo.md`` under ``out_dir``; the report printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "slo.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out_dir / "slo.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))
    print(f"wrote {out_dir / 'slo.json'} and slo.md (run of {doc['wall_s']:.0f} s)")
