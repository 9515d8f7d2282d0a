"""Scheduler figures on the real suite, in one run: overhead, refusal latency, fairness and
isolation.

``python -m bench.scheduler`` (``make bench-scheduler``) starts etcd, Redis, one inference node
with the tiny seeded Llama and a scheduler as child processes on free loopback ports
(:mod:`.suite`), runs the phases (:mod:`.measure`, :mod:`.isolation`) and writes
``scheduler.json`` and ``scheduler.md`` under ``--out-dir`` with only this run's figures
(:mod:`.report`). Headlines: overhead, TTFT p50 through the scheduler (with quotas) minus p50
straight to the node; refusal latency, the worst p99 of the three refusal kinds; the A:B share
ratio and Jain's index of the weight-normalised shares; isolation, the victim's TTFT p99 under
a flood over its p99 in calm.

Unless ``--shared-cpus`` is given (or the machine has one CPU), the node and the load processes
run on the last CPU, and this process, the stores and the scheduler on the others
(``docs/decisions/bench-scheduler-cpu-placement.md``). The report flags a run in which the
scheduler lost the node (a ``node_removed`` line in its log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.scheduler.isolation import SETTLE_BEFORE_CALM_S
from bench.scheduler.measure import measure
from bench.scheduler.report import (
    REFUSAL_KINDS,
    finite,
    markdown,
    node_removals,
    print_table,
    server_side_refusals,
    targets,
)
from bench.scheduler.suite import LIMITED, MODEL, PROBE, TENANT_A, TENANT_B, WEIGHTS, BenchSuite
from sluice.runtime.runner import settle_heap


def build_result(
    measured: dict[str, Any],
    args: argparse.Namespace,
    load: list[float],
    node_cpus: frozenset[int],
    node_removed_at: list[str],
    speed: tuple[float, float] = (math.nan, math.nan),
) -> Any:
    """Headline figures, verdicts, every measured detail and the setup."""
    refused, fairness = measured["refusals"], measured["fairness"]
    figures: dict[str, Any] = {
        "overhead_ttft_p50_s": measured["overhead"]["overhead_p50_s"],
        "refusal_p99_s": max(refused[k]["p99_s"] for k in REFUSAL_KINDS),
        "fairness_jain": fairness["jain_index"],
        "share_ratio_a_to_b": fairness["share_ratio_a_to_b"],
        "isolation_ttft_p99_ratio": measured["isolation"]["victim_ttft_p99_ratio"],
    }
    return {
        **figures,
        "targets": targets(figures, WEIGHTS[TENANT_A] / WEIGHTS[TENANT_B]),
        **measured,
        "setup": {
            "command": "python -m bench.scheduler",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": MODEL,
            "node_max_sequences": args.max_sequences,
            "cpus": os.cpu_count(),
            "node_and_load_cpus": sorted(node_cpus),
            "cpu_placement": cpu_placement(node_cpus),
            "node_removed_at": node_removed_at,
            "machine": platform.processor() or platform.machine(),
            "load_average_start_end": [load, [round(x, 2) for x in os.getloadavg()]],
            "cpu_loop_s_start_end": list(speed),
        },
    }


def cpu_loop_s(rounds: int = 5) -> float:
    """Seconds one fixed pure-Python loop takes on this process's CPU, best of ``rounds``:
    the machine's speed at the time, to compare runs by
    (``docs/decisions/bench-machine-speed.md``)."""
    best = math.inf
    for _ in range(rounds):
        began = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i * i
        best = min(best, time.perf_counter() - began)
    return best


def cpu_placement(node_cpus: frozenset[int]) -> str:
    """Who ran where, in words."""
    if not node_cpus:
        return "every process shares every CPU"
    listed = ", ".join(str(c) for c in sorted(node_cpus))
    return (
        f"the node and the load processes on CPU {listed}, the scheduler, the stores and the "
        "timed probe calls on the others"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.scheduler",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--run-dir", type=Path, default=Path(".sluice/bench/scheduler"))
    p.add_argument("--max-sequences", type=int, default=4, help="node capacity")
    p.add_argument("--overhead-requests", type=int, default=200, help="rounds of the 4 paths")
    p.add_argument("--overhead-tokens", type=int, default=4)
    p.add_argument("--quota-probes", type=int, default=200, help="idle over-quota probes")
    p.add_argument("--in-flight", type=int, default=8, help="per fairness tenant")
    p.add_argument("--fair-tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument(
        "--window-s",
        type=float,
        default=60.0,
        help="fairness window, with the saturated refusal probes in it (about 800 of them)",
    )
    p.add_argument(
        "--probe-interval-s",
        type=float,
        default=0.075,
        help="one round of saturated probes (deadline, quota, floor) per interval",
    )
    p.add_argument("--probe-deadline-s", type=float, default=0.05)
    p.add_argument(
        "--isolation-window-s", type=float, default=300.0, help="per phase, all rounds together"
    )
    p.add_argument(
        "--isolation-rounds",
        type=int,
        default=3,
        help="the calm and flood phases alternate in this many rounds of equal blocks",
    )
    p.add_argument(
        "--isolation-settle-s",
        type=float,
        default=SETTLE_BEFORE_CALM_S,
        help="idle before each calm block (past the scheduler's memory of the tenants' demand)",
    )
    p.add_argument("--isolation-tokens", type=int, default=256, help="output tokens per request")
    p.add_argument("--isolation-deadline-s", type=float, default=10.0, help="per request")
    p.add_argument(
        "--isolation-max-rate", type=float, default=150.0, help="cap on the flood, requests/s"
    )
    p.add_argument(
        "--capacity-window-s",
        type=float,
        default=30.0,
        help="closed-loop capacity window, when isolation and fairness token counts differ",
    )
    p.add_argument("--seed", type=int, default=1, help="seeds the isolation arrivals")
    p.add_argument(
        "--shared-cpus",
        action="store_true",
        help="let every process use every CPU (default: the node and the load processes get "
        "the last CPU, the rest run the scheduler, the stores and the timed probes)",
    )
    args = p.parse_args(argv)
    if args.isolation_rounds < 1:
        p.error("--isolation-rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load = [round(x, 2) for x in os.getloadavg()]
    node_cpus: frozenset[int] = frozenset()
    cpus = sorted(os.sched_getaffinity(0))
    if not args.shared_cpus and len(cpus) >= 2:
        node_cpus = frozenset(cpus[-1:])
        os.sched_setaffinity(0, cpus[:-1])  # inherited by the stores and the scheduler
    speed_start = cpu_loop_s()
    suite = BenchSuite(
        args.run_dir.resolve(), max_sequences=args.max_sequences, node_cpus=node_cpus
    )
    try:
        suite.start()
        settle_heap()  # as the services do: no full collections over start-up objects mid-run
        measured, saturated_from = asyncio.run(measure(suite, args))
    finally:
        suite.stop()
    measured["refusals"]["server_side"] = server_side_refusals(
        suite.scheduler_log, saturated_from, {PROBE, LIMITED}
    )
    removed = node_removals(suite.scheduler_log)
    speed = (speed_start, cpu_loop_s())
    result = build_result(measured, args, load, node_cpus, removed, speed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scheduler.json").write_text(json.dumps(finite(result), indent=2) + "\n")
    (args.out_dir / "scheduler.md").write_text(markdown(result))
    print_table(result)
    print(f"results in {args.out_dir / 'scheduler.json'} and {args.out_dir / 'scheduler.md'}")
    return 0
