"""The jobs benchmark's figures, computed from what a run recorded (pure functions, tested on
synthetic values).

Definitions:

- *exactly once*: every line's ``custom_id`` has one result, read two ways: all results page by
  page (none missing, none unexpected, none repeated) and each ``custom_id`` asked for by name
  (one result each).
- *computed more than once*: a job line is a detached generation on its node, so a line
  whose replica dies mid-line runs to its end there, and the replica that takes the line over
  attaches to it (``reattached``) instead of generating it again. Computed more than once are
  the lines the schedulers counted ``duplicate`` (computed again after another worker had
  stored its result) plus those counted ``regenerated`` (taken over after a node had started
  them, and generated again because that node no longer had them); each replica's counters are
  summed over its incarnations (the last read of each process, read right before each kill),
  ``regenerated`` also counted from the schedulers' logs (``job_line_regenerated``, which
  survive a kill) and the larger taken; and the figure is the larger of that and the nodes'
  *extra generations* below, which see any line generated to its end twice, counted or not.
  Lines ``reclaimed`` that no node had started (queued in the dead replica) were computed
  once. Reclaimed and reattached lines are reported. Target: at most 1 % of the lines.
- *extra generations* (a cross-check from the other side): generations the nodes completed
  (sent their final chunk: ``sluice_node_requests_total``, any finish reason) beyond one per
  line with a generated result, i.e. lines computed to the end more than once. It sees work
  redone for any reason (a result lost with Redis's last second of writes included).
- *TTFT p99*: of the REALTIME requests that arrived in the phase, as :mod:`bench.load.records`
  counts it (a request without a token counts with the time it waited).
- *inter-token p99*: the gaps between consecutive chunks of a stream, each spread evenly over
  the tokens of the later chunk (a chunk of 3 tokens after 60 ms: three gaps of 20 ms).
- *node tokens/s*: the nodes' ``sluice_node_generated_tokens_total`` (both nodes), increase
  over the phase's arrival window divided by its length.
- *prediction error*: ``(predicted - actual) / actual`` of the durations from submission to the
  predicted completion (``Job.predicted_completion_unix_ms`` in the submit's answer) and to
  ``finished_at``: positive when the job finished earlier than predicted. Target: within 25 %.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.stats import percentile

RECOMPUTED_TARGET = 0.01
TTFT_RATIO_TARGET = 1.2
THROUGHPUT_SHARE_TARGET = 0.9
REFUSAL_TARGET_S = 0.05
PREDICTION_TARGET = 0.25


@dataclass(frozen=True)
class ResultRow:
    """What a read result says, for the checks (``custom_id``, an error, its deliveries)."""

    custom_id: str
    error: bool = False
    deliveries: int = 1


def exactly_once(
    expected: Sequence[str], paged: Sequence[ResultRow], by_id: Sequence[ResultRow]
) -> dict[str, Any]:
    """Every ``custom_id`` of ``expected`` has exactly one result (see the module docstring)."""
    wanted = set(expected)
    seen = Counter(r.custom_id for r in paged)
    named = Counter(r.custom_id for r in by_id)
    figures = {
        "lines": len(expected),
        "results_read": len(paged),
        "distinct": len(seen),
        "missing": len(wanted - set(seen)),
        "unexpected": len(set(seen) - wanted),
        "repeated": sum(n - 1 for n in seen.values() if n > 1),
        "by_id_one_each": sum(named[c] == 1 for c in wanted),
        "errors": sum(r.error for r in paged),
        "delivered_more_than_once": sum(r.deliveries > 1 for r in paged),
    }
    figures["exactly_once"] = (
        figures["missing"] == 0
        and figures["unexpected"] == 0
        and figures["repeated"] == 0
        and figures["by_id_one_each"] == len(wanted)
    )
    return figures


def recomputed(
    lines: int,
    duplicate: float,
    regenerated: tuple[float, int],
    reclaimed: tuple[float, int],
    reattached: float,
    node_extra: int | None,
) -> dict[str, Any]:
    """Lines computed more than once (see the module docstring), and their share of
    ``lines``. ``regenerated`` and ``reclaimed``: (the metrics' count, the logs' count)."""
    regen = max(int(regenerated[0]), regenerated[1])
    counted = int(duplicate) + regen
    count = max(counted, node_extra or 0)
    share = count / lines if lines else 0.0
    return {
        "duplicate": int(duplicate),
        "regenerated": regen,
        "node_extra": node_extra,
        "reclaimed": max(int(reclaimed[0]), reclaimed[1]),
        "reattached": int(reattached),
        "count": count,
        "share": round(share, 4),
        "target_share": RECOMPUTED_TARGET,
        "pass": share <= RECOMPUTED_TARGET,
    }


def inter_token_gaps(chunks: Iterable[tuple[float, int]]) -> list[float]:
    """Per-token gaps of one stream from its ``(arrival time, tokens)`` chunks."""
    gaps: list[float] = []
    last: float | None = None
    for at, tokens in chunks:
        if tokens <= 0:
            continue
        if last is not None:
            gaps += [(at - last) / tokens] * tokens
        last = at
    return gaps


def rate(before: float | None, after: float | None, seconds: float) -> float | None:
    """Increase per second of a counter; None when a read is missing or it went down."""
    if before is None or after is None or seconds <= 0 or after < before:
        return None
    return (after - before) / seconds


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is missing or the baseline is 0."""
    if value is None or baseline is None or baseline == 0 or math.isnan(baseline):
        return None
    return value / baseline


