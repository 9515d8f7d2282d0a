"""The overload benchmark's report as data: ``overload.json``, a fixed schema other tools read.

``overload.json``::

    {"capacity_at_slo_rps": {"naive": float, "sluice": float},
     "levels": [{"target": "naive" | "sluice", "offered_rps": float, "tenant": str,
                 "class": str, "requests": int, "goodput_rps": float, "ttft_p50_s": float,
                 "ttft_p99_s": float, "e2e_p99_s": float, "output_tokens_per_s": float,
                 "refused": int, "refusal_p99_s": float, "refused_without_retryinfo": int,
                 "errors": int, "unfinished": int}, ...],
     "fairness_jain": float,
     ...extra keys: "runs", "search", "checks", "config", "machine", timestamps}

``levels`` has one row per (target, load level, tenant); each tenant has one class. Rows follow
:func:`bench.load.records.summarize`: TTFT percentiles include requests that timed out or were
cut off without a token, at the time they waited; ``unfinished`` = timed out + cut off at the
run's end; a percentile of no values is 0.0. ``fairness_jain`` is the within-class index of
Sluice at its highest measured load level (``fairness_jain_at`` says which). ``runs`` lists
every measured run, search steps included, with its totals and full accounting.

``checks`` holds the issue's targets. The capacity ratio and the REALTIME TTFT p99 ratio at the
naive capacity (both targets' realtime tenants pooled) keep flat keys (``capacity_ratio``,
``..._target``, ``..._met``); ``realtime_ttft_samples`` counts the TTFT values behind each p99
and the ratio is not met (not shown) while either target has fewer than
``realtime_ttft_min_samples``. ``sluice_overload`` lists one entry per check of Sluice at 2x
and 4x its own capacity, ``{"name", "level", "offered_rps", "value", "op", "limit", "pass"}``
(``value`` None when the level, or the 1x level it is compared with, was not measured):
REALTIME goodput over its value at 1x its own capacity (>= 0.9), errors other than refusals,
unfinished requests and refusals without RetryInfo (each 0), and the refusal p99 over all
tenants (<= 10 ms; 0.0 without refusals).
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.load.records import (
    OUTCOME_CUT_OFF,
    OUTCOME_OK,
    OUTCOME_TIMED_OUT,
    RequestRecord,
    waited_ttft,
)
from bench.load.run import LoadResult
from bench.load.scenario import Scenario
from bench.overload.options import Options
from bench.overload.search import SearchResult
from sluice.contract import WorkloadClass

TARGET_NAMES = ("naive", "sluice")
CAPACITY_RATIO_TARGET = 8.0
TTFT_RATIO_TARGET = 1.0 / 3.0
REALTIME = WorkloadClass.REALTIME.label
OVERLOAD_MULTIPLES = (2.0, 4.0)  # Sluice's own-capacity levels judged against its 1x level
REALTIME_GOODPUT_KEPT = 0.9
REFUSAL_P99_LIMIT_S = 0.010
LEVEL_KEYS: tuple[str, ...] = (
    "target",
    "offered_rps",
    "tenant",
    "class",
    "requests",
    "goodput_rps",
    "ttft_p50_s",
    "ttft_p99_s",
    "e2e_p99_s",
    "output_tokens_per_s",
    "refused",
    "refusal_p99_s",
    "refused_without_retryinfo",
    "errors",
    "unfinished",
)


def capacity_label(multiple: float, of: str) -> str:
    """A level's label, e.g. ``2x sluice capacity``."""
    return f"{multiple:g}x {of} capacity"


def realtime_ttft_p99(result: LoadResult) -> float:
    """TTFT p99 of the run's ``realtime`` requests (all realtime tenants together)."""
    return float(result.summary(_realtime(result))["ttft_p99_s"])


def realtime_ttft_samples(result: LoadResult) -> int:
    """How many TTFT values :func:`realtime_ttft_p99` rests on (the requests that finished,
    timed out or were cut off after being sent, as in :func:`bench.load.records.summarize`)."""
    waited = (OUTCOME_OK, OUTCOME_TIMED_OUT, OUTCOME_CUT_OFF)
    return sum(r.outcome in waited and waited_ttft(r) is not None for r in _realtime(result))


