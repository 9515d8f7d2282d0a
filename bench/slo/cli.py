"""``python -m bench.slo`` (``make bench-slo``): issue 20's overload figures on every scenario
with `sluice up`'s default node settings, and the autoscaling signals that chose issue 21's
scaling metric; writes ``slo.json`` and ``slo.md`` under ``--out-dir`` with this run's figures
only.

For each scenario (default: every file of ``bench/scenarios`` but ``smoke.yaml``), with the
overload benchmark's machinery (:class:`bench.overload.benchmark.Benchmark`), Sluice only, two
suites up together (:func:`bench.overload.paired.run_paired`):

- *default*: a suite as `sluice up` starts it (32 sequences, the guard on);
- *reference*: a suite under the original scenario's terms before the inter-token guard (the
  node capped at 16 sequences as ``make bench`` runs it, the guard off).

1. Each suite gets ``WARM_S`` of the scenario, unmeasured (``Benchmark.warm``).
2. Their capacity searches at SLO run one probe of each in turn, the default's first.
3. If the capacities differ, the higher one is the *contested rate*: each suite probes it once
   more, in turn, and is judged there on all its probes at that rate pooled; its capacity is
   that rate if they pass, else the highest rate below it that passed in its search (rounds
   go on while both fell and they still differ: :mod:`bench.overload.paired`).
4. The reference suite is stopped; the scenario runs on the default suite at 1x, 2x and 4x its
   capacity (a level at a rate its search measured reuses those windows).

Taking turns puts both suites' probes of a stretch on the machine as it was then, and the
confirmation keeps one probe near the SLO's edge from deciding the capacity figure
(docs/decisions/bench-slo-paired.md).

The scheduler's metrics are sampled through every run (:mod:`bench.slo.signals`), and a bare
refusal server is probed through every run (:mod:`bench.slo.floor`). Every process started is
stopped by its PID (the suite's supervisor, the floor's own), on errors too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench.load.records import RequestRecord, meets_slo
from bench.load.run import LoadResult, make_target
from bench.load.scenario import Scenario, load_scenario
from bench.load.targets import Target
from bench.overload.benchmark import Benchmark
from bench.overload.options import Options
from bench.overload.paired import Phase, multiples_plan, run_paired
from bench.overload.search import SearchResult
from bench.overload.servers import Server, SluiceSuite
from bench.paths import RESULTS_DIR, SCENARIOS_DIR, SCRATCH_DIR
from bench.slo.figures import by_class, capacity_verdict, level_verdict, refusals
from bench.slo.floor import Observers, RefusalFloor
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
DEFAULT_ARM, REFERENCE_ARM = "default", "reference"
"""The suites' names: runs, log lines and records files are keyed by them."""
ARMS = "in turns"
"""What ``slo.json``'s ``arms`` says: both suites up together, measured in turns."""


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


class SuiteBenchmark(Benchmark):
    """:class:`Benchmark` whose every server is a Sluice suite, whatever its name (the suites
    here are named by their terms, :data:`DEFAULT_ARM` and :data:`REFERENCE_ARM`)."""

    def target(self, server: Server, scenario: Scenario) -> Target:
        """Sluice at the suite's address, with the tenants' keys."""
        return make_target("sluice", scenario, server.address, self.keys)


@dataclass
class Arm:
    """One suite's part of a scenario: its phase and the sampler watching its runs."""

    phase: Phase
    sampler: Sampler
    floor: RefusalFloor | None = None
    """The bare refusal floor probed through its runs (None: not probed)."""


def arm(
    scenario: Scenario,
    keys: dict[str, str],
    opts: Options,
    run_dir: Path,
    name: str,
    floor: RefusalFloor | None = None,
) -> Arm:
    """The suite called ``name`` (:data:`REFERENCE_ARM`: the original terms, search only;
    otherwise the defaults), its benchmark writing records under ``run_dir``; ``floor`` is
    probed through each of its runs."""
    own_dir = run_dir / f"{scenario.name}-{name}"
    own_dir.mkdir(parents=True, exist_ok=True)
    reference = name == REFERENCE_ARM
    suite = SluiceSuite(
        scenario,
        keys,
        own_dir,
        max_sequences=REFERENCE_MAX_SEQUENCES if reference else None,
        scheduler_args=GUARD_OFF if reference else None,
        name=name,
    )
    sampler = Sampler(lambda: suite.metrics_address)
    observer = sampler if floor is None else Observers(sampler, floor)
    bench = SuiteBenchmark(scenario, keys, opts, observer=observer)
    bench.records_dir = own_dir / "records"
    return Arm(Phase(bench, suite, search_only=reference), sampler, floor)


def level_plan(search: SearchResult, start_rps: float) -> list[tuple[float, str]]:
    """The default suite's levels: 1x, 2x and 4x its capacity at SLO, or of the lowest rate its
    search probed when none met the SLO (the labels say which)."""
    return multiples_plan(search, start_rps, MULTIPLES)


def _meets(result: LoadResult) -> Callable[[RequestRecord], bool]:
    slo = result.slo
    return lambda r: meets_slo(r, slo)


