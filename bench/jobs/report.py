"""``jobs.json``'s table and ``jobs.md``: one row per figure of issue 18, with the baseline it is
compared to (measured in the same run), the ratio, the target and whether it is met. Pure
functions of the experiments' entries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.jobs.figures import (
    PREDICTION_TARGET,
    RECOMPUTED_TARGET,
    REFUSAL_TARGET_S,
    THROUGHPUT_SHARE_TARGET,
    TTFT_RATIO_TARGET,
)

Row = dict[str, Any]
"""``experiment, figure, measured, baseline, ratio, target, pass`` (pass: True, False or None
for a figure only reported)."""

TITLES = {
    "nothing_lost": "Nothing lost",
    "gaps": "Gaps filled, real time untouched",
    "deadlines": "Deadlines",
}


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.1f} ms"


def _tps(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} tokens/s"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.1f} %"


def _lines(n: int) -> str:
    return f"{n} line" if n == 1 else f"{n} lines"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _row(
    experiment: str,
    figure: str,
    measured: str,
    baseline: str = "–",
    ratio: str = "–",
    target: str = "report",
    passed: bool | None = None,
) -> Row:
    return {
        "experiment": experiment,
        "figure": figure,
        "measured": measured,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "pass": passed,
    }


def lost_rows(e: dict[str, Any]) -> list[Row]:
    """Experiment 1's rows."""
    x = "nothing_lost"
    results, again = e["results"], e["recomputed"]
    faults = e["faults_injected"]
    rows = [
        _row(
            x,
            f"{e['lines']}-line job completes through {faults} of 3 faults "
            "(2 replica SIGKILLs, 1 Redis SIGKILL)",
            str(e["job_state"]),
            target="COMPLETED, 3 faults",
            passed=e["job_state"] == "JOB_STATE_COMPLETED" and faults == 3,
        ),
        _row(
            x,
            "custom_ids with exactly one result",
            f"{results['by_id_one_each']} (read {results['results_read']}, missing "
            f"{results['missing']}, repeated {results['repeated']})",
            f"{results['lines']} lines",
            target="all",
            passed=results["exactly_once"],
        ),
        _row(
            x,
            "lines computed more than once (duplicate + regenerated, or the nodes' extra "
            "generations if more)",
            f"{again['count']} ({again['duplicate']} + {again['regenerated']}; nodes "
            f"{again['node_extra']}); of {again['reclaimed']} lines taken over after a kill, "
            f"{again['reattached']} reattached to their running generation",
            f"{e['lines']} lines",
            _pct(again["share"]),
            f"≤ {RECOMPUTED_TARGET * 100:g} %",
            again["pass"],
        ),
    ]
    extra = e.get("node_generations")
    if extra is not None:
        rows.append(
            _row(
                x,
                "lines the nodes generated to the end more than once (cross-check)",
                str(extra["extra"]),
                f"{extra['lines_generated']} lines generated",
                _pct(extra["extra"] / max(1, extra["lines_generated"])),
            )
        )
    return rows


def _refused(phase: dict[str, Any]) -> str:
    outcomes = phase.get("outcomes", {})
    return f"{outcomes.get('planned', 0) - outcomes.get('refused', 0)} served"


def gaps_rows(e: dict[str, Any]) -> list[Row]:
    """Experiment 2's rows."""
    x = "gaps"
    alone, busy, saturated = e["alone"], e["with_job"], e["saturated"]["node_tokens_per_s"]
    closed = e["saturated"]["closed_loop"]["node_tokens_per_s"]
    by_job = e["saturated"]["job_alone"]["node_tokens_per_s"]
    which = "closed loop" if saturated == closed else "job alone"
    other = f"job alone {_tps(by_job)}" if which == "closed loop" else f"closed loop {_tps(closed)}"
    return [
        _row(
            x,
            "REALTIME TTFT p99, with the job vs alone",
            f"{_ms(busy['ttft_p99_s'])} ({_refused(busy)})",
            f"{_ms(alone['ttft_p99_s'])} ({_refused(alone)})",
            _x(e["ttft_ratio"]),
            f"≤ {TTFT_RATIO_TARGET:g}×",
            e["ttft_pass"],
        ),
        _row(
            x,
            "REALTIME requests refused, with the job vs alone",
            str(busy.get("outcomes", {}).get("refused", 0)),
            str(alone.get("outcomes", {}).get("refused", 0)),
            target="report (not in TTFT p99, which covers requests served)",
        ),
        _row(
            x,
            "REALTIME inter-token p99, with the job vs alone",
            _ms(busy["inter_token_p99_s"]),
            _ms(alone["inter_token_p99_s"]),
            _x(e["inter_token_ratio"]),
        ),
        _row(
            x,
            "nodes' generated tokens/s with the job vs saturated",
            _tps(busy["node_tokens_per_s"]),
            f"{_tps(saturated)} ({which}; {other})",
            _pct(e["throughput_share"]),
            f"≥ {THROUGHPUT_SHARE_TARGET * 100:g} %",
            e["throughput_pass"],
        ),
        _row(
            x,
            f"nodes' generated tokens/s, REALTIME alone ({e['realtime_rps']:g} req/s)",
            _tps(alone["node_tokens_per_s"]),
            _tps(saturated),
            _pct(alone["node_tokens_per_s"] / saturated if saturated else None),
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
        _row(
            x,
            "two jobs submitted together: the earlier window finishes first",
            f"early done at {early['actual_s']} s, late at {late['actual_s']} s; "
            f"{pair['late_lines_before_early_done']} late lines done before early finished",
            target="early first",
            passed=pair["early_first"],
        ),
        _row(
            x,
            f"job due in {refusals['window_s']} s that fits alone but not behind a queued one "
            f"({_lines(refusals['idle']['lines'])} × {refusals['idle']['line_tokens']} tokens, "
            f"{refusals['idle']['bytes']} bytes) refused at submit, idle and busy",
            f"max {_ms(refusals['max_s'])}, p50 {_ms(refusals['p50_s'])}; "
            f"{refusals['refused_with_retry_info']}/{refusals['attempts']} RESOURCE_EXHAUSTED "
            "with RetryInfo",
            target=f"≤ {REFUSAL_TARGET_S * 1000:g} ms, RetryInfo",
            passed=refusals["pass"],
        ),
        _row(
            x,
            f"job that cannot fit its window even alone ({too_big['lines']} lines)",
            f"{too_big['code']} {too_big['reason']} in {_ms(too_big['elapsed_s'])}",
        ),
        _row(
            x,
            "predicted completion at accept vs actual, a job alone",
            f"predicted {alone['predicted_s']:.1f} s",
            f"actual {alone['actual_s']} s",
            _pct(prediction["error"]),
            f"within {PREDICTION_TARGET * 100:g} %",
            prediction["pass"],
        ),
        _row(
            x,
            "predicted vs actual, the two jobs (late predicted before early existed)",
            f"early {early['predicted_s']:.1f} s / late {late['predicted_s']:.1f} s",
            f"early {early['actual_s']} s / late {late['actual_s']} s",
            f"{_pct(early['prediction_error'])} / {_pct(late['prediction_error'])}",
        ),
    ]


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "nothing_lost": lost_rows,
    "gaps": gaps_rows,
    "deadlines": deadline_rows,
}


