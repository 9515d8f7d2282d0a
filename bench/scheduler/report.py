"""Statistics, targets and the written report of ``bench.scheduler``."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.stats import percentile

OVERHEAD_TARGET_S = 0.002
REFUSAL_TARGET_S = 0.005
SHARE_TOLERANCE = 0.10
JAIN_TARGET = 0.95
ISOLATION_TARGET = 1.2
REFUSAL_KINDS = ("quota_idle", "quota_saturated", "deadline_saturated")
FLOOR_KINDS = ("floor_idle", "floor_saturated")
"""Refusals from ``bench.scheduler.refusal_floor`` (no scheduler), timed beside the scheduler's."""


rank_percentile = functools.partial(percentile, method="nearest_rank", empty=math.nan)
"""This benchmark's percentile: nearest rank, so an infinitely late value stays infinite, and NaN
for no values, so a target without samples fails."""


def percentile_with_failures(values: Sequence[float], failures: int, q: float) -> float:
    """Nearest-rank percentile of ``values`` plus ``failures`` infinitely late ones (requests
    that never got a first token): infinite once the failures reach past rank ``q``."""
    return rank_percentile([*values, *[math.inf] * failures], q)


def isolation_ratio(calm_p99_s: float, flood_p99_s: float) -> float:
    """The victim's TTFT p99 under the flood over its p99 without: NaN when the calm phase has
    no finite positive p99 to compare with, infinite when the flood one is infinite."""
    if not math.isfinite(calm_p99_s) or calm_p99_s <= 0:
        return math.nan
    return flood_p99_s / calm_p99_s


