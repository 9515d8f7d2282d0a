"""Definitions of ``make bench-slo``'s figures (issue 20, "any workload, default settings"),
pure so they are tested without servers.

- *Admitted*: a request not refused (``RESOURCE_EXHAUSTED``). *SLO attainment of admitted*:
  those that finished within the scenario's SLO (TTFT, and mean time per output token for a
  generation; latency for an ``Embed``) over the admitted, per class.
- *Goodput* of a class: its requests that met the SLO per second of the arrival window.
- At 2x and 4x the scenario's capacity at SLO: REALTIME attainment of admitted ≥ 95 %,
  REALTIME goodput ≥ 90 % of its value at 1x, no error but refusals carrying ``RetryInfo``
  (no failed, timed-out or cut-off request), refusal p99 ≤ 10 ms: over every refusal of the
  level, whatever its class (:func:`refusals`).
- Capacity at SLO (the overload benchmark's search: the highest offered rate at which ≥ 95 %
  of all requests meet the SLO) on each scenario with the default settings, and on the same
  scenario under the original scenario's terms before the inter-token guard (the node capped
  at 16 sequences as ``make bench`` runs it, no guard): the default settings must not fall
  below that (the guard must not buy safety by idling the node).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.load.records import OUTCOME_REFUSED, SLO, RequestRecord, summarize
from bench.stats import percentile

ATTAINMENT_TARGET = 0.95
GOODPUT_TARGET = 0.9
REFUSAL_P99_TARGET_S = 0.010
OVERLOAD_MULTIPLES = (2.0, 4.0)


def class_figures(records: Sequence[RequestRecord], slo: SLO, window_s: float) -> dict[str, Any]:
    """One class's requests in one run: :func:`bench.load.records.summarize`'s counts, with
    the SLO attainment of the admitted (refused requests never meet the SLO, so those that
    met it are all admitted)."""
    summary = summarize(records, duration_s=window_s, elapsed_s=window_s, slo=slo)
    admitted = summary["requests"] - summary["refused"]
    kept = (
        "requests", "goodput_rps", "refused", "refused_without_retryinfo", "errors",
        "unfinished", "ttft_p99_s", "tpot_p99_s",
    )  # fmt: skip
    return {
        **{k: summary[k] for k in kept},
        "admitted": admitted,
        "met_slo": summary["meeting_slo"],
        "attainment_admitted": summary["meeting_slo"] / admitted if admitted else None,
        "refusal_p99_s": summary["refusal_p99_s"] if summary["refused"] else None,
    }


def by_class(
    records: Sequence[RequestRecord], slo: SLO, window_s: float
) -> dict[str, dict[str, Any]]:
    """:func:`class_figures` of each class present."""
    classes = sorted({r.workload_class for r in records})
    return {
        c: class_figures([r for r in records if r.workload_class == c], slo, window_s)
        for c in classes
    }


def refusals(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """A level's refusals, all classes together: how many, and the p99 of their latency (None
    without any). The figure is the system's, not a class's: a class with a dozen refusals has
    its largest for a p99 (docs/decisions/bench-slo-refusals-pooled.md)."""
    times = [r.e2e_s for r in records if r.outcome == OUTCOME_REFUSED and r.e2e_s is not None]
    return {"count": len(times), "p99_s": percentile(times, 99) if times else None}


def level_verdict(level: Mapping[str, Any], one_x: Mapping[str, Any] | None) -> dict[str, Any]:
    """The targets at an overload level (``level['classes']``, ``level['refusals']``) against the
    level at 1x."""
    classes = level["classes"]
    rt = classes.get("realtime", {})
    base = (one_x or {}).get("classes", {}).get("realtime", {})
    attainment = rt.get("attainment_admitted")
    goodput = rt.get("goodput_rps")
    base_goodput = base.get("goodput_rps")
    goodput_ratio = goodput / base_goodput if goodput is not None and base_goodput else None
    errors = sum(c["errors"] + c["unfinished"] for c in classes.values())
    no_retry = sum(c["refused_without_retryinfo"] for c in classes.values())
    refusal_p99 = level["refusals"]["p99_s"]
    checks = {
        "realtime_attainment_admitted": (
            attainment,
            attainment is not None and attainment >= ATTAINMENT_TARGET,
        ),
        "realtime_goodput_vs_1x": (
            goodput_ratio,
            goodput_ratio is not None and goodput_ratio >= GOODPUT_TARGET,
        ),
        "errors_besides_refusals": (errors, errors == 0),
        "refused_without_retryinfo": (no_retry, no_retry == 0),
        "refusal_p99_s": (
            refusal_p99,
            refusal_p99 is None or refusal_p99 <= REFUSAL_P99_TARGET_S,
        ),
    }
    return {
        "checks": {k: {"value": v, "pass": ok} for k, (v, ok) in checks.items()},
        "pass": all(ok for _, ok in checks.values()),
    }


def capacity_verdict(capacity: float, reference: float | None) -> dict[str, Any]:
    """A scenario's capacity at SLO with the default settings against the same scenario's
    under the terms before the guard."""
    return {
        "capacity_rps": capacity,
        "reference_rps": reference,
        "ratio": capacity / reference if reference else None,
        "pass": capacity > 0 and reference is not None and capacity >= reference,
    }
