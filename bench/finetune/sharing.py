"""Figures 1-3, *training shares the node with real time*, on the suite's one node (the
``realtime`` and ``finetune`` pools), in one run:

1. **capacity**: a closed loop of ``saturate_streams`` BATCH generations (more than the node's
   BATCH slots) for ``saturate_warmup_s`` + ``saturate_s``; the node's generated tokens per
   second over the window (as :mod:`bench.jobs.gaps` measures saturation);
   The node has been restarted into the ``finetune`` pool first
   (:meth:`~bench.finetune.suite.FinetuneSuite.configure`), with no inter-token target
   unless one is given (``--itl-budget-ms``): the node's gap policy then bounds training by
   its share of the decode time and the model's own step-time tail, which follow the model
   (an absolute target set from a measured p99 let training stretch every gap up to it);
2. **without training, before**: REALTIME Poisson arrivals (seeded) at ``compared_load`` of
   the capacity for ``compared_phase_s``;
3. a fine-tune job (the *load job*: the quality task's spec, long enough to outlast the
   phases) is submitted through the Jobs API and trains on the node; once it has logged
   ``job_warmup_steps`` steps, **alone**: ``alone_s`` with no inference, its training
   tokens per second;
4. **with training**: the arrivals at each other load of ``loads`` for ``phase_s`` (the
   curve), then those of phase 2 again (same seed, rate and length) at ``compared_load``;
   then the job is cancelled;
5. **without training, after**: phase 2's arrivals once more. The baseline is the two
   phases without training pooled: the machine's speed drifts by a fifth or more over
   minutes, and a baseline on both sides of the compared phase follows it
   (``docs/decisions/bench-finetune-baseline-around-phase.md``).

Every phase reads the node's ``/metrics`` at the start and the end of its arrival window:
generated tokens, training tokens, the units deferred by reason, the yield-wait histograms.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import grpc

from bench.chaos.suite import OTHERS, VICTIM
from bench.finetune.calls import TrainSpec, submit_finetune, training_lines, wait_job
from bench.finetune.figures import (
    progress_curve,
    realtime_rps,
    sharing_verdict,
    yield_waits,
)
from bench.finetune.suite import FIRST_NODE, FinetuneSuite, NodeFlags
from bench.finetune.task import training_examples
from bench.jobs.calls import Caller, RealtimeTarget, closed_loop
from bench.jobs.figures import latency, rate
from bench.jobs.gaps import WAITED, realtime_scenario, request_figures, samples
from bench.jobs.metrics import Samples, scrape, total
from bench.jobs.suite import Running
from bench.load.run import run_load
from bench.load.scenario import Scenario

JOB_TENANT = OTHERS[0]
SATURATE_TENANT = OTHERS[1]
GENERATED = "sluice_node_generated_tokens_total"
TRAINED = "sluice_node_training_tokens_total"
STEPS = "sluice_node_training_steps_total"
DEFERRED = "sluice_node_training_units_deferred_total"
LOAD_ADAPTER = "bench-load"
SATURATE_PROMPT = "once upon a time in a land far away"
LOAD_LINES = training_lines(training_examples())
"""The load job's dataset: the quality task's."""


@dataclass(frozen=True)
class SharingOptions:
    """The experiment's sizes and times."""

    loads: tuple[float, ...] = (0.1, 0.3, 0.6)
    compared_load: float = 0.3
    phase_s: float = 45.0
    """Each phase of the curve."""
    compared_phase_s: float = 120.0
    """The compared phase and each phase without training: ~270 REALTIME requests each at
    30 % load, so that a p99 is not the largest of a few dozen."""
    alone_s: float = 30.0
    saturate_streams: int = 40
    saturate_tokens: int = 32
    saturate_warmup_s: float = 5.0
    saturate_s: float = 15.0
    realtime_tokens: int = 16
    prompt_words: tuple[int, int] = (8, 32)
    seed: int = 19
    request_timeout_s: float = 30.0
    drain_s: float = 10.0
    job_start_timeout_s: float = 120.0
    job_warmup_steps: int = 3
    """Steps the load job has logged before the alone window opens: a fresh node's first
    units (the optimizer's first step allocates its state) run slow once, and a kind measured
    over the bound waits for a remeasure; the window measures the steady state after."""
    load_job_steps: int = 100_000


def _read(address: str) -> tuple[float, Samples | None]:
    return time.monotonic(), scrape(address)


async def read_node(suite: FinetuneSuite) -> tuple[float, Samples | None]:
    """``(monotonic time, the node's samples)`` now."""
    return await asyncio.to_thread(_read, suite.node_metrics(FIRST_NODE))


