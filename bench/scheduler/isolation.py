"""The isolation phase of ``bench.scheduler``: a victim tenant's time to first token with and
without a flooder at 10x its share.

``victim`` and ``flooder`` (weight 1 each, REALTIME, no quotas) send seeded open-loop Poisson
arrivals (:mod:`.load`). Capacity is the fairness phase's when the output lengths match, else
measured closed-loop. *calm*: both at 0.25 x capacity; *flood*: the victim on the same schedule,
the flooder at 10 x its share (capped by ``--isolation-max-rate``). The phases alternate in
``--isolation-rounds`` rounds whose blocks are merged per phase; each calm block starts after a
settle. A victim arrival without a first token counts as infinitely late in the p99
(``docs/decisions/bench-isolation-phase-length.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections import Counter
from typing import Any

from bench.scheduler.load import LoadSpec, OpenLoopSpec, load_process
from bench.scheduler.report import isolation_ratio, open_loop_summary
from bench.scheduler.suite import FLOODER, MODEL, VICTIM, WEIGHTS, BenchSuite
from scheduler.shares import DEMAND_WINDOW_S

CALM_LOAD = 0.25
"""Each isolation tenant's arrival rate in the calm phase, as a fraction of capacity."""
FLOOD_MULTIPLE = 10.0
"""The flooder's arrival rate in the flood phase, as a multiple of its share of capacity."""
SETTLE_BEFORE_CALM_S = DEMAND_WINDOW_S + 1.0
"""Idle time before each calm block (after the capacity loop or a flood block): longer than the
windows over which the scheduler's slot shares remember a tenant's use (5 s) and demand
(20 s), so calm starts with neither on record."""


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


def merge_rounds(rounds: list[dict[str, Any]], block_s: float) -> dict[str, Any]:
    """One tenant's open-loop results of several ``block_s`` blocks of a phase, as if from one
    block of their total length (block ``i``'s arrival times shifted by ``i * block_s``)."""
    merged: dict[str, Any] = {
        "rate_per_s": rounds[0]["rate_per_s"],
        "outcomes": Counter(),
        **{k: 0 for k in ("sent", "not_sent", "not_sent_all_phase")},
        **{k: [] for k in ("ttft_s", "arrival_s", "launch_lag_s")},
    }
    for i, r in enumerate(rounds):
        for k in ("sent", "not_sent", "not_sent_all_phase", "ttft_s", "launch_lag_s"):
            merged[k] += r[k]
        merged["arrival_s"] += [t + i * block_s for t in r["arrival_s"]]
        merged["outcomes"].update(r["outcomes"])
    merged["outcomes"] = dict(merged["outcomes"])
    return merged


async def measure_isolation(
    suite: BenchSuite, fairness: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Capacity, then the calm and the flood phase, alternating in ``--isolation-rounds``
    rounds (each block in its own load process), so that a slower stretch of the machine
    weighs on both phases alike rather than on whichever ran then. Round ``r`` seeds the
    arrivals of both its blocks with ``seed + r``: the victim meets the same schedule in each
    phase. Each calm block starts after ``--isolation-settle-s`` idle."""
    capacity, source, capacity_errors = await measure_capacity(suite, fairness, args)
    share = WEIGHTS[FLOODER] / (WEIGHTS[VICTIM] + WEIGHTS[FLOODER])
    victim_rate = CALM_LOAD * capacity
    flood_wanted = FLOOD_MULTIPLE * share * capacity
    flood_rate = min(flood_wanted, args.isolation_max_rate)
    block_s = args.isolation_window_s / args.isolation_rounds
    blocks: dict[str, list[dict[str, Any]]] = {"calm": [], "flood": []}
    for r in range(args.isolation_rounds):
        # What came before (the capacity loop, a flood block) fades from the scheduler's
        # record of the tenants' use and demand before calm begins.
        await asyncio.sleep(args.isolation_settle_s)
        for phase, flooder_rate in (("calm", CALM_LOAD * capacity), ("flood", flood_rate)):
            spec = OpenLoopSpec(
                address=suite.scheduler_address,
                keys={VICTIM: suite.keys[VICTIM], FLOODER: suite.keys[FLOODER]},
                rates={VICTIM: victim_rate, FLOODER: flooder_rate},
                model=MODEL,
                max_new_tokens=args.isolation_tokens,
                warmup_s=args.warmup_s,
                window_s=block_s,
                deadline_s=args.isolation_deadline_s,
                seed=args.seed + r,
                cpus=suite.node_cpus,
            )
            limit = args.warmup_s + block_s + args.isolation_deadline_s + 120
            async with load_process(spec, limit) as result:
                blocks[phase].append((await result())["tenants"])
    phases = {
        phase: {
            t: open_loop_summary(
                merge_rounds([b[t] for b in got], block_s), args.isolation_window_s
            )
            for t in got[0]
        }
        for phase, got in blocks.items()
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
        "rounds": args.isolation_rounds,
        "settle_before_calm_s": args.isolation_settle_s,
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
