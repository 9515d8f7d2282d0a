"""The overload report for people: the terminal table, ``overload.md`` and the two plots;
:func:`write_outputs` writes them with ``overload.json`` (:mod:`bench.overload.report`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.overload.report import TARGET_NAMES


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
