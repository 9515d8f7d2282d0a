"""``finetune.json``'s table and ``finetune.md``: one row per figure of issue 19, with the
baseline it is compared to (measured in the same run), the ratio, the target and whether it is
met. Pure functions of the experiments' entries (as :mod:`bench.jobs.report`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import report_table
from bench.finetune.figures import (
    ADAPTER_MATCH_TARGET,
    BASE_MATCH_TARGET,
    INTER_TOKEN_RATIO_TARGET,
    LOSS_TOLERANCE,
    PROGRESS_SHARE_TARGET,
    TTFT_RATIO_TARGET,
    WAIT_KINDS,
)
from bench.report_table import Row, cpu_line, ms, pct, row, served, times

TRAINING = "training tokens"
TITLES = {
    "sharing": "Training beside real time",
    "resume": "Kill, resume, serve",
}


def _tps(value: float | None, what: str = "tokens") -> str:
    return "–" if value is None else f"{value:,.1f} {what}/s"


def _pct_load(load: float) -> str:
    return f"{load * 100:g} %"


def _waits(figures: dict[str, Any]) -> str:
    edge = figures["p99_edge_s"]
    if not figures["count"]:
        return "no waits"
    return (
        f"p99 {ms(figures['p99_s'])} (bucket ≤ {ms(edge) if edge != float('inf') else '+Inf'}), "
        f"p50 {ms(figures['p50_s'])}, {figures['count']} waits"
    )


def sharing_rows(e: dict[str, Any]) -> list[Row]:
    """Figures 1-3's rows."""
    x, load = "sharing", _pct_load(e["compared_load"])
    without, alone = e["without"], e["alone"]
    compared = next(p for p in e["with_training"] if p["load"] == e["compared_load"])
    return [
        row(
            x,
            f"REALTIME TTFT p99 at {load} load, with training vs without (same arrivals, "
            "before and after pooled)",
            f"{ms(compared['ttft_p99_s'])} ({served(compared)})",
            f"{ms(without['ttft_p99_s'])} ({served(without)})",
            times(e["ttft_ratio"]),
            f"≤ {TTFT_RATIO_TARGET:g}×",
            e["ttft_pass"],
        ),
        row(
            x,
            f"REALTIME requests refused at {load} load, with training vs without",
            str(compared.get("outcomes", {}).get("refused", 0)),
            str(without.get("outcomes", {}).get("refused", 0)),
            target="report (not in TTFT p99, which covers requests served)",
        ),
        row(
            x,
            f"REALTIME inter-token p99 at {load} load, with training vs without",
            ms(compared["inter_token_p99_s"]),
            ms(without["inter_token_p99_s"]),
            times(e["inter_token_ratio"]),
            f"≤ {INTER_TOKEN_RATIO_TARGET:g}×",
            e["inter_token_pass"],
        ),
        row(
            x,
            f"fine-tune progress at {load} load vs the same job alone",
            _tps(compared["training_tokens_per_s"], TRAINING),
            _tps(alone["training_tokens_per_s"], TRAINING),
            pct(e["progress_share"]),
            f"≥ {PROGRESS_SHARE_TARGET * 100:g} %",
            e["progress_pass"],
        ),
        *_held_rows(e, compared),
        *_curve_rows(e),
        *_wait_rows(e),
    ]


def _held_rows(e: dict[str, Any], compared: dict[str, Any]) -> list[Row]:
    held = ", ".join(f"{k} {v}" for k, v in compared.get("deferred", {}).items() if v)
    return [
        row(
            "sharing",
            f"training units held back at {_pct_load(e['compared_load'])} load, by reason (a unit "
            "measured over the bound waits for an idle node to be measured again)",
            held or "none",
            f"{compared['training_steps']} steps in the phase",
        )
    ]


