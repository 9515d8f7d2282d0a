"""Definitions of ``make bench-slo``'s figures (issue 20, "any workload, default settings"),
pure so they are tested without servers.

- *Admitted*: a request not refused (``RESOURCE_EXHAUSTED``). *SLO attainment of admitted*:
  those that finished within the scenario's SLO (TTFT, and mean time per output token for a
  generation; latency for an ``Embed``) over the admitted, per class.
- *Goodput* of a class: its requests that met the SLO per second of the arrival window.
- At 2x and 4x the scenario's capacity at SLO: REALTIME attainment of admitted ≥ 95 %,
  REALTIME goodput ≥ 90 % of its value at 1x, no error but refusals carrying ``RetryInfo``
  (no failed, timed-out or cut-off request), refusal p99 ≤ 10 ms.
- Capacity at SLO (the overload benchmark's search: the highest offered rate at which ≥ 95 %
  of all requests meet the SLO) on each scenario with the default settings, and on the same
  scenario under the original scenario's terms before the inter-token guard (the node capped
  at 16 sequences as ``make bench`` runs it, no guard): the default settings must not fall
  below that (the guard must not buy safety by idling the node).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.load.records import OUTCOME_ERROR, OUTCOME_REFUSED, RequestRecord
from bench.stats import percentile

ATTAINMENT_TARGET = 0.95
GOODPUT_TARGET = 0.9
REFUSAL_P99_TARGET_S = 0.010
OVERLOAD_MULTIPLES = (2.0, 4.0)


def class_figures(
    records: Sequence[RequestRecord], meets: Callable[[RequestRecord], bool], window_s: float
) -> dict[str, Any]:
    """One class's requests in one run."""
    refused = [r for r in records if r.outcome == OUTCOME_REFUSED]
    admitted = [r for r in records if r.outcome != OUTCOME_REFUSED]
    good = [r for r in admitted if meets(r)]
    return {
        "requests": len(records),
        "admitted": len(admitted),
        "met_slo": len(good),
        "attainment_admitted": len(good) / len(admitted) if admitted else None,
        "goodput_rps": len(good) / window_s if window_s > 0 else 0.0,
        "refused": len(refused),
        "refused_without_retryinfo": sum(r.retry_after_s is None for r in refused),
        "refusal_p99_s": percentile([r.e2e_s for r in refused if r.e2e_s is not None], 99)
        if refused
        else None,
        "errors": sum(r.outcome == OUTCOME_ERROR for r in records),
        "unfinished": sum(r.outcome not in (OUTCOME_REFUSED, OUTCOME_ERROR, "ok") for r in records),
        "ttft_p99_s": percentile([r.ttft_s for r in admitted if r.ttft_s is not None], 99)
        if admitted
        else None,
        "tpot_p99_s": percentile([r.tpot_s for r in admitted if r.tpot_s is not None], 99)
        if any(r.tpot_s is not None for r in admitted)
        else None,
    }


def by_class(
    records: Sequence[RequestRecord], meets: Callable[[RequestRecord], bool], window_s: float
) -> dict[str, dict[str, Any]]:
    """:func:`class_figures` of each class present."""
    classes = sorted({r.workload_class for r in records})
    return {
        c: class_figures([r for r in records if r.workload_class == c], meets, window_s)
        for c in classes
    }


def level_verdict(level: Mapping[str, Any], one_x: Mapping[str, Any] | None) -> dict[str, Any]:
    """The targets at an overload level (``level['classes']``) against the level at 1x."""
    classes = level["classes"]
    rt = classes.get("realtime", {})
    base = (one_x or {}).get("classes", {}).get("realtime", {})
    attainment = rt.get("attainment_admitted")
    goodput = rt.get("goodput_rps")
    base_goodput = base.get("goodput_rps")
    goodput_ratio = goodput / base_goodput if goodput is not None and base_goodput else None
    errors = sum(c["errors"] + c["unfinished"] for c in classes.values())
    no_retry = sum(c["refused_without_retryinfo"] for c in classes.values())
    refusal_p99 = max(
        (c["refusal_p99_s"] for c in classes.values() if c["refusal_p99_s"] is not None),
        default=None,
    )
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
