"""What a load run records per request, and its summaries: SLO goodput, latency percentiles and
weighted fairness (pure, no I/O; the arithmetic is :mod:`bench.stats`).

Every function takes plain :class:`RequestRecord` values, so the summaries are tested on
synthetic traces with known answers. Conventions, stated once:

* A request *meets the SLO* when it finished with status ``OK``, its time to first token is at
  most ``SLO.ttft_s`` and its mean time per output token at most ``SLO.tpot_s`` (a request with
  one output token has no TPOT and passes that half). An Embed has no tokens: its answer is
  its first (and last) output, so its TTFT and end-to-end latency are both the answer's
  latency, and it meets the SLO when it answers ``OK`` within ``SLO.embed_s``.
* TTFT and end-to-end percentiles cover requests that finished, timed out or were cut off
  (refusals and other errors are counted on their own). A request that never received a token
  counts with the time it waited (a lower bound of its true TTFT), so a server that lets
  requests time out in its queue cannot look fast by leaving them out.
* Rates divide by the run's ``duration_s`` (the arrival window) for goodput and by its
  ``elapsed_s`` (first send to last answer) for output tokens per second.
* Fairness is Jain's index over tenants of ``served_i / fair_i``, where ``fair_i`` is tenant
  *i*'s weighted max-min fair share of everything served (weights, capped by each tenant's
  demand). When every tenant is backlogged this is Jain's index on weight-normalised shares;
  a tenant asking for less than its weight entitles it to is judged against what it asked.
  Work is tokens: a Generate's output tokens, an Embed's tokens read (what the scheduler's
  fair queuing charges it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.stats import fairness, percentile

OK = "OK"
OUTCOME_OK = "ok"
OUTCOME_REFUSED = "refused"  # RESOURCE_EXHAUSTED: the server said no (or later)
OUTCOME_TIMED_OUT = "timed_out"  # DEADLINE_EXCEEDED: the request's own deadline passed
OUTCOME_ERROR = "error"  # any other failure
OUTCOME_CUT_OFF = "cut_off"  # still running when the run's hard stop came; cancelled by us
OUTCOMES: tuple[str, ...] = (
    OUTCOME_OK,
    OUTCOME_REFUSED,
    OUTCOME_TIMED_OUT,
    OUTCOME_ERROR,
    OUTCOME_CUT_OFF,
)


_WAITED = frozenset({OUTCOME_OK, OUTCOME_TIMED_OUT, OUTCOME_CUT_OFF})
KIND_EMBED = "embed"


@dataclass(frozen=True)
class SLO:
    """The service level a request must meet to count towards goodput."""

    ttft_s: float = 2.0
    """Most seconds from send to the first output token."""
    tpot_s: float = 0.25
    """Most mean seconds per output token after the first."""
    embed_s: float = 0.5
    """Most seconds from send to an Embed's answer."""

    def first_output_s(self, record: RequestRecord) -> float:
        """The bound on the record's TTFT: ``ttft_s``, or ``embed_s`` for an Embed."""
        return self.embed_s if record.kind == KIND_EMBED else self.ttft_s


@dataclass(frozen=True)
class RequestRecord:
    """What one request of a load run measured (times in seconds from the run's start)."""

    index: int
    tenant: str
    workload_class: str
    """Class name: ``realtime``, ``batch`` or ``finetune``."""
    scheduled_s: float
    """When the arrival process scheduled the send."""
    sent_s: float | None
    """When it was actually sent (None: never sent before the hard stop)."""
    ttft_s: float | None
    """Send to first output token; None when no token arrived."""
    tpot_s: float | None
    """Mean time per output token after the first; None with fewer than two tokens."""
    e2e_s: float | None
    """Send to the end of the stream (answer, error or cut-off)."""
    output_tokens: int
    requested_tokens: int
    prompt_tokens: int | None
    status: str
    """``OK`` or the gRPC status code name; ``CANCELLED`` for a cut-off request."""
    outcome: str
    """One of :data:`OUTCOMES`."""
    reason: str = ""
    """``ErrorInfo.reason`` of a failed request."""
    retry_after_s: float | None = None
    """``RetryInfo`` delay of a failed request, when it carried one."""
    details: str = ""
    """The status message of a failed request."""
    finish_reason: str = ""
    """Finish reason of the last chunk (``LENGTH``, ``EOS``, ...), empty without one."""
    kind: str = "generate"
    """``generate`` or ``embed``."""

    @property
    def finished(self) -> bool:
        """Whether the stream ended with status ``OK``."""
        return self.outcome == OUTCOME_OK

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object (with ``finished`` spelled out)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["finished"] = self.finished
        return data


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """Whether ``record`` finished OK within the TTFT and TPOT bounds (an Embed: answered
    within ``slo.embed_s``)."""
    if record.outcome != OUTCOME_OK or record.ttft_s is None:
        return False
    if record.ttft_s > slo.first_output_s(record):
        return False
    return record.tpot_s is None or record.tpot_s <= slo.tpot_s