def _curve_rows(e: dict[str, Any]) -> list[Row]:
    return [
        row(
            "sharing",
            f"fine-tune progress at {_pct_load(point['load'])} load (the curve)",
            _tps(point["training_tokens_per_s"], TRAINING),
            "alone",
            pct(point["share_of_alone"]),
        )
        for point in e["curve"]
        if point["load"] != e["compared_load"]
    ]


def _wait_rows(e: dict[str, Any]) -> list[Row]:
    return [
        row(
            "sharing",
            f"real time waiting for training ({kind}), over the phases with training",
            _waits(e["yield_waits"][kind]),
            target=f"p99 ≤ {ms(e['yield_bound_s'])} (the node's yield bound)",
            passed=e["yield_waits"][kind]["pass"] if kind == "all" else None,
        )
        for kind in (*WAIT_KINDS, "all")
    ]


def resume_rows(e: dict[str, Any]) -> list[Row]:
    """Figures 4 and 5's rows."""
    x = "resume"
    kill, losses, quality = e["kill"], e["losses"], e["quality"]
    worst = losses["max_abs_diff"]
    return [
        row(
            x,
            "job whose training node got SIGKILL mid-job resumes on another node",
            f"{kill['state']}: killed {kill['killed_node']} at step {kill['killed_at_step']} "
            f"(checkpoint {kill['checkpoint_at_kill']}), resumed on {kill['resumed_on']} after "
            f"{kill['resumed_after_s']} s",
            target="COMPLETED, elsewhere",
            passed=e["resumed_elsewhere"] and kill["state"] == "JOB_STATE_COMPLETED",
        ),
        row(
            x,
            "per-step losses vs the uninterrupted run (same seed)",
            f"max |Δ| {worst:.2e} at step {losses['worst_step']}"
            if worst is not None
            else "no step to compare",
            f"{losses['steps_compared']} steps compared (missing: resumed "
            f"{losses['missing_in_resumed']}, reference {losses['missing_in_reference']})",
            target=f"every step within {LOSS_TOLERANCE:g}",
            passed=losses["pass"],
        ),
        row(
            x,
            f"served adapter's exact match on {quality['prompts']} held-out prompts (greedy)",
            pct(quality["adapter_exact_match"]),
            f"base {pct(quality['base_exact_match'])}",
            target=f"≥ {ADAPTER_MATCH_TARGET * 100:g} %",
            passed=quality["adapter_pass"],
        ),
        row(
            x,
            "base model's exact match on the same prompts",
            pct(quality["base_exact_match"]),
            target=f"≤ {BASE_MATCH_TARGET * 100:g} % (near 0)",
            passed=quality["base_pass"],
        ),
    ]


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "sharing": sharing_rows,
    "resume": resume_rows,
}


def _phase(p: dict[str, Any]) -> str:
    deferred = ", ".join(f"{k} {v}" for k, v in p.get("deferred", {}).items()) or "none"
    return (
        f"- {_pct_load(p['load'])} load, {p['rps']:g} req/s: {p['outcomes']}; TTFT p50 "
        f"{ms(p['ttft_p50_s'])}, p99 {ms(p['ttft_p99_s'])}; inter-token p50 "
        f"{ms(p['inter_token_p50_s'])}, p99 {ms(p['inter_token_p99_s'])}; node "
        f"{_tps(p['node_tokens_per_s'])}; training {_tps(p['training_tokens_per_s'])} "
        f"({p['training_steps']} steps); units deferred: {deferred}; waits: admission "
        f"{_waits(p['yield_waits']['admission'])}, decode {_waits(p['yield_waits']['decode'])}"
    )


def _budget(ms: float | None) -> str:
    return "none" if ms is None else f"{ms:g} ms"


