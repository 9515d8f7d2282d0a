"""Experiment 3, *deadlines*, on one suite, one tenant:

1. **infeasible, idle**: a job due in ``ahead_window_s`` (4 s) is queued, sized to about 3 s of
   the rate the scheduler plans with (read from its own prediction at accept, so no guess of
   the machine's speed is needed); then ``refusals`` submits, one after another, of a job
   small in bytes but large in work (a few lines of ``line_tokens`` tokens, about 4.5 s of
   that rate) with a 5 s window: it would fit alone but not behind the queued one, so each
   must be refused ``RESOURCE_EXHAUSTED`` with ``RetryInfo`` within 50 ms, timed around the
   whole client-streaming call on a connected channel. A job that cannot fit its window even
   alone is also submitted once (``INVALID_ARGUMENT JOB_WINDOW_TOO_SHORT``, no RetryInfo:
   waiting cannot help), reported only;
2. **two jobs together**: ``late`` (window ``late_window_s``) then, without waiting for its
   answer, ``early`` (the earlier window ``early_window_s``), the same size: ``early`` must
   finish first; while they run, the refusals again (**infeasible, busy**);
3. **prediction**: once both are done, one job alone; its predicted completion at accept
   against its actual duration (the two jobs' predictions are reported too: ``late`` was
   predicted before ``early`` existed, so its error is expected).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from typing import Any

import grpc

from bench.chaos.suite import OTHERS
from bench.jobs import logs as job_logs
from bench.jobs.calls import Caller, Submitted, job_lines
from bench.jobs.figures import (
    PREDICTION_TARGET,
    finished_before,
    prediction_error,
    refusal_verdict,
)
from bench.jobs.suite import Running
from sluice.v1 import jobs_pb2

TENANT = OTHERS[0]


@dataclass(frozen=True)
class DeadlineOptions:
    """The experiment's sizes and windows."""

    refusals: int = 5
    line_tokens: int = 1024
    """Tokens of each line of the refused jobs: the tiny model's limit (half its context)."""
    ahead_window_s: int = 4
    window_s: int = 5
    too_big_lines: int = 200
    """Lines of the job that cannot fit its window even alone."""
    pair_lines: int = 600
    pair_tokens: int = 32
    late_window_s: int = 1800
    early_window_s: int = 900
    predict_lines: int = 1000
    predict_tokens: int = 32
    job_timeout_s: float = 180.0


def _refusal(sub: Submitted) -> dict[str, Any]:
    refusal = sub.refusal
    return {
        "elapsed_s": round(sub.elapsed_s, 4),
        "code": refusal.code if refusal else "OK (accepted)",
        "reason": refusal.reason if refusal else "",
        "retry_after_s": refusal.retry_after_s if refusal else None,
        "message": refusal.message if refusal else "",
    }


