"""``jobs.json``'s table and ``jobs.md``: one row per figure of issue 18, with the baseline it is
compared to (measured in the same run), the ratio, the target and whether it is met. Pure
functions of the experiments' entries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import report_table
from bench.jobs.figures import (
    PREDICTION_TARGET,
    RECOMPUTED_TARGET,
    REFUSAL_TARGET_S,
    THROUGHPUT_SHARE_TARGET,
    TTFT_RATIO_TARGET,
)
from bench.report_table import Row, ms, pct, row, served, times

TITLES = {
    "nothing_lost": "Nothing lost",
    "gaps": "Gaps filled, real time untouched",
    "deadlines": "Deadlines",
}


def _tps(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} tokens/s"


def _lines(n: int) -> str:
    return f"{n} line" if n == 1 else f"{n} lines"


def lost_rows(e: dict[str, Any]) -> list[Row]:
    """Experiment 1's rows."""
    x = "nothing_lost"
    results, again = e["results"], e["recomputed"]
    faults = e["faults_injected"]
    rows = [
        row(
            x,
            f"{e['lines']}-line job completes through {faults} of 3 faults "
            "(2 replica SIGKILLs, 1 Redis SIGKILL)",
            str(e["job_state"]),
            target="COMPLETED, 3 faults",
            passed=e["job_state"] == "JOB_STATE_COMPLETED" and faults == 3,
        ),
        row(
            x,
            "custom_ids with exactly one result",
            f"{results['by_id_one_each']} (read {results['results_read']}, missing "
            f"{results['missing']}, repeated {results['repeated']})",
            f"{results['lines']} lines",
            target="all",
            passed=results["exactly_once"],
        ),
        row(
            x,
            "lines computed more than once (duplicate + regenerated, or the nodes' extra "
            "generations if more)",
            f"{again['count']} ({again['duplicate']} + {again['regenerated']}; nodes "
            f"{again['node_extra']}); of {again['reclaimed']} lines taken over after a kill, "
            f"{again['reattached']} reattached to their running generation",
            f"{e['lines']} lines",
            pct(again["share"]),
            f"≤ {RECOMPUTED_TARGET * 100:g} %",
            again["pass"],
        ),
    ]
    extra = e.get("node_generations")
    if extra is not None:
        rows.append(
            row(
                x,
                "lines the nodes generated to the end more than once (cross-check)",
                str(extra["extra"]),
                f"{extra['lines_generated']} lines generated",
                pct(extra["extra"] / max(1, extra["lines_generated"])),
            )
        )
    return rows


def gaps_rows(e: dict[str, Any]) -> list[Row]:
    """Experiment 2's rows."""
    x = "gaps"
    alone, busy, saturated = e["alone"], e["with_job"], e["saturated"]["node_tokens_per_s"]
    closed = e["saturated"]["closed_loop_after"]["node_tokens_per_s"]
    firsts = (e["saturated"]["closed_loop"], e["saturated"]["job_alone"])
    sized = max((f["node_tokens_per_s"] or 0.0 for f in firsts), default=0.0) or None
    around = e["saturated"]["job_around_phase"]["node_tokens_per_s"]
    which = "closed loop after" if saturated == closed else "the job alone around the phase"
    other = (
        f"the job alone around the phase {_tps(around)}"
        if which == "closed loop after"
        else f"closed loop after {_tps(closed)}"
    )
    return [
        row(
            x,
            "REALTIME TTFT p99, with the job vs alone",
            f"{ms(busy['ttft_p99_s'])} ({served(busy)})",
            f"{ms(alone['ttft_p99_s'])} ({served(alone)})",
            times(e["ttft_ratio"]),
            f"≤ {TTFT_RATIO_TARGET:g}×",
            e["ttft_pass"],
        ),
        row(
            x,
            "REALTIME requests refused, with the job vs alone",
            str(busy.get("outcomes", {}).get("refused", 0)),
            str(alone.get("outcomes", {}).get("refused", 0)),
            target="report (not in TTFT p99, which covers requests served)",
        ),
        row(
            x,
            "REALTIME inter-token p99, with the job vs alone",
            ms(busy["inter_token_p99_s"]),
            ms(alone["inter_token_p99_s"]),
            times(e["inter_token_ratio"]),
        ),
        row(
            x,
            "nodes' generated tokens/s with the job vs saturated",
            _tps(busy["node_tokens_per_s"]),
            f"{_tps(saturated)} ({which}; {other})",
            pct(e["throughput_share"]),
            f"≥ {THROUGHPUT_SHARE_TARGET * 100:g} %",
            e["throughput_pass"],
        ),
        row(
            x,
            f"nodes' generated tokens/s, REALTIME alone ({e['realtime_rps']:g} req/s)",
            _tps(alone["node_tokens_per_s"]),
            f"{_tps(sized)} (saturated first, which sized the load)",
            pct(alone["node_tokens_per_s"] / sized if sized else None),
            "about 50 % (the offered load)",
        ),
    ]