def latency(ttfts: Sequence[float], gaps: Sequence[float]) -> dict[str, float]:
    """TTFT and inter-token percentiles (seconds)."""
    return {
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "inter_token_p50_s": percentile(gaps, 50),
        "inter_token_p99_s": percentile(gaps, 99),
    }


def gaps_verdict(
    ttft_with: float, ttft_without: float, tokens_with: float | None, saturated: float | None
) -> dict[str, Any]:
    """The two targets of "gaps filled, real time untouched"."""
    ttft_ratio = ratio(ttft_with, ttft_without)
    share = ratio(tokens_with, saturated)
    return {
        "ttft_ratio": ttft_ratio,
        "ttft_pass": ttft_ratio is not None and ttft_ratio <= TTFT_RATIO_TARGET,
        "throughput_share": share,
        "throughput_pass": share is not None and share >= THROUGHPUT_SHARE_TARGET,
    }


def prediction_error(created_ms: int, predicted_ms: int, finished_ms: int) -> float | None:
    """``(predicted - actual) / actual`` of the durations from submission; None without a
    prediction or a finish."""
    actual = finished_ms - created_ms
    if predicted_ms <= 0 or finished_ms <= 0 or actual <= 0:
        return None
    return ((predicted_ms - created_ms) - actual) / actual


def finished_before(finish_times_ms: Sequence[int], moment_ms: int | None) -> int:
    """How many of the lines finished (result written) before ``moment_ms``."""
    if moment_ms is None:
        return 0
    return sum(t < moment_ms for t in finish_times_ms)


def refusal_verdict(refusals: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every infeasible submit refused RESOURCE_EXHAUSTED with RetryInfo within 50 ms."""
    times = [r["elapsed_s"] for r in refusals]
    ok = [
        r["code"] == "RESOURCE_EXHAUSTED"
        and r["retry_after_s"] is not None
        and r["elapsed_s"] <= REFUSAL_TARGET_S
        for r in refusals
    ]
    return {
        "attempts": len(refusals),
        "refused_with_retry_info": sum(
            r["code"] == "RESOURCE_EXHAUSTED" and r["retry_after_s"] is not None for r in refusals
        ),
        "p50_s": percentile(times, 50),
        "max_s": max(times, default=0.0),
        "pass": bool(refusals) and all(ok),
    }
