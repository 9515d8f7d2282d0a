"""The jobs benchmark (``python -m bench.jobs``): its pure pieces — the figures from synthetic
values worked out by hand, the Prometheus reader and the counters of restarted processes, the
report's rows and table, the schedulers' settings as flags. ``make bench-jobs`` (the
real experiments) is not part of the tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from bench.jobs.figures import (
    ResultRow,
    exactly_once,
    finished_before,
    gaps_verdict,
    inter_token_gaps,
    latency,
    prediction_error,
    rate,
    ratio,
    recomputed,
    refusal_verdict,
)
from bench.jobs.gaps import GapsOptions, realtime_scenario
from bench.jobs.logs import count_between, errors, job_events, runs
from bench.jobs.metrics import IncarnationCounters, parse, total
from bench.jobs.report import markdown, rows, table
from bench.jobs.suite import JobSettings, with_flags
from bench.load.scenario import plan_requests

METRICS = """\
# HELP sluice_scheduler_job_lines_total Job lines this replica handled.
# TYPE sluice_scheduler_job_lines_total counter
sluice_scheduler_job_lines_total{outcome="completed"} 120.0
sluice_scheduler_job_lines_total{outcome="duplicate"} 2.0
sluice_scheduler_job_lines_total{outcome="reclaimed"} 5.0
sluice_scheduler_job_lines_in_flight 7.0
sluice_node_requests_total{finish_reason="length",model="tiny-random-llama"} 40.0
sluice_node_requests_total{finish_reason="cancelled",model="tiny-random-llama"} 3.0
not a sample
"""


def test_parse_reads_samples_and_total_sums_over_labels() -> None:
    """Samples by name and labels; ``total`` sums those whose labels include the asked ones;
    comments and broken lines are skipped."""
    samples = parse(METRICS)
    assert total(samples, "sluice_scheduler_job_lines_total", outcome="duplicate") == 2.0
    assert total(samples, "sluice_scheduler_job_lines_total") == 127.0
    assert total(samples, "sluice_scheduler_job_lines_in_flight") == 7.0
    assert total(samples, "sluice_node_requests_total", model="tiny-random-llama") == 43.0
    assert total(samples, "sluice_missing_total") == 0.0


def test_incarnation_counters_keep_what_a_killed_process_counted() -> None:
    """A restarted process counts from zero again: its incarnations' last reads are summed,
    and a later read of the same incarnation replaces its earlier one."""
    book = IncarnationCounters()
    book.observe("scheduler", 100, {"reclaimed": 3.0})
    book.observe("scheduler", 100, {"reclaimed": 4.0})
    book.observe("scheduler", 200, {"reclaimed": 1.0, "duplicate": 2.0})
    book.observe("scheduler-2", 300, {"reclaimed": 10.0})
    assert book.total("reclaimed") == 15.0
    assert book.total("duplicate") == 2.0
    assert book.incarnations("scheduler") == 2


def test_exactly_once_passes_only_when_every_id_has_one_result() -> None:
    """All present once, read both ways: exactly once; a missing id, a repeated one or an
    unexpected one each fail it and are counted."""
    ids = ["a", "b", "c"]
    rows_ = [ResultRow("a"), ResultRow("b", deliveries=2), ResultRow("c", error=True)]
    good = exactly_once(ids, rows_, rows_)
    assert good["exactly_once"]
    assert (good["errors"], good["delivered_more_than_once"]) == (1, 1)
    missing = exactly_once(ids, rows_[:2], rows_[:2])
    assert not missing["exactly_once"] and missing["missing"] == 1
    assert missing["by_id_one_each"] == 2
    repeated = exactly_once(ids, [*rows_, ResultRow("a")], rows_)
    assert not repeated["exactly_once"] and repeated["repeated"] == 1
    unexpected = exactly_once(ids, [*rows_, ResultRow("z")], rows_)
    assert not unexpected["exactly_once"] and unexpected["unexpected"] == 1


def test_recomputed_counts_regenerated_lines_and_the_nodes_extra_generations() -> None:
    """Duplicates plus regenerated lines (the logs' count when the metrics lost some), or the
    nodes' extra generations when larger; reattached lines are not recomputed. 20 of 2,000 is
    exactly the 1 % target, 21 is over."""
    at = recomputed(2000, 2, (15, 18), (60, 58), reattached=40, node_extra=12)
    assert (at["regenerated"], at["count"], at["share"], at["reclaimed"]) == (18, 20, 0.01, 60)
    assert at["pass"] and at["reattached"] == 40
    over = recomputed(2000, 0, (3, 0), (9, 9), reattached=6, node_extra=21)
    assert over["count"] == 21 and not over["pass"]
    unknown = recomputed(2000, 1, (2, 2), (5, 5), reattached=3, node_extra=None)
    assert unknown["count"] == 3


def test_inter_token_gaps_spread_a_chunk_over_its_tokens() -> None:
    """The first chunk opens the stream; a chunk of 3 tokens 60 ms after the previous gives
    three 20 ms gaps; chunks without tokens are skipped."""
    gaps = inter_token_gaps([(1.0, 1), (1.06, 3), (1.08, 0), (1.10, 1)])
    assert gaps == pytest.approx([0.02, 0.02, 0.02, 0.04])
    assert inter_token_gaps([(1.0, 2)]) == []


def test_rates_ratios_and_latency_percentiles() -> None:
    """A counter's increase per second (None when a read is missing or it went down); ratios
    need a non-zero baseline; p99 of 1..100 interpolated."""
    assert rate(100.0, 400.0, 10.0) == 30.0
    assert rate(None, 400.0, 10.0) is None
    assert rate(400.0, 100.0, 10.0) is None
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(3.0, 0.0) is None
    assert ratio(None, 2.0) is None
    figures = latency([float(i) for i in range(1, 101)], [0.01, 0.03])
    assert figures["ttft_p99_s"] == pytest.approx(99.01)
    assert figures["inter_token_p50_s"] == pytest.approx(0.02)


def test_gaps_verdict_holds_both_targets() -> None:
    """TTFT p99 at most 1.2x alone, node throughput with the job at least 90 % of saturated;
    exactly at a target passes."""
    met = gaps_verdict(1.2, 1.0, 900.0, 1000.0)
    assert met["ttft_pass"] and met["throughput_pass"]
    missed = gaps_verdict(1.3, 1.0, 899.0, 1000.0)
    assert not missed["ttft_pass"] and not missed["throughput_pass"]
    assert missed["ttft_ratio"] == pytest.approx(1.3)
    unknown = gaps_verdict(1.0, 1.0, None, 1000.0)
    assert unknown["throughput_share"] is None and not unknown["throughput_pass"]


def test_prediction_error_is_relative_to_the_actual_duration() -> None:
    """Predicted 12 s, took 10 s: +20 %; predicted 8 s: -20 %; no prediction or no finish:
    None."""
    assert prediction_error(1_000, 13_000, 11_000) == pytest.approx(0.2)
    assert prediction_error(1_000, 9_000, 11_000) == pytest.approx(-0.2)
    assert prediction_error(1_000, 0, 11_000) is None
    assert prediction_error(1_000, 9_000, 0) is None


def test_finished_before_counts_lines_done_before_a_moment() -> None:
    """Lines whose result was written strictly before the moment; none without one."""
    assert finished_before([1, 5, 9, 10], 10) == 3
    assert finished_before([1, 5], None) == 0


def test_refusal_verdict_needs_retry_info_and_50_ms_on_every_submit() -> None:
    """Every submit refused RESOURCE_EXHAUSTED with RetryInfo within 50 ms; one slow, one
    without RetryInfo or one accepted fails it."""
    fast = {"code": "RESOURCE_EXHAUSTED", "retry_after_s": 1.0, "elapsed_s": 0.01}
    assert refusal_verdict([fast, {**fast, "elapsed_s": 0.05}])["pass"]
    slow = refusal_verdict([fast, {**fast, "elapsed_s": 0.051}])
    assert not slow["pass"] and slow["max_s"] == 0.051
    bare = refusal_verdict([fast, {**fast, "retry_after_s": None}])
    assert not bare["pass"] and bare["refused_with_retry_info"] == 1
    assert not refusal_verdict([{**fast, "code": "OK (accepted)"}])["pass"]
    assert not refusal_verdict([])["pass"]


def test_the_realtime_phases_replay_the_same_arrivals() -> None:
    """Alone and with the job, the plan is the same seeded arrivals: same times, prompts and
    lengths, one REALTIME tenant at the asked rate."""
    opts = GapsOptions(phase_s=20.0)
    first = plan_requests(realtime_scenario(5.0, opts))
    again = plan_requests(realtime_scenario(5.0, opts))
    assert first == again
    assert {r.workload_class for r in first} == {"realtime"}
    assert {r.max_new_tokens for r in first} == {opts.realtime_tokens}
    assert 50 < len(first) < 150


def test_job_settings_become_flags_that_replace_earlier_values() -> None:
    """The schedulers' job settings as flags, added to a command line and replacing a value
    it already had (a second restart does not stack them)."""
    flags = JobSettings(reclaim_idle_s=5.0, heartbeat_s=1.0).flags()
    assert flags == ["--job-reclaim-idle-seconds", "5", "--job-heartbeat-seconds", "1"]
    argv = ["python", "-m", "scheduler", "--port", "1", "--job-heartbeat-seconds", "9"]
    once = with_flags(argv, flags)
    assert once == ["python", "-m", "scheduler", "--port", "1", *flags]
    assert with_flags(once, flags) == once


def _log(event: str, second: float, **extra: str) -> str:
    stamp = f"2026-01-01T00:00:{second:06.3f}Z"
    return json.dumps({"event": event, "timestamp": stamp, **extra})


def test_job_events_are_put_on_the_clock_counted_and_collapsed() -> None:
    """The jobs' events of a scheduler's log on the experiment's clock (others and broken
    lines skipped), counted in a window, their errors by last traceback line, and
    consecutive ones within a second collapsed into one timeline entry."""
    origin = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    trace = "Traceback ...\nredis.exceptions.ConnectionError: Connection refused."
    lines = [
        _log("job_line_reclaimed", 10.0),
        _log("job_line_crashed", 20.0, exception=trace),
        _log("job_line_crashed", 20.5, exception=trace),
        _log("job_line_reclaimed", 26.0),
        _log("rpc_finished", 27.0),
        '{"event": "job_line_reclaimed", broken',
    ]
    events = job_events(lines, origin, "scheduler")
    assert [(e.t_s, e.event) for e in events] == [
        (10.0, "job_line_reclaimed"),
        (20.0, "job_line_crashed"),
        (20.5, "job_line_crashed"),
        (26.0, "job_line_reclaimed"),
    ]
    assert count_between(events, "job_line_reclaimed", 10.0, 26.0) == 1
    assert errors(events, "job_line_crashed") == {
        "redis.exceptions.ConnectionError: Connection refused.": 2
    }
    assert runs(events) == [
        (10.0, "scheduler: job_line_reclaimed ×1"),
        (20.0, "scheduler: job_line_crashed ×2 until 20.5 s"),
        (26.0, "scheduler: job_line_reclaimed ×1"),
    ]


def _experiments() -> dict[str, dict[str, Any]]:
    ids = [f"line-{i}" for i in range(2000)]
    results = [ResultRow(i) for i in ids]
    phase = {
        "outcomes": {"ok": 100},
        "ttft_p50_s": 0.05,
        "ttft_p99_s": 0.1,
        "inter_token_p50_s": 0.01,
        "inter_token_p99_s": 0.02,
    }
    submit = {"code": "RESOURCE_EXHAUSTED", "reason": "X", "retry_after_s": 1.0, "elapsed_s": 0.008}
    refused = {
        "lines": 2,
        "line_tokens": 1024,
        "bytes": 222,
        "queued_ahead_lines": 3,
        "queued_ahead_planned_s": 3.0,
        "planned_s": 4.0,
        "submits": [submit],
    }
    job = {"actual_s": 10.0, "predicted_s": 12.0, "prediction_error": 0.2}
    return {
        "nothing_lost": {
            "lines": 2000,
            "job_state": "JOB_STATE_COMPLETED",
            "faults_injected": 3,
            "results": exactly_once(ids, results, results),
            "recomputed": recomputed(2000, 4, (3, 5), (30, 31), reattached=24, node_extra=35),
            "node_generations": {"extra": 12, "lines_generated": 2000},
            "line_tokens": 32,
            "duration_s": 90.0,
            "request_counts": {"total": 2000, "completed": 2000},
            "reclaimed_after": {"replica_kill_1": 17, "redis": 14},
            "line_tasks_crashed": {"count": 14, "errors": {"ConnectionError": 14}},
            "redis": {"restarted_by": "supervisor", "down_s": 0.7},
            "replica_counters": {},
            "timeline": [{"t_s": 1.0, "event": "SIGKILL scheduler"}],
        },
        "gaps": {
            "saturated": {
                "node_tokens_per_s": 2000.0,
                "closed_loop": {
                    "node_tokens_per_s": 1500.0,
                    "streams": 72,
                    "max_new_tokens": 64,
                    "failed_calls": 0,
                },
                "job_alone": {
                    "node_tokens_per_s": 2100.0,
                    "lines": 9000,
                    "line_tokens": 64,
                    "warmup_s": 9.0,
                },
                "job_around_phase": {
                    "before": 1900.0,
                    "after": 2100.0,
                    "node_tokens_per_s": 2000.0,
                },
                "closed_loop_after": {"node_tokens_per_s": 1500.0},
            },
            "realtime_rps": 4.0,
            "realtime_tokens": 128,
            "alone": {**phase, "node_tokens_per_s": 1000.0},
            "with_job": {
                **phase,
                "ttft_p99_s": 0.11,
                "inter_token_p99_s": 0.03,
                "node_tokens_per_s": 1900.0,
            },
            "job": {"lines": 5000, "line_tokens": 64, "warmup_s": 20.0, "completed": 900},
            **gaps_verdict(0.11, 0.1, 1900.0, 2000.0),
            "inter_token_ratio": 1.5,
        },
        "deadlines": {
            "pair": {
                "late": {**job, "actual_s": 20.0, "prediction_error": -0.1},
                "early": job,
                "early_first": True,
                "late_lines_before_early_done": 3,
            },
            "infeasible": {
                "window_s": 5,
                "line_tokens": 1024,
                "idle": refused,
                "busy": refused,
                **refusal_verdict(
                    [{"code": "RESOURCE_EXHAUSTED", "retry_after_s": 1.0, "elapsed_s": 0.008}]
                ),
            },
            "too_big_alone": {
                "lines": 200,
                "code": "INVALID_ARGUMENT",
                "reason": "JOB_WINDOW_TOO_SHORT",
                "elapsed_s": 0.03,
            },
            "prediction": {"alone": job, "error": 0.2, "pass": True},
        },
    }


def test_rows_compare_with_baselines_and_mark_pass_or_fail() -> None:
    """One row per figure: the recomputed share fails at 1.75 %, the gaps' targets pass, the
    throughput ratio is against the saturated figure, the deadlines' three targets pass and
    their two reported figures have no verdict; a failed experiment is one error row."""
    figures = rows(_experiments())
    by_figure = {r["figure"]: r for r in figures}
    again = by_figure[
        "lines computed more than once (duplicate + regenerated, or the nodes' extra "
        "generations if more)"
    ]
    assert again["measured"].startswith("35 (4 + 5; nodes 35); of 31 lines taken over")
    assert again["ratio"] == "1.8 %"
    assert again["pass"] is False
    ttft = by_figure["REALTIME TTFT p99, with the job vs alone"]
    assert (ttft["ratio"], ttft["pass"]) == ("1.10×", True)
    share = by_figure["nodes' generated tokens/s with the job vs saturated"]
    assert (share["measured"], share["baseline"], share["ratio"]) == (
        "1,900 tokens/s",
        "2,000 tokens/s (the job alone around the phase; closed loop after 1,500 tokens/s)",
        "95.0 %",
    )
    assert by_figure["REALTIME inter-token p99, with the job vs alone"]["pass"] is None
    refused = by_figure["REALTIME requests refused, with the job vs alone"]
    assert (refused["measured"], refused["baseline"], refused["pass"]) == ("0", "0", None)
    deadlines = [r for r in figures if r["experiment"] == "deadlines"]
    assert [r["pass"] for r in deadlines] == [True, True, None, True, None]
    assert deadlines[3]["ratio"] == "20.0 %"
    error = rows({"gaps": {"error": "RuntimeError: no node"}})
    assert len(error) == 1 and error[0]["pass"] is False
    assert "no node" in error[0]["measured"]


def test_markdown_has_the_table_and_each_experiment() -> None:
    """The table's header and a FAIL cell, a section per experiment with its timeline and
    the CPU the machine's other processes took."""
    experiments = {**_experiments(), "deadlines": {"error": "RuntimeError: no node"}}
    experiments["gaps"]["cpu"] = {
        "available_s": 200.0,
        "suite_and_bench_s": 150.0,
        "other_processes_s": 30.0,
        "other_processes_share": 0.15,
    }
    doc = {
        "generated_at": "2026-01-01T00:00:00+00:00",
        "machine": "x86_64, 2 CPUs",
        "wall_s": 600.0,
        "settings": {"scheduler_flags": "--job-reclaim-idle-seconds 5"},
        "figures": rows(experiments),
        "experiments": experiments,
    }
    text = markdown(doc)
    assert table(doc["figures"])[0] in text
    assert "**FAIL**" in text and "| pass |" in text
    assert "### Nothing lost" in text and "1 s SIGKILL scheduler" in text
    assert "other processes on the machine 30.0 (15.0 % of the machine)" in text
    assert "**Disturbed:** other processes on the machine took 15 %" in text
    assert "*Gaps filled, real time untouched*" in text
    assert "Not measured: RuntimeError: no node" in text