def search_json(search: SearchResult | None) -> dict[str, Any]:
    """A search as ``slo.json`` keeps it: capacity, steps, the confirmations made."""
    return {
        "capacity_rps": search.capacity_rps if search else None,
        "search": [asdict(s) for s in search.steps] if search else [],
        "confirmation": [asdict(c) for c in search.confirmations] if search else [],
    }


def run_scenario(
    scenario: Scenario,
    opts: Options,
    start_rps: float,
    run_dir: Path,
    reference: bool,
    floor: RefusalFloor | None = None,
) -> dict[str, Any]:
    """Both suites on one scenario, up together and measured in turns; the scenario's entry."""
    keys = {t.name: new_api_key() for t in scenario.tenants}
    names = (DEFAULT_ARM, REFERENCE_ARM) if reference else (DEFAULT_ARM,)
    arms = [arm(scenario, keys, opts, run_dir, name, floor) for name in names]
    run_paired(
        [a.phase for a in arms],
        start_rps,
        (start_rps, WARM_S),
        partial(level_plan, start_rps=start_rps),
        confirm_contested=True,
    )
    default = arms[0]
    entry: dict[str, Any] = {"scenario": scenario.name, "model": scenario.model}
    all_bins: list[dict[str, Any]] = []
    if reference:
        ref = arms[1].phase
        entry["reference"] = {
            "max_sequences": REFERENCE_MAX_SEQUENCES,
            "scheduler_flags": GUARD_OFF,
            **search_json(ref.search),
        }
        if ref.error:
            entry["reference"]["error"] = ref.error
        all_bins += _search_bins(arms[1], set(), label="reference")
    if default.phase.error:
        entry["error"] = default.phase.error
        print(f"{scenario.name}: {entry['error']}", file=sys.stderr, flush=True)
    entry.update(search_json(default.phase.search))
    entry["levels"] = _levels(default, all_bins)
    one_x = entry["levels"][0] if entry["levels"] else None
    for level in entry["levels"][1:]:
        level["verdict"] = level_verdict(level, one_x)
    all_bins += _search_bins(default, {rate for rate, _ in default.phase.levels})
    ref_entry = entry.get("reference") or {}
    entry["capacity"] = capacity_verdict(
        entry["capacity_rps"] or 0.0, ref_entry.get("capacity_rps")
    )
    if "error" in entry or "error" in ref_entry:
        entry["capacity"]["pass"] = False
    entry["bins"] = all_bins
    return entry


def _window_bins(a: Arm, key: tuple[str, float], label: str) -> list[dict[str, Any]]:
    """The bins of each window kept at ``key`` (a repeated rate has several), labelled."""
    out: list[dict[str, Any]] = []
    for n, window in enumerate(a.phase.bench.windows.get(key, [])):
        series = a.sampler.series.get((*key, n))
        if series is None:
            continue
        start, length = window.started_at_unix_s, window.duration_s
        run_bins = bins(series.points, window.records, start, length, _meets(window))
        run = f"{label} (window {n + 1})" if n else label
        out.extend({"run": run, **b} for b in run_bins)
    return out


def _levels(a: Arm, all_bins: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each level run on the arm, by class (its windows pooled), its bins into ``all_bins``."""
    out = []
    name = a.phase.server.name
    for rate, label in a.phase.levels:
        result = a.phase.bench.runs[(name, rate)]
        all_bins.extend(_window_bins(a, (name, rate), label))
        out.append(
            {
                "label": label,
                "offered_rps": rate,
                "window_s": result.duration_s,
                "classes": by_class(result.records, result.slo, result.duration_s),
                "refusals": refusals(result.records),
                "floor": _floor(a, (name, rate)),
            }
        )
    return out


def _floor(a: Arm, key: tuple[str, float]) -> dict[str, Any] | None:
    """The refusal floor probed through the windows kept at ``key`` (None: not probed)."""
    if a.floor is None:
        return None
    windows = len(a.phase.bench.windows.get(key, []))
    return a.floor.summary([(*key, n) for n in range(windows)])


def _search_bins(a: Arm, skip: set[float], label: str = "search") -> list[dict[str, Any]]:
    """The bins of the arm's runs at rates not in ``skip`` (the levels')."""
    out: list[dict[str, Any]] = []
    for key in a.phase.bench.windows:
        if key[1] not in skip:
            out.extend(_window_bins(a, key, f"{label} {key[1]:g} req/s"))
    return out


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
        "--no-floor",
        action="store_true",
        help="do not probe a bare refusal server through the runs (bench/slo/floor.py)",
    )
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
    floor = None if args.no_floor else RefusalFloor(run_dir / "refusal-floor.log")
    try:
        if floor is not None:
            floor.start()
        for path in paths:
            scenario = load_scenario(path)
            print(f"== {scenario.name}", flush=True)
            reference = not args.no_reference
            entries.append(run_scenario(scenario, opts, args.start_rps, run_dir, reference, floor))
    finally:
        if floor is not None:
            floor.stop()
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
        "refusal_floor": "probed" if floor is not None else "off",
        "arms": ARMS,
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