def waited_ttft(record: RequestRecord) -> float | None:
    """TTFT for percentiles: the real one, else the time waited without a token."""
    if record.ttft_s is not None:
        return record.ttft_s
    return record.e2e_s


def slo_attainment(records: Sequence[RequestRecord], slo: SLO) -> float:
    """Share of ``records`` meeting the SLO; 1.0 for no records."""
    if not records:
        return 1.0
    return sum(meets_slo(r, slo) for r in records) / len(records)


def summarize(
    records: Sequence[RequestRecord], *, duration_s: float, elapsed_s: float, slo: SLO
) -> dict[str, Any]:
    """Counts, latencies and rates of one group of requests (a tenant, a class or all)."""
    served = [r for r in records if r.outcome in _WAITED]
    refused = [r for r in records if r.outcome == OUTCOME_REFUSED]
    good = sum(meets_slo(r, slo) for r in records)
    ttfts = [t for r in served if (t := waited_ttft(r)) is not None]
    e2es = [r.e2e_s for r in served if r.e2e_s is not None]
    tpots = [r.tpot_s for r in records if r.outcome == OUTCOME_OK and r.tpot_s is not None]
    counts = {o: sum(r.outcome == o for r in records) for o in OUTCOMES}
    finished = [r for r in records if r.outcome == OUTCOME_OK]
    return {
        "requests": len(records),
        "meeting_slo": good,
        "ttft_slo_misses": sum(
            r.ttft_s is None or r.ttft_s > slo.first_output_s(r) for r in finished
        ),
        "tpot_slo_misses": sum(r.tpot_s is not None and r.tpot_s > slo.tpot_s for r in finished),
        "slo_attainment": slo_attainment(records, slo),
        "goodput_rps": good / duration_s if duration_s > 0 else 0.0,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p99_s": percentile(tpots, 99),
        "e2e_p99_s": percentile(e2es, 99),
        "output_tokens": sum(r.output_tokens for r in records),
        "output_tokens_per_s": (
            sum(r.output_tokens for r in records) / elapsed_s if elapsed_s > 0 else 0.0
        ),
        "refused": counts[OUTCOME_REFUSED],
        "refusal_p99_s": percentile((r.e2e_s for r in refused if r.e2e_s is not None), 99),
        "refused_without_retryinfo": sum(r.retry_after_s is None for r in refused),
        "errors": counts[OUTCOME_ERROR],
        "timed_out": counts[OUTCOME_TIMED_OUT],
        "cut_off": counts[OUTCOME_CUT_OFF],
        "unfinished": counts[OUTCOME_TIMED_OUT] + counts[OUTCOME_CUT_OFF],
        "finished": counts[OUTCOME_OK],
    }


def tenant_fairness(
    records: Sequence[RequestRecord], weights: Mapping[str, float]
) -> dict[str, float]:
    """Fairness within each workload class that has two or more tenants, plus ``all``.

    Work is tokens (see the module docstring): served is what finished requests delivered,
    demand is what every launched request asked for. Classes are compared separately because
    across classes priority, not weight, decides; ``all`` ignores classes.
    """
    result: dict[str, float] = {}
    classes = sorted({r.workload_class for r in records})
    groups = {c: [r for r in records if r.workload_class == c] for c in classes}
    groups["all"] = list(records)
    for name, group in groups.items():
        tenants = sorted({r.tenant for r in group})
        if len(tenants) < 2:
            continue
        served = {t: 0.0 for t in tenants}
        demand = {t: 0.0 for t in tenants}
        for r in group:
            demand[r.tenant] += r.requested_tokens
            if r.outcome == OUTCOME_OK:
                served[r.tenant] += r.requested_tokens if r.kind == KIND_EMBED else r.output_tokens
        result[name] = fairness(served, demand, {t: weights.get(t, 1.0) for t in tenants})
    return result


def headline_fairness(by_class: Mapping[str, float]) -> float:
    """The worst within-class index (1.0 when no class has two tenants)."""
    within = [v for k, v in by_class.items() if k != "all"]
    return min(within) if within else 1.0