def counter_rates(
    start: tuple[float, Samples | None], end: tuple[float, Samples | None]
) -> dict[str, Any]:
    """The node's generation and training rates and the deferred units between two reads."""
    (t0, a), (t1, b) = start, end
    seconds = t1 - t0

    def per_s(name: str) -> float | None:
        if a is None or b is None:
            return None
        return rate(total(a, name), total(b, name), seconds)

    reasons = sorted({dict(k[1]).get("reason", "") for k in (b or {}) if k[0] == DEFERRED})
    return {
        "node_tokens_per_s": per_s(GENERATED),
        "training_tokens_per_s": per_s(TRAINED),
        "training_steps": None
        if a is None or b is None
        else round(total(b, STEPS) - total(a, STEPS)),
        "deferred": {
            r: round(total(b or {}, DEFERRED, reason=r) - total(a or {}, DEFERRED, reason=r))
            for r in reasons
        },
    }


async def capacity(
    ctx: Running, caller: Caller, model: str, opts: SharingOptions
) -> dict[str, Any]:
    """The closed loop of BATCH generations; the node's tokens per second over its window."""
    suite = ctx.suite
    assert isinstance(suite, FinetuneSuite)
    streams, tokens = opts.saturate_streams, opts.saturate_tokens
    async with closed_loop(caller, model, SATURATE_PROMPT, streams, tokens) as failures:
        ctx.event(f"capacity: {opts.saturate_streams} closed-loop BATCH streams")
        await asyncio.sleep(opts.saturate_warmup_s)
        start = await read_node(suite)
        await asyncio.sleep(opts.saturate_s)
        end = await read_node(suite)
    tokens_per_s = counter_rates(start, end)["node_tokens_per_s"]
    ctx.event(f"capacity: {tokens_per_s or 0:.0f} tokens/s")
    return {
        "streams": opts.saturate_streams,
        "max_new_tokens": opts.saturate_tokens,
        "window_s": round(end[0] - start[0], 2),
        "node_tokens_per_s": tokens_per_s,
        "failed_calls": len(failures),
    }


Pool = tuple[list[float], list[float]]
"""A phase's TTFTs and inter-token gaps (seconds), to pool phases by."""


async def phase(
    ctx: Running, caller: Caller, scenario: Scenario, label: str, bound_s: float
) -> tuple[dict[str, Any], Pool]:
    """The arrivals of ``scenario``: the REALTIME requests' latency, and the node's rates and
    yield waits over the arrival window; with the latency samples."""
    suite = ctx.suite
    assert isinstance(suite, FinetuneSuite)
    target = RealtimeTarget(caller, scenario.model)
    ctx.event(f"{label}: {scenario.total_rps:.2f} req/s for {scenario.duration_s:g} s")

    async def window() -> tuple[tuple[float, Samples | None], tuple[float, Samples | None]]:
        start = await read_node(suite)
        await asyncio.sleep(scenario.duration_s)
        return start, await read_node(suite)

    reads = asyncio.create_task(window())
    result = await run_load(scenario, target)
    start, end = await reads
    name = label.replace(" ", "-").replace("%", "pct").replace(",", "")
    dump = suite.run_dir / f"requests-{name}.json"
    # inter-token gaps of streams cut off or timed out too: the slowest are the ones that matter
    figures = request_figures(result, target.chunks, WAITED, dump)
    ctx.event(f"{label} done: {figures['outcomes']}")
    return {
        "rps": round(scenario.total_rps, 3),
        "duration_s": scenario.duration_s,
        **figures,
        **counter_rates(start, end),
        "yield_waits": yield_waits(start[1], end[1], bound_s),
    }, samples(result, target.chunks, WAITED)


def pooled(
    load: float, before: tuple[dict[str, Any], Pool], after: tuple[dict[str, Any], Pool]
) -> dict[str, Any]:
    """The baseline: the phases without training on both sides of the compared one, their
    requests pooled (each phase's own figures kept under ``before`` and ``after``)."""
    (b, (b_ttfts, b_gaps)), (a, (a_ttfts, a_gaps)) = before, after
    outcomes = {k: b["outcomes"].get(k, 0) + a["outcomes"].get(k, 0) for k in b["outcomes"]}
    return {
        "load": load,
        "rps": b["rps"],
        "requests": b["requests"] + a["requests"],
        "outcomes": outcomes,
        **latency(b_ttfts + a_ttfts, b_gaps + a_gaps),
        "before": {"load": load, **b},
        "after": {"load": load, **a},
    }


async def _alone(ctx: Running, opts: SharingOptions) -> dict[str, Any]:
    suite = ctx.suite
    assert isinstance(suite, FinetuneSuite)
    ctx.event(f"alone: the load job trains with no inference for {opts.alone_s:g} s")
    start = await read_node(suite)
    await asyncio.sleep(opts.alone_s)
    end = await read_node(suite)
    figures = counter_rates(start, end)
    ctx.event(f"alone: {figures['training_tokens_per_s'] or 0:.0f} training tokens/s")
    return {"window_s": round(end[0] - start[0], 2), **figures}


