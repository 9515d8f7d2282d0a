"""``vllm.md``: the verdict table, then each scenario's settings, searches and levels by class."""

from __future__ import annotations

import shlex
from typing import Any

from bench.slo.report import search_line

SERVERS = (("sluice", "Sluice + vLLM"), ("bare", "bare vLLM"))


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:.1f} %"


def _rps(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f} req/s"


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f} s"


def _ok(v: bool) -> str:
    return "pass" if v else "**FAIL**"


def verdict_rows(doc: dict[str, Any]) -> list[str]:
    """One row per figure: scenario, figure, Sluice + vLLM, bare vLLM, target, pass."""
    rows = [
        "| scenario | figure | Sluice + vLLM | bare vLLM | target | pass |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in doc["scenarios"]:
        name = e["scenario"]
        if "skipped" in e:
            continue
        if "error" in e:
            rows.append(f"| {name} | run | error: {e['error']} | | measured | **FAIL** |")
        cap = e["capacity"]
        ratio = "–" if cap["ratio"] is None else f"{cap['ratio']:.2f}×"
        rows.append(
            f"| {name} | capacity at SLO | {_rps(cap['sluice_rps'])} ({ratio} bare) | "
            f"{_rps(cap['bare_rps'])} | ≥ {cap['target']:g}× bare | {_ok(cap['pass'])} |"
        )
        for level in e["levels"]:
            v = level["verdict"]
            bare = _pct(v["bare_realtime_attainment_admitted"])
            if v["bare_realtime_attainment_admitted"] is not None:
                bare += " (falls)" if v["bare_falls"] else " (holds)"
            rows.append(
                f"| {name} | {level['label']} ({level['offered_rps']:.3f} req/s): REALTIME SLO "
                f"attainment of admitted | {_pct(v['sluice_realtime_attainment_admitted'])} | "
                f"{bare} | Sluice ≥ {v['target'] * 100:g} % | {_ok(v['pass'])} |"
            )
    return rows


def level_rows(e: dict[str, Any]) -> list[str]:
    """Each level's classes on each server."""
    rows = [
        "| level | req/s | server | class | requests | admitted | met SLO (of admitted) | "
        "met SLO (of all) | goodput req/s | refused | TTFT p99 | TPOT p99 | errors | "
        "unfinished |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in e["levels"]:
        for key, label in SERVERS:
            run = level[key]
            if run is None:
                cells = [level["label"], f"{level['offered_rps']:.3f}", label, "not run"]
                rows.append("| " + " | ".join(cells + ["–"] * 10) + " |")
                continue
            for cls, c in run["classes"].items():
                share = c["met_slo"] / c["requests"] if c["requests"] else None
                rows.append(
                    f"| {level['label']} | {level['offered_rps']:.3f} | {label} | {cls} | "
                    f"{c['requests']} | {c['admitted']} | {_pct(c['attainment_admitted'])} | "
                    f"{_pct(share)} | {c['goodput_rps']:.3f} | {c['refused']} | "
                    f"{_s(c['ttft_p99_s'])} | {_s(c['tpot_p99_s'])} | {c['errors']} | "
                    f"{c['unfinished']} |"
                )
    return rows


def scenario_lines(e: dict[str, Any]) -> list[str]:
    """A measured scenario's section."""
    lines = [f"## {e['scenario']}", ""]
    settings = e.get("settings", {})
    if settings.get("vllm_argv"):
        lines += [f"Bare vLLM: `{shlex.join(settings['vllm_argv'])}`", ""]
    if settings.get("sluice_up"):
        up = ", ".join(f"{k} {v}" for k, v in settings["sluice_up"].items())
        lines += [f"Sluice + vLLM: `sluice up` with {up}", ""]
    for key, label in (("bare", "bare vLLM"), ("sluice", "Sluice + vLLM")):
        phase = e[key]
        lines.append(search_line(label, phase["search"], phase["capacity_rps"]))
        if phase.get("error"):
            lines.append(f"  - failed: {phase['error']}")
    return [*lines, "", *level_rows(e), ""]


def markdown(doc: dict[str, Any]) -> str:
    """The whole ``vllm.md``."""
    machine = doc.get("machine", {})
    smoke = " **Smoke run: short steps, the numbers mean nothing.**" if doc.get("smoke") else ""
    lines = [
        "# Sluice + vLLM against bare vLLM (`make bench-vllm`)",
        "",
        f"Generated {doc['generated_at']} in {doc['wall_s']:g} s on "
        f"{machine.get('cpu_model', '?')} ({machine.get('cpu_count', '?')} CPUs), vLLM "
        f"{doc.get('vllm_version', '?')}.{smoke} Bare vLLM is `vllm serve` with the engine "
        "settings the Sluice node gives vLLM (same model directory, dtype, context, batch and KV "
        "cache; its own first-come-first-served scheduling); Sluice + vLLM is `sluice up` with "
        "one node on vLLM's engine. Both get the same scenario, seed and arrivals, run up together "
        "and measured in turns, a probe or level of one then of the other; the overload "
        "levels are multiples of bare vLLM's capacity. Definitions: `bench/vllm/figures.py`; "
        "every figure is of this run.",
        "",
        *verdict_rows(doc),
        "",
    ]
    skipped = [e for e in doc["scenarios"] if "skipped" in e]
    if skipped:
        lines += [f"- {e['scenario']}: not run, {e['skipped']}" for e in skipped] + [""]
    for e in doc["scenarios"]:
        if "skipped" not in e:
            lines += scenario_lines(e)
    return "\n".join(lines).rstrip("\n")
