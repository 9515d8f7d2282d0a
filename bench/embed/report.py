"""The figures of ``bench.embed`` and the written report: one row per figure with its baseline
measured in the same run (one at a time: the node with ``--embed-max-batch 1 --embed-workers
1``, or where a row says so another mode), the ratio, the target and the verdict; a section
per node mode with its phases."""

from __future__ import annotations

import math
from typing import Any

from bench.report_table import Entry, Report, Row, ms, row, times

RPS_TARGET = 4.0
"""Batched requests/s at 32 callers over one-at-a-time's, at least."""
P99_TARGET = 1.5
"""Batched p99 at one caller over one-at-a-time's, at most."""
LOW, HIGH = "1", "32"
"""The phases' keys: callers."""
TITLES = {
    "one_at_a_time": "One at a time (max batch 1, one embedding thread)",
    "batched": "Batched",
    "batched_one_thread": "Batched on one embedding thread",
    "alone_default_workers": "Each request alone on the default embedding threads",
}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def rows(experiments: dict[str, Entry]) -> list[Row]:
    """The figure rows: the two targets, then figures only reported."""
    if any("error" in e for e in experiments.values()):
        return [
            row(n, TITLES[n], f"error: {e['error']}", passed=False)
            for n, e in experiments.items()
            if "error" in e
        ]
    one, bat = experiments["one_at_a_time"]["phases"], experiments["batched"]["phases"]
    rps = _ratio(bat[HIGH]["requests_per_s"], one[HIGH]["requests_per_s"])
    p99 = _ratio(bat[LOW]["p99_s"], one[LOW]["p99_s"])
    out = [
        row(
            "batched",
            f"requests/s, {HIGH} concurrent single-text callers",
            f"{bat[HIGH]['requests_per_s']:.1f}/s",
            f"{one[HIGH]['requests_per_s']:.1f}/s",
            times(rps),
            f"≥ {RPS_TARGET:g}×",
            rps >= RPS_TARGET,
        ),
        row(
            "batched",
            "p99 latency, 1 caller (low load)",
            ms(bat[LOW]["p99_s"]),
            ms(one[LOW]["p99_s"]),
            times(p99),
            f"≤ {P99_TARGET:g}×",
            p99 <= P99_TARGET,
        ),
    ]
    for key, name in ((LOW, "p50 latency, 1 caller"), (HIGH, f"p50 latency, {HIGH} callers")):
        ratio = _ratio(bat[key]["p50_s"], one[key]["p50_s"])
        out.append(row("batched", name, ms(bat[key]["p50_s"]), ms(one[key]["p50_s"]), times(ratio)))
    ratio = _ratio(bat[HIGH]["p99_s"], one[HIGH]["p99_s"])
    out.append(
        row(
            "batched",
            f"p99 latency, {HIGH} callers",
            ms(bat[HIGH]["p99_s"]),
            ms(one[HIGH]["p99_s"]),
            times(ratio),
        )
    )
    for name, baseline, against in (
        ("batched_one_thread", "one_at_a_time", "one at a time (both on one thread)"),
        ("batched", "alone_default_workers", "each alone on the default threads"),
    ):
        a, b = experiments[name]["phases"][HIGH], experiments[baseline]["phases"][HIGH]
        ratio = _ratio(a["requests_per_s"], b["requests_per_s"])
        out.append(
            row(
                name,
                f"requests/s, {HIGH} callers: the merging alone, against {against}",
                f"{a['requests_per_s']:.1f}/s",
                f"{b['requests_per_s']:.1f}/s",
                times(ratio),
            )
        )
    out.append(
        row(
            "batched",
            f"texts per forward, {HIGH} callers (mean)",
            f"{bat[HIGH]['mean_texts_per_forward']:.1f}",
            f"{one[HIGH]['mean_texts_per_forward']:.1f}",
        )
    )
    return out


def details(entry: Entry) -> list[str]:
    """A mode's phases as a table."""
    lines = [
        f"Node `--embed-max-batch {entry['max_batch']} --embed-workers {entry['workers']}`.",
        "",
        "| callers | requests/s | p50 | p99 | mean | completed | outcomes | forwards "
        "| texts/forward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, p in entry["phases"].items():
        outcomes = ", ".join(f"{k} {v}" for k, v in p["outcomes"].items())
        cells = [key, f"{p['requests_per_s']:.1f}", ms(p["p50_s"]), ms(p["p99_s"])]
        cells += [ms(p["mean_s"]), p["completed"], outcomes, int(p["forwards"])]
        cells.append(f"{p['mean_texts_per_forward']:.2f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return [*lines, ""]


def _where(entry: Entry) -> str:
    return f"- node log: `{entry.get('log', '–')}`; wall time {entry.get('wall_s', '–')} s"


REPORT = Report(
    titles=TITLES,
    makers={},
    details=dict.fromkeys(TITLES, details),
    where=_where,
)


def markdown(doc: dict[str, Any]) -> str:
    """The whole ``embed.md``."""
    s = doc["setup"]
    lines = [
        "# Embedding benchmark: dynamic batching of Embed",
        "",
        f"Command: `{s['command']}`  ",
        f"Date: {s['date']}  ",
        f"Machine: {s['machine']}, {s['cpus']} CPUs; load average at start / end "
        f"{s['load_average_start_end'][0]} / {s['load_average_start_end'][1]}  ",
        f"Model: `{s['model']}`; texts: {s['texts']} sentences of {s['words'][0]}-{s['words'][1]} "
        f"words, one per request; tenants: {s['tenants']}  ",
        f"Phases: 1 caller ({s['low_warmup_s']:g} s warm-up, {s['low_window_s']:g} s "
        f"measured), then {s['callers']} closed-loop callers ({s['high_warmup_s']:g} s warm-up, "
        f"{s['high_window_s']:g} s measured), per mode and round; {s['rounds']} rounds in which "
        "the modes take turns phase by phase",
        "",
        "Each mode is a real node process (all registered in a real etcd, all running "
        "throughout; those not called idle), called **directly** "
        "over gRPC on loopback, not through the scheduler: the figure is the node's batching, "
        "and a scheduler on the same two CPUs would spend per call about as much CPU as the "
        "node's own gRPC handling, capping both modes at its ceiling instead of the node's. "
        "The baseline is the node with `--embed-max-batch 1 --embed-workers 1` (every request "
        "its own forward on one embedding thread: one at a time, as before batching), measured "
        "in the same run in turns with the others, so that other work on the machine weighs on "
        "all alike. The batched node runs with its defaults: up to 64 texts a forward and, on "
        "a CPU node that serves only embedders (as here), two embedding threads with an equal "
        "share of torch's threads each (this run: "
        f"{s.get('default_workers', '–')} embedding threads). Two more modes split the gain: "
        "the batched node on one embedding thread, and each request alone on the default "
        "threads. Latency is from "
        "the call to its answer at the caller; requests/s counts the calls answered inside the "
        "measured window.",
        "",
        *REPORT.body(doc),
    ]
    return "\n".join(lines) + "\n"
