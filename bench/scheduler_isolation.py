"""The isolation phase of ``bench.scheduler``: a victim tenant's time to first token with and
without a flooder at 10x its share (see that module's docstring, item 4)."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from typing import Any

from bench.scheduler_load import LoadSpec, OpenLoopSpec, load_process
from bench.scheduler_report import isolation_ratio, open_loop_summary
from bench.scheduler_suite import FLOODER, MODEL, VICTIM, WEIGHTS, BenchSuite

CALM_LOAD = 0.25
"""Each isolation tenant's arrival rate in the calm phase, as a fraction of capacity."""
FLOOD_MULTIPLE = 10.0
"""The flooder's arrival rate in the flood phase, as a multiple of its share of capacity."""


async def measure_capacity(
    suite: BenchSuite, fairness: dict[str, Any], args: argparse.Namespace
) -> tuple[float, str, dict[str, int]]:
    """Completed requests per second at the isolation output length, where it came from (the
    fairness phase's when its output length is the same, else a closed loop of the isolation
    tenants for ``--capacity-window-s``) and the errors of that load, by code."""
    if args.isolation_tokens == args.fair_tokens:
        tenants, window_s = fairness["tenants"], args.window_s
        source = "the fairness phase's completed requests"
    else:
        spec = LoadSpec(
            address=suite.scheduler_address,
            keys={VICTIM: suite.keys[VICTIM], FLOODER: suite.keys[FLOODER]},
            model=MODEL,
            in_flight=args.in_flight,
            max_new_tokens=args.isolation_tokens,
            warmup_s=args.warmup_s,
            window_s=args.capacity_window_s,
            cpus=suite.node_cpus,
        )
        async with load_process(spec, args.capacity_window_s + 120) as result:
            tenants, window_s = (await result())["tenants"], args.capacity_window_s
        source = f"closed loop, {args.in_flight} in flight per tenant, {window_s} s"
    errors: Counter[str] = Counter()
    for t in tenants.values():
        errors.update(t["errors"])
    return sum(t["completed"] for t in tenants.values()) / window_s, source, dict(errors)


async def measure_isolation(
    suite: BenchSuite, fairness: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Capacity, then the calm and the flood phase, each in its own load process."""
    capacity, source, capacity_errors = await measure_capacity(suite, fairness, args)
    share = WEIGHTS[FLOODER] / (WEIGHTS[VICTIM] + WEIGHTS[FLOODER])
    victim_rate = CALM_LOAD * capacity
    flood_wanted = FLOOD_MULTIPLE * share * capacity
    flood_rate = min(flood_wanted, args.isolation_max_rate)
    phases: dict[str, dict[str, Any]] = {}
    for phase, flooder_rate in (("calm", CALM_LOAD * capacity), ("flood", flood_rate)):
        spec = OpenLoopSpec(
            address=suite.scheduler_address,
            keys={VICTIM: suite.keys[VICTIM], FLOODER: suite.keys[FLOODER]},
            rates={VICTIM: victim_rate, FLOODER: flooder_rate},
            model=MODEL,
            max_new_tokens=args.isolation_tokens,
            warmup_s=args.warmup_s,
            window_s=args.isolation_window_s,
            deadline_s=args.isolation_deadline_s,
            seed=args.seed,
            cpus=suite.node_cpus,
        )
        limit = args.warmup_s + args.isolation_window_s + args.isolation_deadline_s + 120
        async with load_process(spec, limit) as result:
            loaded = await result()
        phases[phase] = {
            t: open_loop_summary(v, args.isolation_window_s) for t, v in loaded["tenants"].items()
        }
    calm, flood = phases["calm"][VICTIM], phases["flood"][VICTIM]
    return {
        "victim": VICTIM,
        "flooder": FLOODER,
        "weights": {VICTIM: WEIGHTS[VICTIM], FLOODER: WEIGHTS[FLOODER]},
        "max_new_tokens": args.isolation_tokens,
        "deadline_s": args.isolation_deadline_s,
        "warmup_s": args.warmup_s,
        "window_s": args.isolation_window_s,
        "seed": args.seed,
        "capacity_req_per_s": capacity,
        "capacity_source": source,
        "capacity_errors": capacity_errors,
        "calm_load": CALM_LOAD,
        "flood_rate_per_s": flood_rate,
        "flood_rate_wanted_per_s": flood_wanted,
        "flood_rate_capped": flood_rate < flood_wanted,
        "flood_share_multiple": flood_rate / (share * capacity) if capacity else math.nan,
        "phases": phases,
        "victim_ttft_p99_ratio": isolation_ratio(
            calm["ttft_p99_counting_failures_s"], flood["ttft_p99_counting_failures_s"]
        ),
        "victim_ttft_p50_ratio": isolation_ratio(calm["ttft_p50_s"], flood["ttft_p50_s"]),
        "victim_no_first_token": {"calm": calm["no_first_token"], "flood": flood["no_first_token"]},
    }