def rows(experiments: dict[str, dict[str, Any]]) -> list[Row]:
    """Every row, in the issue's order; an experiment that failed gives one ``error`` row."""
    out: list[Row] = []
    for name, entry in experiments.items():
        if "error" in entry:
            out.append(_row(name, TITLES[name], f"error: {entry['error']}", passed=False))
        else:
            out += ROWS[name](entry)
    return out


def _verdict(value: bool | None) -> str:
    return "–" if value is None else ("pass" if value else "**FAIL**")


def table(figures: list[Row]) -> list[str]:
    """The markdown table of ``figures``."""
    lines = [
        "| experiment | figure | measured | baseline (same run) | ratio | target | pass |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in figures:
        cells = [TITLES.get(r["experiment"], r["experiment"]), r["figure"], r["measured"]]
        cells += [r["baseline"], r["ratio"], r["target"], _verdict(r["pass"])]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return lines


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
        f"- {label}: {p['outcomes']}; TTFT p50 {_ms(p['ttft_p50_s'])}, p99 "
        f"{_ms(p['ttft_p99_s'])}; inter-token p50 {_ms(p['inter_token_p50_s'])}, p99 "
        f"{_ms(p['inter_token_p99_s'])}; nodes {_tps(p['node_tokens_per_s'])}; node "
        f"ejections in the window {p.get('node_ejections')}"
    )


def _gaps_details(e: dict[str, Any]) -> list[str]:
    closed, alone_job, job = e["saturated"]["closed_loop"], e["saturated"]["job_alone"], e["job"]
    return [
        f"- saturated (the higher of the two is the baseline): closed loop of "
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
        f"{job['completed']} lines done when the phase ended (then cancelled)",
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


DISTURBED_SHARE = 0.1
"""Other processes taking more of the machine than this during an experiment make its figures
unrepresentative: the nodes run at nice 10 and yield to them."""


def disturbed(experiments: dict[str, dict[str, Any]]) -> list[str]:
    """A warning line per experiment during which other processes took more than 10 % of the
    machine's CPU time (and a blank line after), or nothing."""
    lines = []
    for name, entry in experiments.items():
        share = (entry.get("cpu") or {}).get("other_processes_share")
        if share is not None and share > DISTURBED_SHARE:
            lines.append(
                f"**Disturbed:** other processes on the machine took {share * 100:.0f} % of its "
                f"CPU time during *{TITLES[name]}*; its figures are not representative."
            )
    return [*lines, ""] if lines else []


def _timeline(entry: dict[str, Any]) -> str:
    return "; ".join(f"{t['t_s']:g} s {t['event']}" for t in entry.get("timeline", []))


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
        *table(doc["figures"]),
        "",
        *disturbed(doc["experiments"]),
        "## Per experiment",
        "",
    ]
    for name, entry in doc["experiments"].items():
        lines += [f"### {TITLES[name]}", ""]
        if "error" in entry:
            lines += [f"Not measured: {entry['error']}", ""]
        else:
            lines += DETAILS[name](entry)
        lines += [f"- run directory: `{entry.get('run_dir', '?')}`, {entry.get('wall_s')} s"]
        cpu = entry.get("cpu")
        if cpu:
            lines.append(
                f"- CPU: {cpu['available_s']} core-seconds available; the suite and the bench "
                f"used {cpu['suite_and_bench_s']}, other processes on the machine "
                f"{cpu['other_processes_s']} ({_pct(cpu['other_processes_share'])} of the "
                "machine)"
            )
        lines += [f"- timeline: {_timeline(entry)}", ""]
    return "\n".join(lines)