def deadline_rows(e: dict[str, Any]) -> list[Row]:
    """Experiment 3's rows."""
    x = "deadlines"
    pair, refusals, prediction = e["pair"], e["infeasible"], e["prediction"]
    too_big = e["too_big_alone"]
    late, early, alone = pair["late"], pair["early"], prediction["alone"]
    return [
        row(
            x,
            "two jobs submitted together: the earlier window finishes first",
            f"early done at {early['actual_s']} s, late at {late['actual_s']} s; "
            f"{pair['late_lines_before_early_done']} late lines done before early finished",
            target="early first",
            passed=pair["early_first"],
        ),
        row(
            x,
            f"job due in {refusals['window_s']} s that fits alone but not behind a queued one "
            f"({_lines(refusals['idle']['lines'])} × {refusals['idle']['line_tokens']} tokens, "
            f"{refusals['idle']['bytes']} bytes) refused at submit, idle and busy",
            f"max {ms(refusals['max_s'])}, p50 {ms(refusals['p50_s'])}; "
            f"{refusals['refused_with_retry_info']}/{refusals['attempts']} RESOURCE_EXHAUSTED "
            "with RetryInfo",
            target=f"≤ {REFUSAL_TARGET_S * 1000:g} ms, RetryInfo",
            passed=refusals["pass"],
        ),
        row(
            x,
            f"job that cannot fit its window even alone ({too_big['lines']} lines)",
            f"{too_big['code']} {too_big['reason']} in {ms(too_big['elapsed_s'])}",
        ),
        row(
            x,
            "predicted completion at accept vs actual, a job alone",
            f"predicted {alone['predicted_s']:.1f} s",
            f"actual {alone['actual_s']} s",
            pct(prediction["error"]),
            f"within {PREDICTION_TARGET * 100:g} %",
            prediction["pass"],
        ),
        row(
            x,
            "predicted vs actual, the two jobs (late predicted before early existed)",
            f"early {early['predicted_s']:.1f} s / late {late['predicted_s']:.1f} s",
            f"early {early['actual_s']} s / late {late['actual_s']} s",
            f"{pct(early['prediction_error'])} / {pct(late['prediction_error'])}",
        ),
    ]


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "nothing_lost": lost_rows,
    "gaps": gaps_rows,
    "deadlines": deadline_rows,
}


def _lost_details(e: dict[str, Any]) -> list[str]:
    redis, crashed = e.get("redis") or {}, e["line_tasks_crashed"]
    crash_errors = "; ".join(f"{n}× {text}" for text, n in crashed["errors"].items())
    return [
        f"- job: {e['lines']} lines of {e['line_tokens']} tokens, {e['duration_s']} s; counts "
        f"{e['request_counts']}",
        f"- lines reclaimed after each fault (from the schedulers' logs): {e['reclaimed_after']}",
        f"- line tasks crashed (left pending, reclaimed after the idle bound): "
        f"{crashed['count']}{': ' + crash_errors if crash_errors else ''}",
        f"- Redis: restarted by the {redis.get('restarted_by')}, down {redis.get('down_s')} s; "
        f"lines done before the kill {redis.get('completed_before_kill')}, at the first read "
        f"after {redis.get('completed_first_read_after')}",
        f"- results delivered more than once: {e['results']['delivered_more_than_once']}; "
        f"each replica incarnation's last counters: {e['replica_counters']}",
    ]


def _phase(label: str, p: dict[str, Any]) -> str:
    return (
        f"- {label}: {p['outcomes']}; TTFT p50 {ms(p['ttft_p50_s'])}, p99 "
        f"{ms(p['ttft_p99_s'])}; inter-token p50 {ms(p['inter_token_p50_s'])}, p99 "
        f"{ms(p['inter_token_p99_s'])}; nodes {_tps(p['node_tokens_per_s'])}; node "
        f"ejections in the window {p.get('node_ejections')}"
    )