def _sharing_details(e: dict[str, Any]) -> list[str]:
    cap, alone, job = e["capacity"], e["alone"], e["load_job"]
    flags = e["node_flags"]
    lines = [
        f"- the node: yield bound {flags['yield_bound_ms']:g} ms, inter-token "
        f"budget {_budget(flags['itl_budget_ms'])} ({e['itl_budget_from']})",
        f"- capacity: {cap['streams']} closed-loop BATCH streams of {cap['max_new_tokens']} "
        f"tokens, {_tps(cap['node_tokens_per_s'])} over {cap['window_s']} s "
        f"({cap['failed_calls']} failed calls); REALTIME requests of {e['realtime_tokens']} "
        "tokens (Poisson, same seed at every load)",
        f"- without training, the baseline: the phases before and after pooled, "
        f"{served(e['without'])}; TTFT p50 {ms(e['without']['ttft_p50_s'])}, p99 "
        f"{ms(e['without']['ttft_p99_s'])}; inter-token p50 "
        f"{ms(e['without']['inter_token_p50_s'])}, p99 {ms(e['without']['inter_token_p99_s'])}",
        f"- without training, before: {_phase(e['without']['before'])[2:]}",
        f"- without training, after: {_phase(e['without']['after'])[2:]}",
        f"- alone: the load job with no inference, {_tps(alone['training_tokens_per_s'])} "
        f"({alone['training_steps']} steps in {alone['window_s']} s); units deferred: "
        f"{alone['deferred']}",
    ]
    lines += [_phase(p) for p in e["with_training"]]
    lines.append(
        f"- load job {job['job_id']} on {job['node']}: {job['steps_when_cancelled']} steps when "
        f"cancelled, {job['waiting_s']} s waiting for gaps"
    )
    return lines


def _resume_details(e: dict[str, Any]) -> list[str]:
    ref, kill, quality = e["reference"], e["kill"], e["quality"]
    losses = [s["loss"] for s in ref["steps"]]
    after = [s["step"] for s in kill["steps"] if s["at_unix_ms"] > kill["killed_at_unix_ms"]]
    wrong = [a for a in quality["adapter_answers"] if not a["match"]][:5]
    base = quality["base_answers"][:3]
    return [
        f"- reference job {ref['job_id']} ({ref['examples']} examples) on {ref['nodes']}: "
        f"{len(ref['steps'])} steps in {ref['duration_s']} s, loss {losses[0]:.3f} → "
        f"{losses[-1]:.3f}"
        if losses
        else f"- reference job {ref['job_id']}: no steps",
        f"- killed job {kill['job_id']}: trained on {kill['nodes']} in turn; "
        f"{len(after)} steps logged after the kill"
        + (f" (steps {after[0]}-{after[-1]})" if after else ""),
        f"- adapter's misses (up to 5): {[(a['prompt'], a['answer']) for a in wrong]}",
        f"- base model's first answers: {[(a['prompt'], a['answer']) for a in base]}",
    ]


DETAILS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "sharing": _sharing_details,
    "resume": _resume_details,
}

REPORT = report_table.Report(TITLES, ROWS, DETAILS, lambda e: f"- {e.get('wall_s')} s")
rows = REPORT.rows
table = REPORT.table
disturbed = REPORT.disturbed


def markdown(doc: dict[str, Any]) -> str:
    """The whole ``finetune.md``."""
    s = doc["settings"]
    lines = [
        "# Fine-tuning in the gaps (`make bench-finetune`)",
        "",
        f"Generated {doc['generated_at']} on {doc['machine']} in {doc['wall_s']:g} s "
        f"({s['mode']} mode). One secure `sluice up` suite of `{s['model']}` (mutual TLS, "
        "supervised); its node restarted with "
        f"`{s['node_flags']}` and an inter-token budget of "
        f"{s['itl_budget']}; a second node with the same flags started for the kill. "
        "Fine-tunes through the Jobs API, traffic through the raw `Inference` stub. Figures of "
        "this run only; definitions in finetune.json and `bench/finetune/figures.py`; the "
        "plot in finetune.png.",
        "",
        *REPORT.body(doc),
    ]
    if doc.get("cpu"):
        lines += ["### The whole run", "", cpu_line(doc["cpu"]), ""]
    return "\n".join(lines)
