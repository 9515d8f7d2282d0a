"""``slo.md``: the verdict table, then each scenario's searches (with any confirmation at a
contested rate) and levels by class, then the signals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.slo.figures import (
    ATTAINMENT_TARGET,
    GOODPUT_TARGET,
    REFUSAL_P99_TARGET_S,
)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:.1f} %"


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f} s"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ok(v: bool) -> str:
    return "pass" if v else "**FAIL**"


TARGETS = {
    "realtime_attainment_admitted": f"≥ {ATTAINMENT_TARGET * 100:g} %",
    "realtime_goodput_vs_1x": f"≥ {GOODPUT_TARGET:g}×",
    "errors_besides_refusals": "0",
    "refused_without_retryinfo": "0",
    "refusal_p99_s": f"≤ {REFUSAL_P99_TARGET_S * 1000:g} ms",
}


def _value(name: str, value: Any) -> str:
    if name == "realtime_attainment_admitted":
        return _pct(value)
    if name == "realtime_goodput_vs_1x":
        return "–" if value is None else f"{value:.2f}×"
    if name == "refusal_p99_s":
        return "–" if value is None else f"{value * 1000:.1f} ms"
    return str(value)


def verdict_rows(doc: dict[str, Any]) -> list[str]:
    """One row per figure: scenario, figure, measured, target, pass."""
    rows = ["| scenario | figure | measured | target | pass |", "| --- | --- | --- | --- | --- |"]
    for e in doc["scenarios"]:
        name = e["scenario"]
        if "error" in e:
            rows.append(f"| {name} | run | error: {e['error']} | measured | **FAIL** |")
        cap = e.get("capacity", {})
        rows.append(
            f"| {name} | capacity at SLO, default settings vs the original terms (16 "
            f"sequences, no guard) | {_num(cap.get('capacity_rps'))} vs "
            f"{_num(cap.get('reference_rps'))} req/s ({_num(cap.get('ratio'), 2)}×) | ≥ 1× | "
            f"{_ok(bool(cap.get('pass')))} |"
        )
        for level in e.get("levels", [])[1:]:
            for check, result in level["verdict"]["checks"].items():
                measured = _value(check, result["value"])
                if check == "refusal_p99_s" and "refusals" in level:
                    measured = _refusal_text(measured, level)
                rows.append(
                    f"| {name} | {level['label']} ({level['offered_rps']:.3f} req/s): {check} | "
                    f"{measured} | {TARGETS[check]} | "
                    f"{_ok(result['pass'])} |"
                )
    return rows


def _refusal_text(measured: str, level: Mapping[str, Any]) -> str:
    """A level's refusal p99 with how many refusals it is of and, where it was probed, the bare
    refusal floor's p99 in the same level."""
    count = level["refusals"]["count"]
    said = [f"{count} refusals"] if count else []
    floor = level.get("floor")
    if floor:
        said.append(f"bare floor {floor['p99_s'] * 1000:.1f} ms over {floor['count']} probes")
    if not count:
        return "none refused" + (f" ({said[0]})" if said else "")
    return f"{measured} ({'; '.join(said)})"


