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
    "own_figure": (
        "the scenario's own figure: for node faults, requests with no token when the fault began "
        "that completed on another node; for the fuzzer, answers outside the documented codes; "
        "for strangers, internal calls that succeeded without a valid client certificate (or "
        "with one of the wrong identity), of the attempts"
    ),
    "strangers": (
        "calls at every internal surface (Node and Cache methods on each node and the cache, "
        "etcd reads and writes, Redis commands) by plaintext callers, TLS callers without a "
        "certificate, a foreign CA's certificates and the suite's certificates of the wrong "
        "identity; succeeded: the service did it (must be 0); refused: by gRPC status or Redis "
        "error word; unexplained: any other end; controls: the right identities' calls, before "
        "and after, which must succeed (bench/chaos/strangers.py)"
    ),
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


def own_figure(entry: dict[str, Any]) -> str:
    """The scenario's own headline figure (see ``DEFINITIONS["own_figure"]``), "–" when none."""
    strangers = entry.get("strangers")
    if strangers is not None:
        return (
            f"internal calls succeeded without a valid certificate: {strangers['succeeded']} "
            f"of {strangers['attempts']}"
        )
    fuzz = entry.get("fuzz")
    if fuzz is not None:
        return f"undocumented answers: {fuzz['undocumented']} of {fuzz['answers']}"
    if "no_token_at_fault" in entry:
        return (
            f"no token at fault, completed elsewhere: {entry['completed_elsewhere']} "
            f"of {entry['no_token_at_fault']}"
        )
    return "–"


def _stranger_misses(strangers: dict[str, Any]) -> list[str]:
    misses = []
    if strangers["succeeded"]:
        misses.append("internal calls succeeded without a valid certificate")
    if strangers["unexplained"]:
        misses.append("unexplained answers to strangers")
    if strangers["not_made"]:
        misses.append("attempts not made")
    if not strangers["controls_ok"]:
        misses.append("controls failed")
    return misses


def verdict(entry: dict[str, Any]) -> str:
    """Whether the scenario meets issue 17's figures that it measures: 0 hung, 0 lost,
    0 INTERNAL; for the fuzzer only documented answers (none lost to oversized trailers)
    and a healthy suite after; for strangers 0 internal calls succeeded, every attempt made
    and refused by its door, and the controls served."""
    if "error" in entry:
        return "error"
    misses = [k for k in ("hung", "lost", "internal") if entry.get(k)]
    if "strangers" in entry:
        misses += _stranger_misses(entry["strangers"])
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
    head += ["recover tenants (s)", "recover all nodes (s)", "own figure", "0 hung/lost/INTERNAL"]
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
                own_figure(entry),
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
        strangers = entry.get("strangers")
        if strangers is not None:
            lines += _stranger_details(strangers)
    timeline = "; ".join(f"{e['t_s']:g} s {e['event']}" for e in entry.get("timeline", []))
    lines += [f"- timeline: {timeline}", ""]
    return lines


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in counts.items()) or "none"


def _stranger_details(strangers: dict[str, Any]) -> list[str]:
    lines = [
        f"- strangers: {strangers['attempts']} attempts, {strangers['succeeded']} succeeded, "
        f"{strangers['unexplained']} unexplained, {strangers['not_made']} not made; refused: "
        f"{_codes(strangers['refused'])}",
        "",
        "| surface | attempts | succeeded | refused | credentials |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {s['attempts']} | {s['succeeded']} | {_codes(s['refused'])} "
        f"| {s['credentials']} |"
        for name, s in strangers["by_surface"].items()
    ]
    lines.append("")
    lines += [f"- succeeded: {call}" for call in strangers["succeeded_calls"]]
    lines += [f"- unexplained: {call}" for call in strangers["unexplained_calls"]]
    controls = ", ".join(f"{k}: {v}" for k, v in strangers["controls"].items())
    lines.append(f"- controls (the right identities): {controls}")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    """The whole ``chaos.md``."""
    s = doc["settings"]
    lines = [
        "# Chaos suite (`make chaos`)",
        "",
        f"Generated {doc['generated_at']} on {doc['machine']}. Each scenario ran in a fresh "
        f"`sluice up` suite (2 nodes of tiny-random-llama; secure by default: mutual TLS between "
        f"services, etcd and Redis users, TLS on the public port) under steady streaming load: "
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
