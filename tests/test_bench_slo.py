"""``make bench-slo``'s pure pieces: the autoscaling signals' bins and scores, the per-class
figures and verdicts, the report. The benchmark itself (real suites under load) is not part of
``make test``."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from bench.jobs.metrics import parse, scrape
from bench.load.records import OUTCOME_OK, OUTCOME_REFUSED, SLO, RequestRecord
from bench.slo.figures import by_class, capacity_verdict, level_verdict, refusals
from bench.slo.report import markdown
from bench.slo.signals import (
    SAMPLED,
    auc,
    best_threshold,
    bins,
    ranks,
    score_signals,
    spearman,
)
from scheduler.metrics import SchedulerMetrics


def record(
    i: int,
    sent: float,
    outcome: str = OUTCOME_OK,
    ttft: float | None = 0.2,
    cls: str = "realtime",
    retry: float | None = 0.5,
    e2e: float = 1.0,
) -> RequestRecord:
    return RequestRecord(
        index=i,
        tenant="A",
        workload_class=cls,
        scheduled_s=sent,
        sent_s=sent,
        ttft_s=ttft if outcome == OUTCOME_OK else None,
        tpot_s=0.05 if outcome == OUTCOME_OK else None,
        e2e_s=e2e,
        output_tokens=10 if outcome == OUTCOME_OK else 0,
        requested_tokens=10,
        prompt_tokens=5,
        status="OK" if outcome == OUTCOME_OK else "RESOURCE_EXHAUSTED",
        outcome=outcome,
        retry_after_s=retry if outcome == OUTCOME_REFUSED else None,
    )


def meets(r: RequestRecord) -> bool:
    return r.outcome == OUTCOME_OK and r.ttft_s is not None and r.ttft_s <= 2.0


def metrics(wait_sum: float, wait_count: float, tokens: float, queued: float) -> str:
    return (
        "sluice_scheduler_predicted_queue_wait_seconds_sum"
        f'{{workload_class="realtime"}} {wait_sum}\n'
        "sluice_scheduler_predicted_queue_wait_seconds_count"
        f'{{workload_class="realtime"}} {wait_count}\n'
        f'sluice_scheduler_node_tokens_in_flight{{node="n1"}} {tokens}\n'
        f'sluice_scheduler_node_tokens_in_flight{{node="n2"}} {tokens}\n'
        f'sluice_scheduler_node_sequences{{node="n1"}} 4\n'
        f'sluice_scheduler_node_sequences{{node="n2"}} 2\n'
        f'sluice_scheduler_queue_depth{{workload_class="realtime",tenant="A"}} {queued}\n'
    )


def test_ranks_spearman_and_auc() -> None:
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    assert auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auc([0.5, 0.5], [False, True]) == 0.5
    assert auc([1.0], [True]) is None
    cut = best_threshold([0.1, 0.2, 0.8, 0.9, 0.3], [False, False, True, True, True])
    assert cut == {"value": 0.3, "j": 1.0, "tpr": 1.0, "fpr": 0.0}
    assert best_threshold([0.1], [False]) is None


def test_bins_read_each_signal_and_the_realtime_share_not_served_in_slo() -> None:
    """Two 5-s bins: the first calm, the second with a refusal and a late answer; the
    predicted wait is the increase of sum over count within the bin, gauges are per node."""
    start = 1000.0
    points = [
        (start - 0.5, parse(metrics(0.0, 0, 0, 0))),
        (start + 2.0, parse(metrics(0.1, 10, 40, 0))),
        (start + 4.0, parse(metrics(0.2, 20, 60, 0))),
        (start + 7.0, parse(metrics(4.2, 30, 300, 12))),
    ]
    records = [
        record(0, 1.0),
        record(1, 3.0),
        record(2, 6.0, OUTCOME_REFUSED),
        record(3, 7.0, ttft=3.0),
        record(4, 8.0),
        record(5, 8.5),
        record(6, 9.0, cls="batch", ttft=9.0),
    ]
    out = bins(points, records, start, 10.0, meets)
    assert [b["realtime"] for b in out] == [2, 4]
    assert [b["bad_share"] for b in out] == [0.0, 0.5]
    calm, loaded = out
    assert calm["predicted_wait_s"] == pytest.approx(0.2 / 20)
    assert loaded["predicted_wait_s"] == pytest.approx(4.0 / 10)
    assert calm["tokens_in_flight"] == pytest.approx(50.0)  # mean of 40 and 60, per node
    assert calm["sequences"] == pytest.approx(3.0) and loaded["queue_depth"] == 12
    scores = score_signals(out * 2, risk_share=0.05)
    assert scores["predicted_wait_s"]["auc"] == 1.0 and scores["queue_depth"]["bins"] == 4


def test_class_figures_count_admitted_requests_and_refusals() -> None:
    records = [record(i, float(i)) for i in range(18)]
    records += [record(18, 18.0, ttft=5.0), record(19, 19.0, OUTCOME_REFUSED, e2e=0.004)]
    records += [record(20, 20.0, OUTCOME_REFUSED, retry=None, e2e=0.02)]
    figures = by_class(records, SLO(), 10.0)["realtime"]
    assert figures["admitted"] == 19 and figures["met_slo"] == 18
    assert figures["attainment_admitted"] == pytest.approx(18 / 19)
    assert figures["refused"] == 2 and figures["refused_without_retryinfo"] == 1
    assert figures["goodput_rps"] == pytest.approx(1.8)
    assert figures["errors"] == 0 and figures["unfinished"] == 0


def test_a_levels_refusal_p99_is_over_every_refusal_whatever_its_class() -> None:
    """Twelve REALTIME refusals, one of them slow, beside a hundred fast BATCH ones: the
    class's own p99 is about its slowest; the level's is the p99 of all 112."""
    records = [record(i, 0.0, OUTCOME_REFUSED, e2e=0.003) for i in range(11)]
    records += [record(11, 0.0, OUTCOME_REFUSED, e2e=0.030)]
    records += [record(12 + i, 0.0, OUTCOME_REFUSED, cls="batch", e2e=0.004) for i in range(100)]
    records += [record(200, 0.0)]  # answered: not a refusal
    assert by_class(records, SLO(), 10.0)["realtime"]["refusal_p99_s"] > 0.02
    pooled = refusals(records)
    assert pooled["count"] == 112 and pooled["p99_s"] == pytest.approx(0.004)
    assert refusals([record(0, 0.0)]) == {"count": 0, "p99_s": None}


def _level(attainment: float, goodput: float, refusal_p99: float | None) -> dict[str, Any]:
    rt = {
        "attainment_admitted": attainment,
        "goodput_rps": goodput,
        "errors": 0,
        "unfinished": 0,
        "refused_without_retryinfo": 0,
        "refusal_p99_s": refusal_p99,
    }
    batch = {**rt, "attainment_admitted": 0.2}
    return {
        "label": "2x capacity",
        "offered_rps": 3.0,
        "classes": {"realtime": rt, "batch": batch},
        "refusals": {"count": 0 if refusal_p99 is None else 40, "p99_s": refusal_p99},
    }


def test_level_verdicts_follow_the_targets() -> None:
    one_x = _level(0.99, 1.0, None)
    assert level_verdict(_level(0.96, 0.95, 0.008), one_x)["pass"]
    failed = level_verdict(_level(0.90, 0.85, 0.012), one_x)
    assert not failed["pass"]
    assert {k for k, c in failed["checks"].items() if not c["pass"]} == {
        "realtime_attainment_admitted",
        "realtime_goodput_vs_1x",
        "refusal_p99_s",
    }
    # The level's refusals decide, not the worst class's: a slow class p99 over a pooled 8 ms
    slow_class = _level(0.96, 0.95, 0.008)
    slow_class["classes"]["realtime"]["refusal_p99_s"] = 0.030
    assert level_verdict(slow_class, one_x)["checks"]["refusal_p99_s"] == {
        "value": 0.008,
        "pass": True,
    }
    assert capacity_verdict(1.8, 1.6)["pass"] and not capacity_verdict(1.2, 1.6)["pass"]
    assert not capacity_verdict(1.2, None)["pass"]
    assert not capacity_verdict(0.0, 0.0)["pass"]  # nothing met the SLO on either


def test_the_report_has_a_row_per_figure_and_the_signal_table() -> None:
    one_x = _level(0.99, 1.0, None)
    two_x = {**_level(0.97, 1.0, 0.005), "verdict": level_verdict(_level(0.97, 1.0, 0.005), one_x)}
    for level in (one_x, two_x):
        for c in level["classes"].values():
            c.update(requests=10, admitted=9, refused=1, ttft_p99_s=0.4, tpot_p99_s=None)
    entry = {
        "scenario": "chat-longtail",
        "reference": {"capacity_rps": 1.0, "search": []},
        "capacity_rps": 1.2,
        "search": [{"offered_rps": 1.2, "attainment": 0.97, "passed": True}],
        "levels": [one_x, two_x],
        "capacity": capacity_verdict(1.2, 1.0),
    }
    doc = {
        "generated_at": "now",
        "wall_s": 1.0,
        "scenarios": [entry],
        "signals": score_signals([]),
    }
    pooled = [level.pop("refusals") for level in (one_x, two_x)]
    older = markdown(doc)  # an slo.json from before the pooled figure (``--rescore``)
    for level, kept in zip((one_x, two_x), pooled, strict=True):
        level["refusals"] = kept
    assert "refusal_p99_s | 5.0 ms |" in older and "runs on" not in older
    doc.update(client_loop="uvloop", refusal_p99_over="level")
    text = markdown(doc)
    assert "| chat-longtail | capacity at SLO" in text and "1.20×" in text
    assert text.count("| chat-longtail | 2x capacity") == 5
    assert "| predicted_wait_s | 0 | 0 | – | – | – |" in text
    assert "refusal_p99_s | 5.0 ms (40 refusals) |" in text and "runs on uvloop" in text


def test_the_sampler_asks_the_server_for_its_signals_only() -> None:
    """A real exposition server (the scheduler's kind) answers a scrape naming its samples
    with those alone, a histogram's ``_count`` and ``_sum`` included."""
    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    metrics.predicted_wait.labels("realtime").observe(0.5)
    metrics.ttft.labels("realtime").observe(0.5)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        every = scrape(address)
        only = scrape(address, names=SAMPLED)
    finally:
        server.shutdown()
        thread.join(5)
    assert every is not None and only is not None
    assert {name for name, _ in only} == {
        "sluice_scheduler_predicted_queue_wait_seconds_count",
        "sluice_scheduler_predicted_queue_wait_seconds_sum",
    }
    assert only.items() <= every.items() and len(every) > 10 * len(only)
