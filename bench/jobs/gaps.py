"""Experiment 2, *gaps filled, real time untouched*, on one suite:

1. **saturated first**, measured two ways, the higher sizing the REALTIME load:

   - *closed loop*: ``saturate_streams`` BATCH generations from this process (a finished one
     replaced at once) for ``warmup_s`` + ``window_s``;
   - *job alone*: a large job and nothing else, over ``window_s`` once its line window has
     opened (the nodes' throughput steady, at most ``job_warmup_s``); then it is cancelled.

   Both read the nodes' generated tokens per second over the window. The two differ on a
   small machine: the closed loop's every chunk is relayed by the scheduler to this process,
   work that competes with the nodes for the CPUs (the nodes run at nice 10), while a job's
   chunks stop at the scheduler;
2. **alone**: REALTIME open-loop Poisson arrivals (:func:`bench.load.run.run_load`, seeded) at
   ``realtime_share`` of that for ``phase_s``;
3. **with the job**: a job large enough to outlast the phase is submitted; once the nodes
   generate at 90 % of the job-alone throughput (or after ``job_warmup_s``), the nodes'
   throughput with that job alone over ``window_s``, then the same arrivals (same seed) again,
   then the job alone over ``window_s`` once more; then the job is cancelled and the closed
   loop runs again (``warmup_s`` + ``window_s``).

The throughput target's baseline is measured *around the phase*, not minutes before it: the
higher of the job alone (the mean of the windows just before and just after the phase) and the
closed loop run right after. The machine's speed drifts by a fifth and more over minutes on
this shared host (the same job alone read 1,031 and 1,604 tokens/s in two runs of the same
code; in one run the closed loop read 1,430 tokens/s at the start and the job alone 1,153 and
1,183 around the phase), so a baseline taken minutes earlier measures the drift as much as the
job. The saturation measured first (1.) sizes the REALTIME load and is reported.

Each phase records every request (:mod:`bench.load.records`) and every chunk's arrival, and
reads the nodes' counters at the start and the end of its arrival window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from bench.chaos.logs import read_events
from bench.chaos.suite import OTHERS, VICTIM
from bench.jobs import logs as job_logs
from bench.jobs.calls import MODEL, PROMPT, Caller, RealtimeTarget, closed_loop, job_lines
from bench.jobs.figures import gaps_verdict, inter_token_gaps, latency, rate, ratio
from bench.jobs.metrics import scrape, total
from bench.jobs.suite import Running
from bench.load.records import OUTCOME_CUT_OFF, OUTCOME_OK, OUTCOME_TIMED_OUT, waited_ttft
from bench.load.run import LoadResult, run_load
from bench.load.scenario import Scenario, parse_scenario

JOB_TENANT = OTHERS[0]
SATURATE_TENANT = OTHERS[1]
GENERATED = "sluice_node_generated_tokens_total"
MAX_JOB_LINES = 50_000


@dataclass(frozen=True)
class GapsOptions:
    """The experiment's sizes and times."""

    saturate_streams: int = 72
    """Closed-loop BATCH streams: more than the nodes' BATCH slots (2 × 28), so some queue."""
    saturate_tokens: int = 64
    warmup_s: float = 5.0
    window_s: float = 20.0
    realtime_share: float = 0.5
    realtime_tokens: int = 128
    prompt_words: tuple[int, int] = (8, 32)
    phase_s: float = 60.0
    """Each REALTIME phase: 60 s gives the p99 of about 300 requests (30 s: of 140-290, a
    ratio of two p99s that moved 0.8-1.3x between runs of the same code)."""
    seed: int = 18
    request_timeout_s: float = 30.0
    drain_s: float = 15.0
    job_line_tokens: int = 64
    job_warmup_s: float = 30.0


def _node_tokens(addresses: list[str]) -> float | None:
    reads = [scrape(a) for a in addresses]
    if any(r is None for r in reads):
        return None
    return sum(total(r, GENERATED) for r in reads if r is not None)


async def node_tokens(ctx: Running) -> tuple[float, float | None]:
    """``(monotonic time, generated tokens of both nodes)`` now."""
    value = await asyncio.to_thread(_node_tokens, ctx.node_metrics())
    return time.monotonic(), value