def open_loop_summary(tenant: dict[str, Any], window_s: float) -> dict[str, Any]:
    """One tenant of one open-loop phase (``bench.scheduler.load.run_open``): arrivals sent in
    the window, TTFT percentiles of those served, the p99 with every measured arrival that got
    no first token counted as infinitely late, and how the calls ended."""
    ttft = tenant["ttft_s"]
    failed = tenant["sent"] - len(ttft)
    return {
        "rate_per_s": tenant["rate_per_s"],
        "sent_per_s": tenant["sent"] / window_s,
        "sent": tenant["sent"],
        "served_per_s": tenant["outcomes"].get("ok", 0) / window_s,
        "first_token": len(ttft),
        "no_first_token": failed,
        "ttft_p50_s": rank_percentile(ttft, 50),
        "ttft_p99_s": rank_percentile(ttft, 99),
        "ttft_p99_counting_failures_s": percentile_with_failures(ttft, failed, 99),
        "ttft_max_s": max(ttft, default=math.nan),
        "launch_lag_p99_s": rank_percentile(tenant["launch_lag_s"], 99),
        "outcomes": dict(sorted(tenant["outcomes"].items())),
        "not_sent": tenant["not_sent"],
        "not_sent_all_phase": tenant["not_sent_all_phase"],
    }


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def log_events(log: Path) -> Iterator[dict[str, Any]]:
    """The JSON log lines of a service's log, in order (other lines skipped)."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event


def server_side_refusals(
    log: Path, saturated_from: datetime, probe_tenants: Collection[str]
) -> dict[str, Any]:
    """The scheduler's own view of the probes' refusals (requests of ``probe_tenants``), from
    its ``rpc_finished`` log lines: handler time (``duration_ms``, interceptors included, gRPC
    transport excluded) per kind, and how often the quota check could not reach Redis in time
    (``quota_backend_unavailable``: the quota then fails open for a second)."""
    durations: dict[str, list[float]] = {kind: [] for kind in REFUSAL_KINDS}
    backend_unavailable = 0
    for event in log_events(log):
        if event.get("event") == "quota_backend_unavailable":
            backend_unavailable += 1
        if event.get("event") != "rpc_finished" or event.get("code") != "RESOURCE_EXHAUSTED":
            continue
        if event.get("tenant") not in probe_tenants:  # e.g. the isolation phase's flooder
            continue
        saturated = datetime.fromisoformat(event["timestamp"]) >= saturated_from
        if event.get("reason") == "QUOTA_EXCEEDED":
            kind = "quota_saturated" if saturated else "quota_idle"
        elif event.get("reason") == "OVERLOADED" and saturated:
            kind = "deadline_saturated"
        else:
            continue
        durations[kind].append(float(event["duration_ms"]) / 1000)
    return {
        **{
            kind: {
                "p50_s": rank_percentile(v, 50),
                "p99_s": rank_percentile(v, 99),
                "count": len(v),
            }
            for kind, v in durations.items()
        },
        "quota_backend_unavailable": backend_unavailable,
    }


def node_removals(log: Path) -> list[str]:
    """When the scheduler dropped a node from its view (its registry lease lapsed, so requests
    meanwhile found no node), from its log up to its own shutdown (when the node leaves too):
    a run with any is a disturbed run."""
    found = []
    for event in log_events(log):
        if event.get("event") == "signal_received":
            break
        if event.get("event") == "node_removed":
            found.append(str(event["timestamp"]))
    return found


def targets(figures: dict[str, Any], weight_ratio: float) -> list[dict[str, Any]]:
    """Each target with its measured value and verdict."""
    ratio = figures["share_ratio_a_to_b"]
    rows = [
        ("scheduler overhead, TTFT p50", figures["overhead_ttft_p50_s"], "<=", OVERHEAD_TARGET_S),
        ("refusal latency p99", figures["refusal_p99_s"], "<=", REFUSAL_TARGET_S),
        ("share ratio A:B off 2:1 by", abs(ratio / weight_ratio - 1), "<=", SHARE_TOLERANCE),
        ("Jain's index, weight-normalised", figures["fairness_jain"], ">=", JAIN_TARGET),
        (
            "victim TTFT p99, flood / calm",
            figures["isolation_ttft_p99_ratio"],
            "<=",
            ISOLATION_TARGET,
        ),
    ]
    return [
        {
            "target": name,
            "value": value,
            "limit": f"{op} {limit}",
            "pass": bool(value <= limit if op == "<=" else value >= limit),
        }
        for name, value, op, limit in rows
    ]


def ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 1000:.2f} ms"


def ratio(value: float | None, base: float | None) -> str:
    """``value / base`` as ``1.23x``; ``-`` when either is missing or the base is 0."""
    if value is None or base is None or math.isnan(value) or math.isnan(base) or base <= 0:
        return "-"
    return f"{value / base:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    """The human-readable report."""
    setup, over, ref, fair = (
        result["setup"],
        result["overhead"],
        result["refusals"],
        result["fairness"],
    )
    lines = [
        "# Scheduler benchmark",
        "",
        f"Command: `{setup['command']}`  ",
        f"Date: {setup['date']}  ",
        f"Machine: {setup['machine']}, {setup['cpus']} CPUs; load average at start / end "
        f"{setup['load_average_start_end'][0]} / {setup['load_average_start_end'][1]}; a fixed "
        "pure-Python loop (the machine's speed then, to compare runs by; lower is faster) took "
        + " / ".join(ms(v) for v in setup.get("cpu_loop_s_start_end", ()))
        + " at start / end  ",
        f"Suite: etcd, Redis, one node (`{setup['model']}`, max_sequences "
        f"{setup['node_max_sequences']}), one scheduler, as child processes on loopback; "
        f"{setup['cpu_placement']}",
        "",
    ]
    if setup["node_removed_at"]:
        lines += [
            "**Disturbed run:** the scheduler lost the node (registry lease lapsed) at "
            f"{', '.join(setup['node_removed_at'])}; requests meanwhile found no node.",
            "",
        ]
    lines += [
        "## Targets",
        "",
        "| target | measured | limit | verdict |",
        "|---|---|---|---|",
    ]
    for t in result["targets"]:
        verdict = "**PASS**" if t["pass"] else "**FAIL**"
        lines.append(f"| {t['target']} | {t['value']:.4g} | {t['limit']} | {verdict} |")
    lines += [
        "",
        f"## Overhead ({over['rounds']} interleaved rounds, {over['max_new_tokens']} tokens each)",
        "",
        "| path | TTFT p50 | TTFT p99 | mean |",
        "|---|---|---|---|",
    ]
    for name, v in over["ttft_s"].items():
        lines.append(f"| {name} | {ms(v['p50'])} | {ms(v['p99'])} | {ms(v['mean'])} |")
    lines += [
        "",
        f"Overhead (p50 difference to `node`): {ms(over['overhead_p50_s'])} through the "
        f"scheduler for a tenant with quotas (one Redis script per request), "
        f"{ms(over['overhead_no_quota_p50_s'])} without quotas; a bare Python gRPC "
        f"pass-through hop (`passthrough`, in the client's process) costs "
        f"{ms(over['passthrough_p50_s'])}.",
        "",
        "## Refusals",
        "",
        "Client-side from call to error over a warm channel; server-side is the scheduler's "
        "handler time from its logs. The floor rows are refusals from "
        "`bench.scheduler.refusal_floor`, a bare gRPC server beside the scheduler (same CPUs, "
        "same event loop) that refuses every call with the same status and does nothing else, "
        "probed between the scheduler's probes: what the gRPC stacks and this machine cost.",
        "",
        "| kind | refusals | p50 | p99 | max | server p50 | server p99 | no RetryInfo | "
        "not refused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    server = ref["server_side"]
    for kind in (*REFUSAL_KINDS, *FLOOR_KINDS):
        r, s = ref[kind], server.get(kind, {"p50_s": None, "p99_s": None})
        lines.append(
            f"| {kind} | {r['refusals']} | {ms(r['p50_s'])} | {ms(r['p99_s'])} | "
            f"{ms(r['max_s'])} | {ms(s['p50_s'])} | {ms(s['p99_s'])} | "
            f"{r['without_retry_info']} | {r['not_refused'] or '-'} |"
        )
    floor, order = ref["floor_saturated"], ref["saturated_probe_order"]
    lines += [
        "",
        "Under saturation, over the floor's p50 / p99: "
        + "; ".join(
            f"{kind} {ratio(ref[kind]['p50_s'], floor['p50_s'])} / "
            f"{ratio(ref[kind]['p99_s'], floor['p99_s'])}"
            for kind in ("quota_saturated", "deadline_saturated")
        )
        + f". Under saturation the probes take turns ({', '.join(order)}), one every "
        f"{ms(ref['probe_interval_s'] / len(order))}; idle ones run back to back. Deadline "
        f"probes ask for 1024 tokens with a {ref['probe_deadline_s']} s deadline while "
        "the fairness load saturates the node. Quota checks that could not reach Redis within "
        "the scheduler's timeout (each fails open for that request; three in a row skip Redis "
        "for 1 s): "
        f"{server['quota_backend_unavailable']}.",
        "",
        f"## Fairness ({fair['window_s']} s window after {fair['warmup_s']} s warm-up; "
        f"{fair['in_flight_per_tenant']} in flight per tenant, {fair['max_new_tokens']} "
        "tokens each)",
        "",
        "| tenant | weight | output tokens | completed | TTFT p50 | TTFT p99 | refused, then "
        "back after RetryInfo | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in fair["tenants"].items():
        lines.append(
            f"| {name} | {fair['weights'][name]} | {v['tokens']} | {v['completed']} | "
            f"{ms(v['ttft_p50_s'])} | {ms(v['ttft_p99_s'])} | {v['refused']} | "
            f"{v['errors'] or '-'} |"
        )
    lines += [
        "",
        f"Share ratio A:B {fair['share_ratio_a_to_b']:.3f} (weights 2:1); Jain's index "
        f"{fair['jain_index']:.4f}; {fair['output_tokens_per_s']:.0f} output tokens/s in all.",
        "",
        *isolation_markdown(result["isolation"]),
    ]
    return "\n".join(lines)


def isolation_markdown(iso: dict[str, Any]) -> list[str]:
    """The isolation section of the report."""
    capped = " (capped by `--isolation-max-rate`)" if iso["flood_rate_capped"] else ""
    lines = [
        f"## Isolation ({iso['window_s']} s window per phase, in {iso['rounds']} alternating "
        f"rounds, each block after {iso['warmup_s']} s warm-up; {iso['max_new_tokens']} tokens "
        f"each, {iso['deadline_s']} s deadline)",
        "",
        f"Open loop, Poisson arrivals (round r seeded {iso['seed']} + r in both its blocks). "
        "The phases alternate (calm, flood, calm, ...) and each phase's blocks are merged, so "
        "a slower stretch of the machine weighs on both alike. Capacity "
        f"{iso['capacity_req_per_s']:.2f} requests/s ({iso['capacity_source']}"
        f"{'; errors ' + str(iso['capacity_errors']) if iso['capacity_errors'] else ''}). "
        f"`{iso['victim']}` and `{iso['flooder']}` have weight 1 each, so half the node each. "
        f"calm: both at {iso['calm_load']} x capacity; flood: `{iso['victim']}` unchanged, "
        f"`{iso['flooder']}` at {iso['flood_rate_per_s']:.1f} requests/s = "
        f"{iso['flood_share_multiple']:.2f} x its share{capped}.",
        "",
        "| phase | tenant | rate /s | served /s | sent | first token | TTFT p50 | TTFT p99 | "
        "p99, failures late | outcomes | launch lag p99 | not sent |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase, tenants in iso["phases"].items():
        for name, v in tenants.items():
            outcomes = ", ".join(f"{k} {n}" for k, n in v["outcomes"].items()) or "-"
            lines.append(
                f"| {phase} | {name} | {v['rate_per_s']:.2f} | {v['served_per_s']:.2f} | "
                f"{v['sent']} | "
                f"{v['first_token']} | {ms(v['ttft_p50_s'])} | {ms(v['ttft_p99_s'])} | "
                f"{ms(v['ttft_p99_counting_failures_s'])} | {outcomes} | "
                f"{ms(v['launch_lag_p99_s'])} | {v['not_sent']} |"
            )
    lines += [
        "",
        f"Victim TTFT p99 flood / calm: {iso['victim_ttft_p99_ratio']:.3f} (p50: "
        f"{iso['victim_ttft_p50_ratio']:.3f}). The p99s count every victim arrival that got no "
        "first token (refused, failed, unfinished) as infinitely late, so victim refusals count "
        f"against isolation; victim arrivals without a first token, calm / flood: "
        f"{iso['victim_no_first_token']['calm']} / {iso['victim_no_first_token']['flood']}. "
        "TTFT runs from the call's start; the launch lag (how late the load process started a "
        "call after its scheduled arrival) is the client's own delay, shown to judge it.",
        "",
    ]
    return lines


def print_table(result: dict[str, Any]) -> None:
    """The targets, one line each, with PASS/FAIL."""
    print(f"{'target':<34} {'measured':>10} {'limit':>9}  verdict")
    for t in result["targets"]:
        verdict = "PASS" if t["pass"] else "FAIL"
        print(f"{t['target']:<34} {t['value']:>10.4g} {t['limit']:>9}  {verdict}")