def realtime_goodput(result: LoadResult) -> float:
    """Requests per second of the run's ``realtime`` tenants that met the SLO."""
    return float(result.summary(_realtime(result))["goodput_rps"])


def _realtime(result: LoadResult) -> list[RequestRecord]:
    return [r for r in result.records if r.workload_class == REALTIME]


def level_rows(result: LoadResult, offered_rps: float) -> list[dict[str, Any]]:
    """The run's ``levels`` rows, one per tenant, exactly :data:`LEVEL_KEYS`."""
    rows = []
    for tenant in result.scenario.tenants:
        s = result.summary([r for r in result.records if r.tenant == tenant.name])
        row = {"target": result.target, "offered_rps": offered_rps, "tenant": tenant.name}
        row["class"] = tenant.workload_class
        row.update({k: s[k] for k in LEVEL_KEYS if k in s})
        rows.append({k: row[k] for k in LEVEL_KEYS})
    return rows


def run_entry(result: LoadResult, offered_rps: float, labels: Sequence[str]) -> dict[str, Any]:
    """Totals of one measured run (search step or level) for ``runs``."""
    report = result.report(with_requests=False)
    served: dict[str, int] = {t.name: 0 for t in result.scenario.tenants}
    for r in result.records:
        if r.outcome == OUTCOME_OK:
            served[r.tenant] += r.output_tokens
    return {
        "target": result.target,
        "offered_rps": offered_rps,
        "labels": list(labels),
        "duration_s": result.duration_s,
        "elapsed_s": result.elapsed_s,
        **report["all"],
        "realtime_requests": len(_realtime(result)),
        "realtime_ttft_p99_s": realtime_ttft_p99(result),
        "fairness_jain": report["fairness_jain"],
        "fairness_jain_by_class": report["fairness_jain_by_class"],
        "served_tokens_by_tenant": served,
        "accounting": report["accounting"],
        "max_requests_reached": result.meta.get("max_requests_reached", False),
    }