def level_rows(e: dict[str, Any]) -> list[str]:
    """Each level's classes."""
    rows = [
        "| level | req/s | class | requests | admitted | met SLO (of admitted) | goodput req/s | "
        "refused | refusal p99 | TTFT p99 | TPOT p99 | errors | unfinished |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in e.get("levels", []):
        for cls, c in level["classes"].items():
            p99 = c["refusal_p99_s"]
            rows.append(
                f"| {level['label']} | {level['offered_rps']:.3f} | {cls} | {c['requests']} | "
                f"{c['admitted']} | {_pct(c['attainment_admitted'])} | "
                f"{c['goodput_rps']:.3f} | {c['refused']} | "
                f"{'–' if p99 is None else f'{p99 * 1000:.1f} ms'} | {_s(c['ttft_p99_s'])} | "
                f"{_s(c['tpot_p99_s'])} | {c['errors']} | {c['unfinished']} |"
            )
    return rows


def confirmation_text(c: Mapping[str, Any]) -> str:
    """A contested rate probed again: the pooled verdict and the capacity it left."""
    was = c["capacity_before_rps"]
    moved = "" if was == c["capacity_rps"] else f", was {_num(was)}"
    return (
        f"confirmed at {c['offered_rps']:g} req/s: pooled {_pct(c['pooled_attainment'])} over "
        f"{c['pooled_requests']} requests ({c['probes']} probe{'s' if c['probes'] != 1 else ''}, "
        f"this one "
        f"{_pct(c['attainment'])}), {'pass' if c['passed'] else 'fail ✗'} → capacity "
        f"{_num(c['capacity_rps'])} req/s{moved}"
    )


def search_line(
    label: str,
    steps: list[dict[str, Any]],
    capacity: float | None,
    confirmations: Sequence[Mapping[str, Any]] = (),
) -> str:
    """A search as one line, then its confirmations (``capacity``: the one they left)."""
    probes = ", ".join(
        f"{s['offered_rps']:g} → {s['attainment'] * 100:.0f} %{'' if s['passed'] else ' ✗'}"
        for s in steps
    )
    line = f"- {label}: capacity {_num(capacity)} req/s ({probes or 'no probes'})"
    return "; ".join([line, *(confirmation_text(c) for c in confirmations)])


def signal_rows(doc: dict[str, Any]) -> list[str]:
    """Each signal's score."""
    rows = [
        "| signal | bins read | bins at risk | Spearman vs share missed | AUC (at risk) | "
        "best cut (TPR / FPR) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in doc["signals"].items():
        cut = s.get("threshold")
        best = "–" if not cut else f"≥ {cut['value']:.3g} ({cut['tpr']:.2f} / {cut['fpr']:.2f})"
        rows.append(
            f"| {name} | {s['bins']} | {s['at_risk']} | {_num(s['spearman'], 2)} | "
            f"{_num(s['auc'], 2)} | {best} |"
        )
    return rows


def _method(doc: dict[str, Any]) -> str:
    """What the run says of its load client and its refusal figure (older files: nothing)."""
    said = ""
    if "client_loop" in doc:
        said += f"The load client shares the machine and runs on {doc['client_loop']}. "
    if doc.get("refusal_p99_over") == "level":
        said += (
            "A level's refusal p99 is over all its refusals, whatever their class (how many "
            "in brackets); each class's is in its table. "
        )
    if doc.get("refusal_floor") == "probed":
        said += (
            "A bare gRPC server that refuses every call (`bench.scheduler.refusal_floor`) was "
            "probed 20 times a second from the load client's loop through every run: its p99 "
            "in a level (beside the refusal p99) is what any refusal cost on this machine then "
            "(docs/decisions/bench-refusal-tail-kernel-tick.md). "
        )
    if doc.get("arms") == "in turns":
        said += (
            "Both suites ran up together, their searches one probe of each in turn (the "
            "default's first); where their capacities differed, each probed the higher rate "
            "once more and was judged there on all its probes pooled (each search's line says "
            "so); the reference then stopped and the levels ran on the default suite alone (a "
            "level at a rate its search measured reuses those windows, run beside the idle "
            "reference). "
        )
    return said


def markdown(doc: dict[str, Any]) -> str:
    """The whole ``slo.md``."""
    lines = [
        "# Overload on every scenario, default settings (`make bench-slo`)",
        "",
        f"Generated {doc['generated_at']} in {doc['wall_s']:g} s. Sluice only, one node as "
        "`sluice up` starts it (32 sequences, the inter-token guard and TTFT target on), "
        "against the same scenario under the original terms (16 sequences, no guard, no TTFT "
        "target); both in the node's default dtype (`auto`: bf16 on this CPU). "
        f"{_method(doc)}Definitions: `bench/slo/figures.py`, `bench/slo/signals.py`; every "
        "figure is of this run.",
        "",
        *verdict_rows(doc),
        "",
    ]
    for e in doc["scenarios"]:
        lines += [f"## {e['scenario']}", ""]
        ref = e.get("reference")
        if ref:
            lines.append(
                search_line(
                    "original terms",
                    ref["search"],
                    ref.get("capacity_rps"),
                    ref.get("confirmation", []),
                )
            )
        own = search_line(
            "default settings",
            e.get("search", []),
            e.get("capacity_rps"),
            e.get("confirmation", []),
        )
        lines += [own, ""]
        lines += [*level_rows(e), ""]
    lines += [
        "## Autoscaling signals (issue 21)",
        "",
        "Each run cut into 5-s bins; a bin is at risk when more than 5 % of the REALTIME "
        "requests sent in it were not served within the SLO (refused, failed or late).",
        "",
        *signal_rows(doc),
    ]
    return "\n".join(lines)