async def saturate(ctx: Running, caller: Caller, opts: GapsOptions) -> dict[str, Any]:
    """The closed loop of BATCH generations; the nodes' tokens per second over its window."""
    streams, tokens = opts.saturate_streams, opts.saturate_tokens
    async with closed_loop(caller, MODEL, PROMPT, streams, tokens) as failures:
        ctx.event(f"saturation: {opts.saturate_streams} closed-loop BATCH streams")
        await asyncio.sleep(opts.warmup_s)
        start_at, start = await node_tokens(ctx)
        window_start = ctx.clock.now()
        await asyncio.sleep(opts.window_s)
        end_at, end = await node_tokens(ctx)
    tokens_per_s = rate(start, end, end_at - start_at)
    ctx.event(f"saturated: {tokens_per_s or 0:.0f} tokens/s")
    return {
        "streams": opts.saturate_streams,
        "max_new_tokens": opts.saturate_tokens,
        "window_on_clock_s": [round(window_start, 2), round(window_start + end_at - start_at, 2)],
        "node_tokens_per_s": tokens_per_s,
        "failed_calls": len(failures),
    }


class ArrivalOptions(Protocol):
    """What :func:`realtime_scenario` reads of an experiment's options."""

    @property
    def phase_s(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def request_timeout_s(self) -> float: ...
    @property
    def drain_s(self) -> float: ...
    @property
    def prompt_words(self) -> tuple[int, int]: ...
    @property
    def realtime_tokens(self) -> int: ...


def realtime_scenario(
    rps: float, opts: ArrivalOptions, model: str = MODEL, name: str = "jobs-realtime"
) -> Scenario:
    """One REALTIME tenant's seeded Poisson arrivals of ``model`` at ``rps``."""
    low, high = opts.prompt_words
    return parse_scenario(
        {
            "name": name,
            "model": model,
            "duration_s": opts.phase_s,
            "seed": opts.seed,
            "request_timeout_s": opts.request_timeout_s,
            "drain_s": opts.drain_s,
            "max_requests": 20_000,
            "tenants": [
                {
                    "name": VICTIM,
                    "class": "realtime",
                    "rate_rps": rps,
                    "prompt_tokens": {"kind": "uniform", "min": low, "max": high},
                    "output_tokens": {"kind": "fixed", "value": opts.realtime_tokens},
                }
            ],
        }
    )


WAITED = (OUTCOME_OK, OUTCOME_TIMED_OUT, OUTCOME_CUT_OFF)
"""The outcomes of the requests that waited for their first token (the rest were refused or
failed): the ones a TTFT p99 covers."""


def samples(
    result: LoadResult, chunks: dict[int, list[tuple[float, int]]], gaps_of: tuple[str, ...]
) -> tuple[list[float], list[float]]:
    """The TTFT of a phase's requests that waited, and the inter-token gaps (from each
    request's ``chunks``) of those whose outcome is in ``gaps_of``."""
    ttfts = [t for r in result.records if r.outcome in WAITED and (t := waited_ttft(r)) is not None]
    gaps = [
        g
        for r in result.records
        if r.outcome in gaps_of
        for g in inter_token_gaps(chunks.get(r.index, []))
    ]
    return ttfts, gaps


def request_figures(
    result: LoadResult,
    chunks: dict[int, list[tuple[float, int]]],
    gaps_of: tuple[str, ...],
    dump: Path,
) -> dict[str, Any]:
    """A phase's requests: how many, their outcomes and the percentiles of :func:`samples`;
    every record written to ``dump`` as JSON (for digging)."""
    ttfts, gaps = samples(result, chunks, gaps_of)
    dump.write_text(json.dumps([r.to_json() for r in result.records]))
    return {
        "requests": len(result.records),
        "outcomes": result.report(with_requests=False)["accounting"],
        **latency(ttfts, gaps),
    }


async def realtime_phase(
    ctx: Running, caller: Caller, scenario: Scenario, label: str
) -> dict[str, Any]:
    """The arrivals of ``scenario``; latency of the REALTIME requests and the nodes'
    tokens per second over the arrival window."""
    target = RealtimeTarget(caller)
    ctx.event(f"realtime {label}: {scenario.total_rps:.2f} req/s for {scenario.duration_s:g} s")

    async def window() -> float | None:
        start_at, start = await node_tokens(ctx)
        await asyncio.sleep(scenario.duration_s)
        end_at, end = await node_tokens(ctx)
        return rate(start, end, end_at - start_at)

    tokens_task = asyncio.create_task(window())
    started = ctx.clock.now()
    result = await run_load(scenario, target)
    tokens_per_s = await tokens_task
    dump = ctx.suite.run_dir / f"requests-{label.replace(' ', '-')}.json"
    figures = request_figures(result, target.chunks, (OUTCOME_OK,), dump)
    ctx.event(f"realtime {label} done: {figures['outcomes']}")
    return {
        "window_on_clock_s": [round(started, 2), round(started + scenario.duration_s, 2)],
        **figures,
        "node_tokens_per_s": tokens_per_s,
        "output_tokens": sum(r.output_tokens for r in result.records),
    }


async def _job_warmup(ctx: Running, goal: float | None, max_s: float) -> float:
    """Wait until the nodes generate ``goal`` tokens/s over 3 s, or (no goal) until two 3-s
    samples in a row are within 10 %, at most ``max_s``; returns how long it took."""
    started = time.monotonic()
    at, last = await node_tokens(ctx)
    previous: float | None = None
    while time.monotonic() - started < max_s:
        await asyncio.sleep(3.0)
        now, value = await node_tokens(ctx)
        speed = rate(last, value, now - at)
        at, last = now, value
        if speed is None:
            continue
        if goal is not None and speed >= goal:
            break
        if goal is None and previous is not None and abs(speed - previous) <= 0.1 * previous:
            break
        previous = speed
    return round(time.monotonic() - started, 1)


async def job_window(ctx: Running, seconds: float) -> float | None:
    """The nodes' generated tokens per second over the next ``seconds``."""
    start_at, start = await node_tokens(ctx)
    await asyncio.sleep(seconds)
    end_at, end = await node_tokens(ctx)
    return rate(start, end, end_at - start_at)


def _shown(tokens_per_s: float | None) -> str:
    return "not measured" if tokens_per_s is None else f"{tokens_per_s:.0f} tokens/s"


def bracketing(before: float | None, after: float | None) -> dict[str, Any]:
    """The job alone around the phase: both windows and their mean (of those measured: one
    alone when the other could not be read)."""
    measured = [v for v in (before, after) if v is not None]
    mean = sum(measured) / len(measured) if measured else None
    return {"before": before, "after": after, "node_tokens_per_s": mean}


async def _submit_big(ctx: Running, jobs: Caller, count: int, opts: GapsOptions, tag: str) -> str:
    submitted = await jobs.submit(
        job_lines(count, opts.job_line_tokens, tag), window_s=86_400, timeout_s=120
    )
    if submitted.job is None:
        raise RuntimeError(f"the job was refused: {submitted.refusal}")
    ctx.event(f"job {tag} submitted: {count} lines in {submitted.elapsed_s:.2f} s")
    return submitted.job.job_id


async def job_alone(ctx: Running, jobs: Caller, hint: float, opts: GapsOptions) -> dict[str, Any]:
    """A large job and nothing else: the nodes' tokens per second once it runs steadily;
    cancelled after, and waited for until final. ``hint``: the closed loop's throughput (the
    job is sized for six times it, so that it outlasts the window)."""
    work = max(hint, 2000.0) * 6 * (opts.job_warmup_s + opts.window_s)  # outlasts the window
    count = min(MAX_JOB_LINES, math.ceil(work / opts.job_line_tokens))
    job_id = await _submit_big(ctx, jobs, count, opts, "alone")
    try:
        warmup = await _job_warmup(ctx, None, opts.job_warmup_s)
        start_at, start = await node_tokens(ctx)
        window_start = ctx.clock.now()
        await asyncio.sleep(opts.window_s)
        end_at, end = await node_tokens(ctx)
    finally:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await jobs.cancel(job_id)
    final = await jobs.wait_final(job_id, 60.0)
    tokens_per_s = rate(start, end, end_at - start_at)
    ctx.event(f"job alone: {tokens_per_s or 0:.0f} tokens/s; cancelled, final: {final is not None}")
    return {
        "lines": count,
        "line_tokens": opts.job_line_tokens,
        "warmup_s": warmup,
        "window_on_clock_s": [round(window_start, 2), round(window_start + end_at - start_at, 2)],
        "node_tokens_per_s": tokens_per_s,
    }


async def gaps_filled(ctx: Running, opts: GapsOptions) -> dict[str, Any]:
    """Run experiment 2 on a started suite; its figures."""
    suite = ctx.suite
    credentials = suite.public_credentials()
    ctx.clock.reset()
    batch = Caller(suite.scheduler, suite.keys[SATURATE_TENANT], credentials)
    realtime = Caller(suite.scheduler, suite.keys[VICTIM], credentials)
    jobs = Caller(suite.scheduler, suite.keys[JOB_TENANT], credentials)
    job_id = ""
    try:
        closed = await saturate(ctx, batch, opts)
        alone_job = await job_alone(ctx, jobs, closed["node_tokens_per_s"] or 1000.0, opts)
        capacity = max(closed["node_tokens_per_s"] or 0.0, alone_job["node_tokens_per_s"] or 0.0)
        if not capacity:
            raise RuntimeError("the saturated throughput could not be measured")
        rps = opts.realtime_share * capacity / opts.realtime_tokens
        scenario = realtime_scenario(rps, opts)
        alone = await realtime_phase(ctx, realtime, scenario, "alone")
        busy_s = opts.job_warmup_s + opts.phase_s + opts.drain_s + 2 * opts.window_s + 30
        count = min(MAX_JOB_LINES, math.ceil(capacity * busy_s / opts.job_line_tokens))
        job_id = await _submit_big(ctx, jobs, count, opts, "gaps")
        goal = 0.9 * (alone_job["node_tokens_per_s"] or capacity)
        warmup = await _job_warmup(ctx, goal, opts.job_warmup_s)
        ctx.event(f"job warm-up over after {warmup:g} s")
        before = await job_window(ctx, opts.window_s)
        ctx.event(f"the job alone before the phase: {_shown(before)}")
        with_job = await realtime_phase(ctx, realtime, scenario, "with the job")
        job = await jobs.get(job_id)
        job_counts = {"total": job.request_counts.total, "completed": job.request_counts.completed}
        ctx.event(f"job: {job_counts['completed']} of {job_counts['total']} lines done")
        after = await job_window(ctx, opts.window_s)
        ctx.event(f"the job alone after the phase: {_shown(after)}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await jobs.cancel(job_id)
        final = await jobs.wait_final(job_id, 30.0)
        closed_after = await saturate(ctx, batch, opts)
        closed_after["job_final_before"] = final is not None
    finally:
        if job_id:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await jobs.cancel(job_id)
        for caller in (batch, realtime, jobs):
            await caller.close()
    logs = suite.run_dir / "logs"
    fleet = read_events([("scheduler", logs / "scheduler.log")], ctx.clock.origin_unix)
    for phase in (closed, alone_job, alone, with_job, closed_after):
        start, end = phase["window_on_clock_s"]
        phase["node_ejections"] = sum(
            "node_ejected" in what for t, what in fleet if start <= t < end
        )
    around = bracketing(before, after)
    baseline = (
        max(closed_after["node_tokens_per_s"] or 0.0, around["node_tokens_per_s"] or 0.0) or None
    )
    return {
        "saturated": {
            "node_tokens_per_s": baseline,
            "closed_loop": closed,
            "job_alone": alone_job,
            "job_around_phase": around,
            "closed_loop_after": closed_after,
        },
        "realtime_rps": round(rps, 3),
        "realtime_tokens": opts.realtime_tokens,
        "alone": alone,
        "with_job": with_job,
        "job": {
            "lines": count,
            "line_tokens": opts.job_line_tokens,
            "warmup_s": warmup,
            **job_counts,
        },
        **gaps_verdict(
            with_job["ttft_p99_s"],
            alone["ttft_p99_s"],
            with_job["node_tokens_per_s"],
            baseline,
        ),
        "inter_token_ratio": ratio(with_job["inter_token_p99_s"], alone["inter_token_p99_s"]),
        "timeline": job_logs.timeline(ctx.timeline, logs, ["scheduler"], ctx.clock.origin_unix),
    }