def machine_info() -> dict[str, Any]:
    """CPU, Python and load average at the end of the run."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count() or 1,
        "python": platform.python_version(),
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
    }


def _checks(
    runs: Mapping[tuple[str, float], LoadResult],
    capacity: Mapping[str, float],
    levels: Mapping[str, Sequence[tuple[float, str]]],
    realtime_min_samples: int,
) -> dict[str, Any]:
    naive_cap, sluice_cap = capacity.get("naive", 0.0), capacity.get("sluice", 0.0)
    ratio = sluice_cap / naive_cap if naive_cap > 0 else None
    judged = {t: runs.get((t, naive_cap)) for t in TARGET_NAMES}
    ttft = {t: realtime_ttft_p99(run) if run else None for t, run in judged.items()}
    samples = {t: realtime_ttft_samples(run) if run else 0 for t, run in judged.items()}
    ttft_naive, ttft_sluice = ttft["naive"], ttft["sluice"]
    ttft_ratio = ttft_sluice / ttft_naive if ttft_naive and ttft_sluice is not None else None
    shown = min(samples.values()) >= realtime_min_samples
    return {
        "capacity_ratio": ratio,
        "capacity_ratio_target": CAPACITY_RATIO_TARGET,
        "capacity_ratio_met": ratio is not None and ratio >= CAPACITY_RATIO_TARGET,
        "realtime_ttft_p99_at_naive_capacity_s": ttft,
        "realtime_ttft_samples": samples,
        "realtime_ttft_min_samples": realtime_min_samples,
        "realtime_ttft_shown": shown,
        "realtime_ttft_ratio": ttft_ratio,
        "realtime_ttft_ratio_target": TTFT_RATIO_TARGET,
        "realtime_ttft_ratio_met": (
            shown and ttft_ratio is not None and ttft_ratio <= TTFT_RATIO_TARGET
        ),
        "sluice_overload": _overload_checks(runs, levels.get("sluice", ())),
    }


def _overload_checks(
    runs: Mapping[tuple[str, float], LoadResult], levels: Sequence[tuple[float, str]]
) -> list[dict[str, Any]]:
    """Sluice at 2x and 4x its own capacity: no collapse of REALTIME goodput against 1x, no
    errors or unfinished requests, quick refusals that all carry RetryInfo."""
    rates = {label: rate for rate, label in levels}

    def run_at(multiple: float) -> tuple[float | None, LoadResult | None]:
        rate = rates.get(capacity_label(multiple, "sluice"))
        return rate, runs.get(("sluice", rate)) if rate is not None else None

    base = run_at(1.0)[1]
    base_goodput = realtime_goodput(base) if base else 0.0
    entries = []
    for multiple in OVERLOAD_MULTIPLES:
        label = capacity_label(multiple, "sluice")
        rate, run = run_at(multiple)
        s: dict[str, Any] = run.summary() if run is not None else {}
        goodput_kept = (
            realtime_goodput(run) / base_goodput if run is not None and base_goodput > 0 else None
        )
        for metric, value, op, limit in (
            ("realtime_goodput_vs_1x", goodput_kept, ">=", REALTIME_GOODPUT_KEPT),
            ("errors", s.get("errors"), "<=", 0),
            ("unfinished", s.get("unfinished"), "<=", 0),
            ("refused_without_retryinfo", s.get("refused_without_retryinfo"), "<=", 0),
            ("refusal_p99_s", s.get("refusal_p99_s"), "<=", REFUSAL_P99_LIMIT_S),
        ):
            passed = value is not None and (value >= limit if op == ">=" else value <= limit)
            entries.append(
                {
                    "name": f"{metric}_at_{multiple:g}x_sluice_capacity",
                    "level": label,
                    "offered_rps": rate,
                    "value": value,
                    "op": op,
                    "limit": limit,
                    "pass": passed,
                }
            )
    return entries


def build_report(
    *,
    scenario: Scenario,
    runs: Mapping[tuple[str, float], LoadResult],
    searches: Mapping[str, SearchResult],
    levels: Mapping[str, Sequence[tuple[float, str]]],
    options: Options,
    argv: Sequence[str],
    started_at: float,
    duration_s: float,
) -> dict[str, Any]:
    """The whole report from what this run measured."""
    capacity = {t: searches[t].capacity_rps if t in searches else 0.0 for t in TARGET_NAMES}
    labels: dict[tuple[str, float], list[str]] = {}
    for target, entries in levels.items():
        for rate, label in entries:
            labels.setdefault((target, rate), []).append(label)
    level_keys = sorted(labels, key=lambda k: (TARGET_NAMES.index(k[0]), k[1]))
    rows = [row for key in level_keys for row in level_rows(runs[key], key[1])]
    sluice_levels = [k for k in level_keys if k[0] == "sluice"]
    top = max(sluice_levels, key=lambda k: k[1], default=None)
    fairness = runs[top].report(with_requests=False)["fairness_jain"] if top else 1.0
    return {
        "capacity_at_slo_rps": capacity,
        "levels": rows,
        "fairness_jain": fairness,
        "fairness_jain_at": {"target": "sluice", "offered_rps": top[1]} if top else None,
        "checks": _checks(runs, capacity, levels, options.realtime_min_requests),
        "runs": [
            run_entry(runs[key], key[1], labels.get(key, []))
            for key in sorted(runs, key=lambda k: (TARGET_NAMES.index(k[0]), k[1]))
        ],
        "search": {
            target: {
                "capacity_rps": search.capacity_rps,
                "steps": [asdict(step) for step in search.steps],
                "stopped_by_budget": search.stopped_by_budget,
                "bracketed": search.bracketed,
            }
            for target, search in searches.items()
        },
        "config": {
            "scenario": scenario.model_dump(mode="json", by_alias=True),
            "options": asdict(options),
            "argv": list(argv),
        },
        "machine": machine_info(),
        "started_at": datetime.datetime.fromtimestamp(started_at, datetime.UTC).isoformat(),
        "duration_s": duration_s,
    }