async def _queued_ahead(
    caller: Caller, opts: DeadlineOptions, tag: str
) -> tuple[jobs_pb2.Job, float, int]:
    """A job due in ``ahead_window_s``, sized to 2-4 s of the scheduler's planning rate (as
    its prediction at accept shows): fewer lines, then shorter ones, while it cannot fit even
    alone; more lines while it is planned under 2 s. Returns the job, the seconds one of its
    lines is planned to take, and the tokens of a line."""
    count, tokens = 4, opts.line_tokens
    for attempt in range(12):
        lines = job_lines(count, tokens, f"{tag}-ahead-{attempt}")
        sub = await caller.submit(lines, window_s=opts.ahead_window_s)
        if sub.job is None:  # too big even alone
            if count == 1 and tokens <= 16:
                raise RuntimeError(f"one line does not fit {opts.ahead_window_s} s: {sub.refusal}")
            count, tokens = (count // 2, tokens) if count > 1 else (1, tokens // 2)
            continue
        job = sub.job
        planned = (job.predicted_completion_unix_ms - job.created_at_unix_ms) / 1000
        per_line = planned / count
        if planned >= 2.0:
            return job, per_line, tokens
        await caller.cancel(job.job_id)
        await asyncio.sleep(0.7)  # out of the replica's backlog at its next refresh (0.5 s)
        count = max(count + 1, math.floor(3.0 / max(per_line, 1e-3)))
    raise RuntimeError("no job could be sized to the queued-ahead window")


async def _infeasible(
    ctx: Running, caller: Caller, opts: DeadlineOptions, when: str
) -> dict[str, Any]:
    """One round: a job queued ahead, the refused submits, the queued job cancelled."""
    ahead, per_line, tokens = await _queued_ahead(caller, opts, when)
    count = max(1, math.floor(0.9 * opts.window_s / per_line))
    lines = job_lines(count, tokens, f"{when}-refused")
    out = []
    try:
        for _ in range(opts.refusals):
            sub = await caller.submit(lines, window_s=opts.window_s)
            if sub.job is not None:  # accepted: it must not run the others' time away
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await caller.cancel(sub.job.job_id)
            out.append(_refusal(sub))
    finally:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await caller.cancel(ahead.job_id)
    planned_ahead = (ahead.predicted_completion_unix_ms - ahead.created_at_unix_ms) / 1000
    times = ", ".join(f"{r['elapsed_s'] * 1000:.1f}" for r in out)
    ctx.event(
        f"infeasible ({when}): {ahead.request_counts.total} lines queued ahead (planned "
        f"{planned_ahead:.1f} s, due in {opts.ahead_window_s} s); {count} lines of {tokens} tokens "
        f"(planned {count * per_line:.1f} s, window {opts.window_s} s): {out[0]['code']} "
        f"{out[0]['reason']}, ms: {times}"
    )
    await asyncio.sleep(0.7)
    return {
        "queued_ahead_lines": ahead.request_counts.total,
        "queued_ahead_planned_s": planned_ahead,
        "lines": count,
        "line_tokens": tokens,
        "planned_s": round(count * per_line, 2),
        "bytes": sum(len(x.SerializeToString()) for x in lines),
        "submits": out,
    }


async def _too_big(ctx: Running, caller: Caller, opts: DeadlineOptions) -> dict[str, Any]:
    """A job that cannot fit its window even alone: refused whole (reported only)."""
    lines = job_lines(opts.too_big_lines, opts.line_tokens, "too-big")
    sub = await caller.submit(lines, window_s=opts.window_s)
    if sub.job is not None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await caller.cancel(sub.job.job_id)
    result = {"lines": opts.too_big_lines, **_refusal(sub)}
    ctx.event(
        f"too big alone: {result['code']} {result['reason']} in {sub.elapsed_s * 1000:.1f} ms"
    )
    return result


def _job_figures(sub: Submitted, final: jobs_pb2.Job | None) -> dict[str, Any]:
    job = sub.job
    assert job is not None
    created = job.created_at_unix_ms
    finished = final.finished_at_unix_ms if final else 0
    error = prediction_error(created, job.predicted_completion_unix_ms, finished)
    return {
        "job_id": job.job_id,
        "window_s": (job.deadline_unix_ms - created) / 1000,
        "state": jobs_pb2.JobState.Name(final.state) if final else None,
        "submit_s": round(sub.elapsed_s, 3),
        "predicted_s": (job.predicted_completion_unix_ms - created) / 1000,
        "actual_s": (finished - created) / 1000 if finished else None,
        "created_unix_ms": created,
        "finished_unix_ms": finished or None,
        "prediction_error": round(error, 3) if error is not None else None,
    }


async def _accepted(caller: Caller, lines: list[jobs_pb2.JobLine], window_s: int) -> Submitted:
    sub = await caller.submit(lines, window_s=window_s)
    if sub.job is None:
        raise RuntimeError(f"a feasible job was refused: {sub.refusal}")
    return sub


async def deadlines(ctx: Running, opts: DeadlineOptions) -> dict[str, Any]:
    """Run experiment 3 on a started suite; its figures."""
    suite = ctx.suite
    caller = Caller(suite.scheduler, suite.keys[TENANT], suite.public_credentials())
    ctx.clock.reset()
    try:
        await caller.warm()
        idle = await _infeasible(ctx, caller, opts, "idle")
        too_big = await _too_big(ctx, caller, opts)
        late_lines = job_lines(opts.pair_lines, opts.pair_tokens, "late")
        early_lines = job_lines(opts.pair_lines, opts.pair_tokens, "early")
        late_task = asyncio.create_task(_accepted(caller, late_lines, opts.late_window_s))
        await asyncio.sleep(0)  # the late job's stream starts first
        early_task = asyncio.create_task(_accepted(caller, early_lines, opts.early_window_s))
        late, early = await asyncio.gather(late_task, early_task)
        assert late.job is not None and early.job is not None
        ctx.event(
            f"two jobs accepted: late (window {opts.late_window_s} s), "
            f"early (window {opts.early_window_s} s), {opts.pair_lines} lines each"
        )
        busy = await _infeasible(ctx, caller, opts, "busy")
        late_final, early_final = await asyncio.gather(
            caller.wait_final(late.job.job_id, opts.job_timeout_s),
            caller.wait_final(early.job.job_id, opts.job_timeout_s),
        )
        ctx.event("both jobs final")
        late_done = [r.finished_at_unix_ms for r in await caller.results(late.job.job_id)]
        alone = await _accepted(
            caller, job_lines(opts.predict_lines, opts.predict_tokens, "alone"), 3600
        )
        assert alone.job is not None
        alone_final = await caller.wait_final(alone.job.job_id, opts.job_timeout_s)
        ctx.event("the job alone is final")
    finally:
        await caller.close()
    late_f, early_f = _job_figures(late, late_final), _job_figures(early, early_final)
    alone_f = _job_figures(alone, alone_final)
    first = (
        early_f["finished_unix_ms"] is not None
        and late_f["finished_unix_ms"] is not None
        and early_f["finished_unix_ms"] < late_f["finished_unix_ms"]
        and early_f["state"] == late_f["state"] == "JOB_STATE_COMPLETED"
    )
    error = alone_f["prediction_error"]
    return {
        "infeasible": {
            "window_s": opts.window_s,
            "idle": idle,
            "busy": busy,
            **refusal_verdict([*idle["submits"], *busy["submits"]]),
        },
        "too_big_alone": too_big,
        "pair": {
            "late": late_f,
            "early": early_f,
            "early_first": first,
            "late_lines_before_early_done": finished_before(late_done, early_f["finished_unix_ms"]),
            "early_ahead_s": (
                (late_f["finished_unix_ms"] - early_f["finished_unix_ms"]) / 1000
                if early_f["finished_unix_ms"] and late_f["finished_unix_ms"]
                else None
            ),
        },
        "prediction": {
            "alone": alone_f,
            "error": error,
            "target": PREDICTION_TARGET,
            "pass": error is not None and abs(error) <= PREDICTION_TARGET,
        },
        "timeline": job_logs.timeline(
            ctx.timeline, suite.run_dir / "logs", ["scheduler"], ctx.clock.origin_unix
        ),
    }
