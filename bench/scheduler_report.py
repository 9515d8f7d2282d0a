"""Statistics, targets and the written report of ``bench.scheduler``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

OVERHEAD_TARGET_S = 0.002
REFUSAL_TARGET_S = 0.005
SHARE_TOLERANCE = 0.10
JAIN_TARGET = 0.95
REFUSAL_KINDS = ("quota_idle", "quota_saturated", "deadline_saturated")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index: (Σx)² / (n Σx²); 1 when all equal, 1/n when one takes all."""
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else math.nan


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def server_side_refusals(log: Path, saturated_from: datetime) -> dict[str, Any]:
    """The scheduler's own view of the refusals, from its ``rpc_finished`` log lines: handler
    time (``duration_ms``, interceptors included, gRPC transport excluded) per kind, and how
    often the quota check could not reach Redis in time (``quota_backend_unavailable``: the
    quota then fails open for a second)."""
    durations: dict[str, list[float]] = {kind: [] for kind in REFUSAL_KINDS}
    backend_unavailable = 0
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "quota_backend_unavailable":
            backend_unavailable += 1
        if event.get("event") != "rpc_finished" or event.get("code") != "RESOURCE_EXHAUSTED":
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
            kind: {"p50_s": percentile(v, 50), "p99_s": percentile(v, 99), "count": len(v)}
            for kind, v in durations.items()
        },
        "quota_backend_unavailable": backend_unavailable,
    }


def targets(figures: dict[str, Any], weight_ratio: float) -> list[dict[str, Any]]:
    """Each target with its measured value and verdict."""
    ratio = figures["share_ratio_a_to_b"]
    rows = [
        ("scheduler overhead, TTFT p50", figures["overhead_ttft_p50_s"], "<=", OVERHEAD_TARGET_S),
        ("refusal latency p99", figures["refusal_p99_s"], "<=", REFUSAL_TARGET_S),
        ("share ratio A:B off 2:1 by", abs(ratio / weight_ratio - 1), "<=", SHARE_TOLERANCE),
        ("Jain's index, weight-normalised", figures["fairness_jain"], ">=", JAIN_TARGET),
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
        f"{setup['load_average_start_end'][0]} / {setup['load_average_start_end'][1]}  ",
        f"Suite: etcd, Redis, one node (`{setup['model']}`, max_sequences "
        f"{setup['node_max_sequences']}), one scheduler, as child processes on loopback; the "
        "client, the load process and all of these share the machine's CPUs",
        "",
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
        "handler time from its logs.",
        "",
        "| kind | refusals | p50 | p99 | max | server p50 | server p99 | no RetryInfo | "
        "not refused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    server = ref["server_side"]
    for kind in REFUSAL_KINDS:
        r, s = ref[kind], server[kind]
        lines.append(
            f"| {kind} | {r['refusals']} | {ms(r['p50_s'])} | {ms(r['p99_s'])} | "
            f"{ms(r['max_s'])} | {ms(s['p50_s'])} | {ms(s['p99_s'])} | "
            f"{r['without_retry_info']} | {r['not_refused'] or '-'} |"
        )
    lines += [
        "",
        f"Deadline probes ask for 1024 tokens with a {ref['probe_deadline_s']} s deadline while "
        "the fairness load saturates the node. Quota checks that could not reach Redis within "
        "the scheduler's timeout (each fails open for that request; three in a row skip Redis "
        "for 1 s): "
        f"{server['quota_backend_unavailable']}.",
        "",
        f"## Fairness ({fair['window_s']} s window after {fair['warmup_s']} s warm-up; "
        f"{fair['in_flight_per_tenant']} in flight per tenant, {fair['max_new_tokens']} "
        "tokens each)",
        "",
        "| tenant | weight | output tokens | completed | TTFT p50 | TTFT p99 | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in fair["tenants"].items():
        lines.append(
            f"| {name} | {fair['weights'][name]} | {v['tokens']} | {v['completed']} | "
            f"{ms(v['ttft_p50_s'])} | {ms(v['ttft_p99_s'])} | {v['errors'] or '-'} |"
        )
    lines += [
        "",
        f"Share ratio A:B {fair['share_ratio_a_to_b']:.3f} (weights 2:1); Jain's index "
        f"{fair['jain_index']:.4f}; {fair['output_tokens_per_s']:.0f} output tokens/s in all.",
        "",
    ]
    return "\n".join(lines)


def print_table(result: dict[str, Any]) -> None:
    """The targets, one line each, with PASS/FAIL."""
    print(f"{'target':<34} {'measured':>10} {'limit':>9}  verdict")
    for t in result["targets"]:
        verdict = "PASS" if t["pass"] else "FAIL"
        print(f"{t['target']:<34} {t['value']:>10.4g} {t['limit']:>9}  {verdict}")