def _gaps_details(e: dict[str, Any]) -> list[str]:
    closed, alone_job, job = e["saturated"]["closed_loop"], e["saturated"]["job_alone"], e["job"]
    around, after = e["saturated"]["job_around_phase"], e["saturated"]["closed_loop_after"]
    return [
        f"- saturated, the baseline, measured around the phase with the job (the machine's speed "
        f"drifts over minutes): the higher of the job alone ({_tps(around['before'])} before "
        f"it, {_tps(around['after'])} after, mean {_tps(around['node_tokens_per_s'])}) and the "
        f"closed loop right after ({_tps(after['node_tokens_per_s'])}, "
        f"{after.get('failed_calls')} failed calls, node ejections {after.get('node_ejections')}, "
        f"the job final before it: {after.get('job_final_before')})",
        f"- measured first (the REALTIME rate is half the higher of these two): closed loop of "
        f"{closed['streams']} BATCH streams of {closed['max_new_tokens']} tokens "
        f"{_tps(closed['node_tokens_per_s'])} ({closed['failed_calls']} failed calls, node "
        f"ejections {closed.get('node_ejections')}); a job alone ({alone_job['lines']} lines of "
        f"{alone_job['line_tokens']} tokens, after {alone_job['warmup_s']} s) "
        f"{_tps(alone_job['node_tokens_per_s'])} (node ejections "
        f"{alone_job.get('node_ejections')})",
        f"- REALTIME: {e['realtime_rps']:g} req/s of {e['realtime_tokens']} tokens (Poisson, "
        "same seed both times)",
        _phase("alone", e["alone"]),
        _phase("with the job", e["with_job"]),
        f"- job: {job['lines']} lines of {job['line_tokens']} tokens, warm-up {job['warmup_s']} s, "
        f"{job['completed']} lines done when the phase ended (then the job alone once more, "
        "then cancelled)",
    ]


def _deadline_details(e: dict[str, Any]) -> list[str]:
    out = []
    for when in ("idle", "busy"):
        r = e["infeasible"][when]
        first = r["submits"][0]
        times = [round(x["elapsed_s"] * 1000, 1) for x in r["submits"]]
        out.append(
            f"- refusals ({when}): {_lines(r['queued_ahead_lines'])} queued ahead (planned "
            f"{r['queued_ahead_planned_s']} s), the refused job {_lines(r['lines'])} (planned "
            f"{r['planned_s']} s): {first['code']} {first['reason']}, RetryInfo "
            f"{first['retry_after_s']} s, ms {times}"
        )
    pair = e["pair"]
    out.append(
        f"- pair: early {pair['early']}, late {pair['late']}, late lines done before early "
        f"finished {pair['late_lines_before_early_done']}"
    )
    out.append(f"- job alone: {e['prediction']['alone']}")
    return out


DETAILS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "nothing_lost": _lost_details,
    "gaps": _gaps_details,
    "deadlines": _deadline_details,
}


def _where(e: dict[str, Any]) -> str:
    return f"- run directory: `{e.get('run_dir', '?')}`, {e.get('wall_s')} s"


REPORT = report_table.Report(TITLES, ROWS, DETAILS, _where)
rows = REPORT.rows
table = REPORT.table
disturbed = REPORT.disturbed


def markdown(doc: dict[str, Any]) -> str:
    """The whole ``jobs.md``."""
    s = doc["settings"]
    lines = [
        "# Durable jobs (`make bench-jobs`)",
        "",
        f"Generated {doc['generated_at']} on {doc['machine']} in {doc['wall_s']:g} s. Each "
        "experiment ran in a fresh secure `sluice up` suite (2 nodes of tiny-random-llama, mutual "
        "TLS, Redis with append-only persistence, supervised: crashed children and stores "
        "restarted), through the raw `Jobs`/`Inference` stubs. Every scheduler ran with "
        f"`{s['scheduler_flags']}` (defaults otherwise). Figures of this run only; definitions in "
        "jobs.json and `bench/jobs/figures.py`.",
        "",
        *REPORT.body(doc),
    ]
    return "\n".join(lines)
