"""The overload benchmark's report: JSON (a fixed schema other tools read), markdown and plots.

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
:func:`bench.load_stats.summarize`: TTFT percentiles include requests that timed out or were
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
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.load import LoadResult
from bench.load_scenario import Scenario
from bench.load_stats import (
    OUTCOME_CUT_OFF,
    OUTCOME_OK,
    OUTCOME_TIMED_OUT,
    RequestRecord,
    waited_ttft,
)

if TYPE_CHECKING:
    from bench.overload import Options, SearchResult

TARGET_NAMES = ("naive", "sluice")
CAPACITY_RATIO_TARGET = 8.0
TTFT_RATIO_TARGET = 1.0 / 3.0
REALTIME = "realtime"
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
    timed out or were cut off after being sent, as in :func:`bench.load_stats.summarize`)."""
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


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _level_label(report: Mapping[str, Any], target: str, rate: float) -> str:
    for run in report["runs"]:
        if run["target"] == target and run["offered_rps"] == rate:
            return "; ".join(run["labels"])
    return ""


def check_lines(report: Mapping[str, Any]) -> list[str]:
    """The issue's targets, met or not, with the numbers (and any failure)."""
    c = report["checks"]
    cap = report["capacity_at_slo_rps"]
    ttft = c["realtime_ttft_p99_at_naive_capacity_s"]
    samples = c["realtime_ttft_samples"]
    mark = {True: "met", False: "NOT met"}
    if c["realtime_ttft_shown"]:
        ttft_verdict = mark[c["realtime_ttft_ratio_met"]]
    else:
        ttft_verdict = (
            f"NOT met (not shown: fewer than {c['realtime_ttft_min_samples']} REALTIME "
            "samples per target)"
        )
    notes = []
    for target, search in report["search"].items():
        if search["capacity_rps"] == 0:
            notes.append(f"{target}: no step passed, levels scale from its lowest probed rate")
        elif not search["bracketed"]:
            notes.append(f"{target}: a lower bound, no step above it failed")
    caveat = f" ({'; '.join(notes)})" if notes else ""
    return [
        f"capacity at SLO: naive {cap['naive']:.3f} req/s, sluice {cap['sluice']:.3f} req/s, "
        f"ratio {_f(c['capacity_ratio'])}x (target >= {c['capacity_ratio_target']:g}x): "
        f"{mark[c['capacity_ratio_met']]}{caveat}",
        f"REALTIME TTFT p99 at the naive capacity: naive {_f(ttft['naive'])} s over "
        f"{samples['naive']} REALTIME samples, sluice {_f(ttft['sluice'])} s over "
        f"{samples['sluice']}, ratio {_f(c['realtime_ttft_ratio'])} (target <= 0.33): "
        f"{ttft_verdict}",
        *_overload_lines(c["sluice_overload"]),
        f"fairness (Jain, within class, sluice at its highest level): "
        f"{report['fairness_jain']:.3f}",
        *[f"FAILED {failure}" for failure in report.get("failures", [])],
    ]