async def stop_training(
    ctx: Running, tuner: Caller, job_id: str, timeout_s: float = 60.0, quiet_s: float = 2.0
) -> None:
    """Cancel the load job and wait until it is final and the node has stopped training (its
    training-token counter holds still for ``quiet_s``): the phase after it must not run
    beside a job still training. ``RuntimeError`` when that does not happen in ``timeout_s``."""
    suite = ctx.suite
    assert isinstance(suite, FinetuneSuite)
    with contextlib.suppress(grpc.aio.AioRpcError):  # a lost answer: the polls below tell
        await tuner.cancel(job_id)
    if await tuner.wait_final(job_id, timeout_s) is None:
        raise RuntimeError(f"the load job was not final {timeout_s:g} s after its cancel")
    deadline = time.monotonic() + timeout_s
    last = -1.0
    while time.monotonic() < deadline:
        _, samples = await read_node(suite)
        trained = total(samples or {}, TRAINED)
        if trained == last:
            ctx.event(f"load job {job_id} cancelled, the node's training stopped")
            return
        last = trained
        await asyncio.sleep(quiet_s)
    raise RuntimeError("the node kept training after the load job was cancelled")


def _label(load: float) -> str:
    return f"with training at {load * 100:g} %"


async def sharing(
    ctx: Running, model: str, spec: TrainSpec, opts: SharingOptions, flags: NodeFlags
) -> dict[str, Any]:
    """Run figures 1-3's experiment on a started suite (its node not configured yet: it is
    restarted with ``flags`` first); its figures."""
    suite = ctx.suite
    assert isinstance(suite, FinetuneSuite)
    credentials = suite.public_credentials()
    ctx.clock.reset()
    batch = Caller(suite.scheduler, suite.keys[SATURATE_TENANT], credentials)
    realtime = Caller(suite.scheduler, suite.keys[VICTIM], credentials)
    tuner = Caller(suite.scheduler, suite.keys[JOB_TENANT], credentials)
    job_id, cancelled = "", False
    bound_s = flags.yield_bound_ms / 1000
    try:
        ctx.event(f"restarting {FIRST_NODE} with {flags}")
        await suite.configure(flags)
        ctx.event(f"{FIRST_NODE} serves with the finetune pool")
        cap = await capacity(ctx, batch, model, opts)
        if not cap["node_tokens_per_s"]:
            raise RuntimeError("the node's capacity could not be measured")

        def scenario(load: float) -> Scenario:
            rps = realtime_rps(cap["node_tokens_per_s"], load, opts.realtime_tokens)
            if load == opts.compared_load:
                return realtime_scenario(
                    rps, replace(opts, phase_s=opts.compared_phase_s), model, "finetune-realtime"
                )
            return realtime_scenario(rps, opts, model, "finetune-realtime")

        compared_at = scenario(opts.compared_load)
        before = await phase(ctx, realtime, compared_at, "without training, before", bound_s)
        job = await submit_finetune(
            tuner, spec.proto(model, LOAD_ADAPTER, opts.load_job_steps), LOAD_LINES
        )
        job_id = job.job_id
        ctx.event(f"load job {job_id} submitted ({len(LOAD_LINES)} examples)")
        await wait_job(
            tuner,
            job_id,
            lambda j: j.training.step >= opts.job_warmup_steps,
            opts.job_start_timeout_s,
        )
        ctx.event(f"load job trains: {opts.job_warmup_steps} steps logged")
        alone = await _alone(ctx, opts)
        first = await read_node(suite)
        order = [x for x in opts.loads if x != opts.compared_load] + [opts.compared_load]
        loaded = {  # one after the other, the compared load last: next to the phase after
            load: (await phase(ctx, realtime, scenario(load), _label(load), bound_s))[0]
            for load in order
        }
        last = await read_node(suite)
        trained = await tuner.get(job_id)
        await stop_training(ctx, tuner, job_id)
        cancelled = True
        after = await phase(ctx, realtime, compared_at, "without training, after", bound_s)
    finally:
        if job_id and not cancelled:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await tuner.cancel(job_id)
            await tuner.wait_final(job_id, 60.0)
        for caller in (batch, realtime, tuner):
            await caller.close()
    with_training = [{"load": load, **loaded[load]} for load in sorted(loaded)]
    without = pooled(opts.compared_load, before, after)
    compared = loaded[opts.compared_load]
    return {
        "capacity": cap,
        "compared_load": opts.compared_load,
        "realtime_tokens": opts.realtime_tokens,
        "without": without,
        "alone": alone,
        "with_training": with_training,
        "curve": progress_curve(with_training, alone["training_tokens_per_s"]),
        "yield_waits": yield_waits(first[1], last[1], bound_s),
        "yield_bound_s": bound_s,
        "node_flags": asdict(flags),
        "itl_budget_from": "given" if flags.itl_budget_ms is not None else "none (share and tail)",
        "load_job": {
            "job_id": job_id,
            "steps_when_cancelled": trained.training.step,
            "waiting_s": round(trained.training.waiting_seconds, 1),
            "node": trained.training.node_id,
        },
        **sharing_verdict(without, compared, alone["training_tokens_per_s"]),
    }
