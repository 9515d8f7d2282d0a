"""``chaos.json`` and ``chaos.md``: one entry (and one table row) per scenario, from this run's
figures only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.chaos.figures import RECOVERY_STREAK
from bench.chaos.load import STALL_BOUND_S

COLUMNS: list[tuple[str, str]] = [
    ("sent", "sent"),
    ("completed", "completed"),
    ("refused_with_retry_info", "refused (RetryInfo)"),
    ("unavailable_after_first_token", "UNAVAILABLE after 1st token"),
    ("retried_elsewhere", "retried elsewhere"),
    ("hung", "hung"),
    ("lost", "lost"),
    ("internal", "INTERNAL"),
    ("victim_disturbed", "victim disturbed"),
]
DEFINITIONS = {
    "sent": "requests the steady load started (probes and fuzz calls not included)",
    "completed": "streams that ended normally",
    "refused_with_retry_info": "calls refused with a RetryInfo detail (any status code)",
    "unavailable_after_first_token": "streams that ended UNAVAILABLE after at least one chunk",
    "retried_elsewhere": (
        "the schedulers' own count of requests retried on another node "
        "(sluice_scheduler_retries_total, delta over the scenario; a restarted scheduler's "
        "counter counts from zero); 'completed_elsewhere' of 'no_token_at_fault' is the "
        "client-side upper bound (see bench/chaos/figures.py)"
    ),
    "hung": f"requests that went more than {STALL_BOUND_S:g} s without a chunk while open",
    "lost": "requests not ended when the load stopped plus its grace (cancelled)",
    "internal": "INTERNAL answers: load, probes and, for the fuzzer, its calls",
    "victim_disturbed": "the victim tenant's requests that did not complete, or hung",
    "recovery": (
        "seconds from the heal (or the injection when nothing undoes the fault) to the start of "
        "the first probe round (one every 0.5 s) after the last one that failed, provided at "
        f"least {RECOVERY_STREAK} rounds follow, all good: service came back and stayed until the "
        "load stopped. Conditions: every tenant's short generation completed (tenants_s); the "
        "scheduler listed every node the suite had before the fault as healthy with a closed "
        "circuit (nodes_s); both (full_s). 0: no round failed; null: not back for good within "
        "the scenario. tenants_since_injection_s: tenants_s counted from the injection instead "
        "(the whole outage the tenants saw, for faults that are healed)"
    ),
}


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def verdict(entry: dict[str, Any]) -> str:
    """Whether the scenario meets issue 17's figures that it measures: 0 hung, 0 lost,
    0 INTERNAL, and for the fuzzer only documented answers (none lost to oversized trailers)
    and a healthy suite after."""
    if "error" in entry:
        return "error"
    misses = [k for k in ("hung", "lost", "internal") if entry.get(k)]
    fuzz = entry.get("fuzz")
    if fuzz is not None:
        if fuzz["undocumented"]:
            misses.append("undocumented answers")
        if fuzz.get("oversized_trailers"):
            misses.append("oversized error trailers")
        healthy = fuzz["healthy_after"]
        if healthy["health"] != "SERVING" or healthy["request"] != "completed":
            misses.append("unhealthy after")
    return "yes" if not misses else "no: " + ", ".join(misses)


def table(entries: Sequence[dict[str, Any]]) -> list[str]:
    """The markdown table, one row per scenario."""
    head = ["scenario", *(title for _, title in COLUMNS)]
    head += ["recover tenants (s)", "recover all nodes (s)", "0 hung/lost/INTERNAL"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for entry in entries:
        if "error" in entry:
            cells = [entry["title"], *(["–"] * (len(head) - 2)), "error"]
        else:
            rec = entry["recovery"]
            cells = [
                entry["title"],
                *(_cell(entry.get(key)) for key, _ in COLUMNS),
                _cell(rec["tenants_s"]),
                _cell(rec["full_s"]),
                verdict(entry),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _details(entry: dict[str, Any]) -> list[str]:
    lines = [f"### {entry['title']} (`{entry['name']}`)", ""]
    if "error" in entry:
        lines += [f"Not measured: {entry['error']}", ""]
    else:
        outcomes = ", ".join(f"{k} {v}" for k, v in entry["outcomes"].items())
        lines.append(f"- outcomes: {outcomes}")
        if "no_token_at_fault" in entry:
            lines.append(
                f"- node fault: {entry['no_token_at_fault']} requests had no token when it began, "
                f"{entry['completed_elsewhere']} of them completed on another node; "
                f"{entry['disturbed_on_other_nodes']} streams on other nodes disturbed"
            )
        lines.append(
            f"- probes: {entry['probe_rounds']} rounds, {entry['probes_failed']} failed; "
            f"recovery {entry['recovery']}; supervised: {entry.get('supervised')}"
        )
        fuzz = entry.get("fuzz")
        if fuzz is not None:
            codes = ", ".join(f"{k} {v}" for k, v in fuzz["by_code"].items())
            reasons = ", ".join(f"{k} {v}" for k, v in fuzz.get("by_reason", {}).items())
            lines.append(
                f"- fuzzer: {fuzz['answers']} answers in {fuzz['elapsed_s']} s ({codes}); "
                f"undocumented {fuzz['undocumented']}; answers lost to oversized trailers "
                f"{fuzz.get('oversized_trailers', 0)}; healthy after: {fuzz['healthy_after']}"
            )
            lines.append(f"- fuzzer refusals by reason: {reasons}")
            lines += [f"  - {f['method']} → {f['code']}: {f['details']}" for f in fuzz["failures"]]
    timeline = "; ".join(f"{e['t_s']:g} s {e['event']}" for e in entry.get("timeline", []))
    lines += [f"- timeline: {timeline}", ""]
    return lines


def markdown(doc: dict[str, Any]) -> str:
    """The whole ``chaos.md``."""
    s = doc["settings"]
    lines = [
        "# Chaos suite (`make chaos`)",
        "",
        f"Generated {doc['generated_at']} on {doc['machine']}. Each scenario ran in a fresh "
        f"`sluice up` suite (2 nodes of tiny-random-llama) under steady streaming load: "
        f"{s['workers_per_tenant']} workers per tenant for 3 tenants (one the victim), "
        f"{s['max_new_tokens']} tokens per request, SDK `retry=None`; fault at "
        f"{s['fault_at_s']:g} s; load kept {s['after_s']:g} s after the fault is over "
        f"(at least {s['load_s']:g} s), then {s['grace_s']:g} s of grace. Figures of this run "
        "only; definitions in chaos.json and `bench/chaos/figures.py`.",
        "",
        *table(doc["scenarios"]),
        "",
        "## Per scenario",
        "",
    ]
    for entry in doc["scenarios"]:
        lines += _details(entry)
    return "\n".join(lines)