def _overload_lines(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per judged Sluice level: each check's value against its limit."""
    lines = []
    for level in dict.fromkeys(e["level"] for e in entries):
        checks = [e for e in entries if e["level"] == level]
        rate = checks[0]["offered_rps"]
        where = f"{rate:.3f} req/s" if rate is not None else "not measured"
        parts = []
        for e in checks:
            what = e["name"].removesuffix(f"_at_{level.replace(' ', '_')}")
            value = "-" if e["value"] is None else f"{e['value']:.3g}"
            parts.append(
                f"{what} {value} ({e['op']} {e['limit']:g}) {'ok' if e['pass'] else 'FAIL'}"
            )
        verdict = "met" if all(e["pass"] for e in checks) else "NOT met"
        lines.append(f"sluice at {level} ({where}): {'; '.join(parts)}: {verdict}")
    return lines


def table_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """Rows of the per-tenant table."""
    out = []
    for row in report["levels"]:
        out.append(
            [
                row["target"],
                f"{row['offered_rps']:.3f}",
                _level_label(report, row["target"], row["offered_rps"]),
                row["tenant"],
                row["class"],
                str(row["requests"]),
                f"{row['goodput_rps']:.3f}",
                _f(row["ttft_p50_s"]),
                _f(row["ttft_p99_s"]),
                _f(row["e2e_p99_s"]),
                _f(row["output_tokens_per_s"], 1),
                str(row["refused"]),
                _f(row["refusal_p99_s"], 3),
                str(row["refused_without_retryinfo"]),
                str(row["errors"]),
                str(row["unfinished"]),
            ]
        )
    return out


TABLE_HEADER = [
    "target",
    "offered req/s",
    "level",
    "tenant",
    "class",
    "requests",
    "goodput req/s",
    "TTFT p50 s",
    "TTFT p99 s",
    "e2e p99 s",
    "out tok/s",
    "refused",
    "refusal p99 s",
    "refused w/o RetryInfo",
    "errors",
    "unfinished",
]


def render_text(report: Mapping[str, Any]) -> str:
    """Plain-text table and checks for the terminal."""
    rows = [TABLE_HEADER, *table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([*lines, "", *check_lines(report)])


def render_markdown(report: Mapping[str, Any]) -> str:
    """``overload.md``: checks, the per-tenant table, every run's totals."""
    cfg = report["config"]
    scenario = cfg["scenario"]
    lines = [
        "# Overload benchmark",
        "",
        f"{scenario['model']}, scenario `{scenario['name']}`, on {report['machine']['cpu_count']} "
        f"CPUs ({report['machine']['cpu_model']}); started {report['started_at']}, took "
        f"{report['duration_s'] / 60:.1f} min. SLO: TTFT <= {scenario['slo']['ttft_s']} s and "
        f"mean TPOT <= {scenario['slo']['tpot_s']} s; capacity at SLO = highest offered rate with "
        f">= {cfg['options']['required_attainment']:.0%} of requests meeting it. Sluice's node "
        f"runs at most {cfg['options'].get('node_max_sequences', 32)} sequences at once.",
        "",
        *[f"- {line}" for line in check_lines(report)],
        "",
        "![goodput and TTFT](overload.png)",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + " --- |" * len(TABLE_HEADER),
        *["| " + " | ".join(r) + " |" for r in table_rows(report)],
        "",
        "Every measured run (search steps included):",
        "",
        "| target | offered req/s | level | requests | SLO met | goodput req/s | REALTIME TTFT "
        "p99 s | out tok/s | refused | errors | unfinished | fairness |",
        "|" + " --- |" * 12,
    ]
    for run in report["runs"]:
        lines.append(
            f"| {run['target']} | {run['offered_rps']:.3f} | {'; '.join(run['labels'])} | "
            f"{run['requests']} | {run['slo_attainment']:.1%} | {run['goodput_rps']:.3f} | "
            f"{run['realtime_ttft_p99_s']:.2f} | {run['output_tokens_per_s']:.1f} | "
            f"{run['refused']} | {run['errors']} | {run['unfinished']} | "
            f"{run['fairness_jain']:.3f} |"
        )
    lines += [
        "",
        "TTFT percentiles include requests that never received a token, at the time they "
        "waited; `unfinished` counts requests that timed out or were still running when the "
        "run ended. Fairness is Jain's index, within each class, of served output tokens over "
        "each tenant's weighted max-min fair share.",
        "",
        "![tenant shares](overload_shares.png)",
        "",
    ]
    return "\n".join(lines)


def write_plots(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """``overload.png`` (goodput and REALTIME TTFT p99 vs offered load) and
    ``overload_shares.png`` (each tenant's share of served tokens per level)."""
    import matplotlib  # noqa: PLC0415 - only needed for the pictures

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FormatStrFormatter  # noqa: PLC0415

    fig, (goodput, ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    slo = report["config"]["scenario"]["slo"]["ttft_s"]
    rates = [run["offered_rps"] for run in report["runs"]] or [1.0]
    for target in TARGET_NAMES:
        runs = [r for r in report["runs"] if r["target"] == target and r["requests"]]
        x = [r["offered_rps"] for r in runs]  # sorted by rate already
        goodput.plot(x, [r["goodput_rps"] for r in runs], marker="o", label=target)
        timed = [r for r in runs if r["realtime_requests"]]
        ttft.plot(
            [r["offered_rps"] for r in timed],
            [max(r["realtime_ttft_p99_s"], 1e-3) for r in timed],
            marker="o",
            label=target,
        )
    span = [min(rates), max(rates)]
    goodput.plot(span, span, linestyle=":", color="grey", label="goodput = offered")
    ttft.axhline(slo, linestyle="--", color="grey", label=f"SLO {slo:g} s")
    for axis, title, ylabel in (
        (goodput, "Goodput (requests meeting the SLO)", "goodput (req/s)"),
        (ttft, "REALTIME time to first token, p99", "TTFT p99 (s)"),
    ):
        axis.set_xscale("log")
        for ticks in (axis.xaxis, axis.yaxis):
            ticks.set_major_formatter(FormatStrFormatter("%g"))
            ticks.set_minor_formatter(FormatStrFormatter(""))
        axis.set_xlabel("offered load (req/s, all tenants)")
        axis.set_ylabel(ylabel)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    goodput.set_yscale("symlog", linthresh=0.01)  # a goodput of 0 stays on the chart
    goodput.set_ylim(bottom=0)
    ttft.set_yscale("log")
    for ticks in (goodput.yaxis, ttft.yaxis):
        ticks.set_major_formatter(FormatStrFormatter("%g"))
    fig.suptitle(f"{report['config']['scenario']['model']}: Sluice vs one-at-a-time HF generate")
    fig.tight_layout()
    main_path = out_dir / "overload.png"
    fig.savefig(main_path, dpi=110)
    plt.close(fig)

    levels = [r for r in report["runs"] if r["labels"]]
    tenants = [t["name"] for t in report["config"]["scenario"]["tenants"]]
    fig, axis = plt.subplots(figsize=(max(6.0, 1.0 * len(levels) + 2), 4.5))
    bottoms = [0.0] * len(levels)
    for tenant in tenants:
        shares = []
        for run in levels:
            total = sum(run["served_tokens_by_tenant"].values())
            shares.append(run["served_tokens_by_tenant"][tenant] / total if total else 0.0)
        axis.bar(range(len(levels)), shares, bottom=bottoms, label=tenant)
        bottoms = [b + s for b, s in zip(bottoms, shares, strict=True)]
    axis.set_xticks(
        range(len(levels)), [f"{r['target']}\n{r['offered_rps']:.2f}/s" for r in levels], fontsize=8
    )
    axis.set_ylabel("share of served output tokens")
    axis.set_title("Per-tenant shares at each load level")
    axis.legend(title="tenant", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    shares_path = out_dir / "overload_shares.png"
    fig.savefig(shares_path, dpi=110)
    plt.close(fig)
    return [main_path, shares_path]


def write_outputs(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``overload.json``, ``overload.md`` and the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "overload.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path = out_dir / "overload.md"
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return [json_path, md_path, *write_plots(report, out_dir)]
