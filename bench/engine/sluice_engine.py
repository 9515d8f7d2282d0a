"""The Sluice engine side of the engine benchmark: closed-loop runs and the mid-batch mode.

Both go through ``inference_node.engine.build_engine`` and its asyncio ``submit`` streams only,
so they measure whichever engine ``build_engine`` returns.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.engine.common import (
    MIDBATCH_SEED_OFFSET,
    MIN_ENGINE_SEQUENCES,
    SLUICE,
    BenchRequest,
    CpuMeter,
    JobSpec,
    RequestResult,
    closed_loop,
    current_rss_bytes,
    peak_rss_bytes,
    random_prompt,
    summarize_run,
    token_pool,
)
from bench.engine.model import special_ids, vocab_size, warmup_request
from bench.stats import percentile
from inference_node.engine import (
    DeltaStream,
    Engine,
    EngineRequest,
    FinishReason,
    SamplingParams,
    build_engine,
    run_with_engine,
)
from inference_node.models import LanguageModel
from sluice.contract import WorkloadClass

IDLE_PREFILL_SAMPLES = 3
PROBE_GAP_S = (0.05, 0.3)


@dataclass
class _Outcome:
    """One engine request as its client saw it."""

    ttft_s: float
    latency_s: float
    tokens: list[int]
    finish: FinishReason | None
    timed_out: bool


async def engine_request(
    engine: Engine,
    request_id: str,
    prompt: tuple[int, ...],
    new_tokens: int,
    timeout_s: float | None = None,
) -> _Outcome:
    """Submit one greedy, EOS-ignoring request and read its stream to the end (or timeout)."""
    sent = time.perf_counter()
    first: float | None = None
    tokens: list[int] = []
    finish: FinishReason | None = None
    timed_out = False
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    request = EngineRequest(request_id, prompt, params, workload_class=WorkloadClass.REALTIME)
    stream = engine.submit(request)
    try:
        async with asyncio.timeout(timeout_s):
            async for delta in stream:
                if delta.token_ids:
                    if first is None:
                        first = time.perf_counter()
                    tokens.extend(delta.token_ids)
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
    except TimeoutError:
        timed_out = True
    finally:
        await stream.aclose()
    done = time.perf_counter()
    ttft = (first if first is not None else done) - sent
    return _Outcome(ttft, done - sent, tokens, finish, timed_out)


async def _engine_closed_loop(
    engine: Engine, requests: Sequence[BenchRequest], concurrency: int, prefix: str
) -> tuple[list[RequestResult], dict[int, list[int]]]:
    """:func:`closed_loop` through ``engine``."""

    async def serve(request_id: str, request: BenchRequest) -> _Outcome:
        return await engine_request(engine, request_id, request.prompt, request.max_new_tokens)

    return await closed_loop(requests, concurrency, prefix, serve, FinishReason.LENGTH)


def build_bench_engine(lm: LanguageModel, spec: JobSpec, max_sequences: int) -> Engine:
    """``build_engine`` as a node would call it, with the job's batch and KV settings."""
    return build_engine(
        lm,
        max_sequences=max_sequences,
        max_batched_tokens=spec.max_batched_tokens,
        kv_budget_bytes=spec.kv_budget_bytes,
    )


def run_sluice(
    lm: LanguageModel, workload: Sequence[BenchRequest], spec: JobSpec
) -> dict[str, Any]:
    """(d): ``build_engine`` with max(C, 32) sequences, C asyncio clients in a closed loop.

    As in a node, the engine loop runs on the main thread and the clients' event loop on a
    helper thread (``run_with_engine``).
    """
    max_sequences = max(spec.concurrency, MIN_ENGINE_SEQUENCES)
    engine = build_bench_engine(lm, spec, max_sequences)
    return run_with_engine(engine, lambda: _sluice(engine, lm, workload, spec, max_sequences))


async def _sluice(
    engine: Engine,
    lm: LanguageModel,
    workload: Sequence[BenchRequest],
    spec: JobSpec,
    max_sequences: int,
) -> dict[str, Any]:
    # run_with_engine closes the engine once this coroutine returns.
    await _engine_closed_loop(engine, [warmup_request(lm)], 1, "warmup")
    rss_before = current_rss_bytes()
    meter = CpuMeter()
    started = time.perf_counter()
    results, heads = await _engine_closed_loop(engine, workload, spec.concurrency, "bench")
    wall = time.perf_counter() - started
    cpu = meter.finish()
    stats = engine.stats()
    record = summarize_run(SLUICE, spec.concurrency, results, wall)
    record.update(
        cpu,
        rss_before_run_bytes=rss_before,
        request0_head=heads.get(0, []),
        engine=type(engine).__name__,
        max_sequences=max_sequences,
        kv_budget_bytes=spec.kv_budget_bytes,
        engine_decode_tokens_per_s=stats.decode_tokens_per_s,
    )
    return record


@dataclass
class _Track:
    """Token arrivals of one background request."""

    first: asyncio.Event = field(default_factory=asyncio.Event)
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    done: bool = False


async def _follow(stream: DeltaStream, track: _Track) -> None:
    try:
        async for delta in stream:
            if delta.token_ids:
                track.arrivals.append((time.perf_counter(), len(delta.token_ids)))
                track.first.set()
    finally:
        track.done = True


def _mean_step(tracks: Sequence[_Track], start: float, end: float) -> float | None:
    """Mean time between consecutive tokens of the same request inside ``[start, end]``."""
    intervals = []
    for track in tracks:
        inside = [(t, n) for t, n in track.arrivals if start <= t <= end]
        for (before, _), (after, count) in itertools.pairwise(inside):
            intervals.append((after - before) / max(count, 1))
    return sum(intervals) / len(intervals) if intervals else None


def measure_midbatch(lm: LanguageModel, spec: JobSpec) -> dict[str, Any]:
    """TTFT of probes arriving one at a time while ``midbatch_background`` requests decode
    (engine loop on the main thread, as in a node)."""
    engine = build_bench_engine(lm, spec, max(MIN_ENGINE_SEQUENCES, spec.midbatch_background + 1))
    return run_with_engine(engine, lambda: _midbatch(engine, lm, spec))


async def _midbatch(engine: Engine, lm: LanguageModel, spec: JobSpec) -> dict[str, Any]:
    rng = random.Random(spec.seed + MIDBATCH_SEED_OFFSET)
    pool = token_pool(vocab_size(lm), special_ids(lm))

    def prompt() -> tuple[int, ...]:
        return random_prompt(rng, pool, spec.midbatch_prompt_tokens)

    background = spec.midbatch_background
    meter = CpuMeter()
    tracks = [_Track() for _ in range(background)]
    streams: list[DeltaStream] = []
    tasks: list[asyncio.Task[None]] = []
    ttfts: list[float] = []
    timed_out = False
    running_min = background
    try:
        warm = warmup_request(lm)
        await engine_request(engine, "warmup", warm.prompt, warm.max_new_tokens)
        idle = []
        for i in range(IDLE_PREFILL_SAMPLES):  # distinct prompts: no prefix cache can help
            outcome = await engine_request(
                engine,
                f"idle-{i}",
                prompt(),
                spec.midbatch_probe_tokens,
                spec.midbatch_probe_timeout_s,
            )
            idle.append(outcome.ttft_s)
        params = SamplingParams(
            max_new_tokens=spec.midbatch_background_tokens, temperature=0.0, ignore_eos=True
        )
        for i, track in enumerate(tracks):
            stream = engine.submit(EngineRequest(f"background-{i}", prompt(), params, 1))
            streams.append(stream)
            tasks.append(asyncio.create_task(_follow(stream, track)))
        try:
            async with asyncio.timeout(spec.midbatch_start_timeout_s):
                await asyncio.gather(*(t.first.wait() for t in tracks))
        except TimeoutError:
            pass
        started = sum(t.first.is_set() for t in tracks)
        window_start = time.perf_counter()
        for i in range(spec.midbatch_probes):
            if i:
                await asyncio.sleep(rng.uniform(*PROBE_GAP_S))
            running_min = min(running_min, sum(t.first.is_set() and not t.done for t in tracks))
            outcome = await engine_request(
                engine,
                f"probe-{i}",
                prompt(),
                spec.midbatch_probe_tokens,
                spec.midbatch_probe_timeout_s,
            )
            ttfts.append(outcome.ttft_s)
            if outcome.timed_out:
                timed_out = True  # the engine is not serving probes: stop probing
                break
        running_min = min(running_min, sum(t.first.is_set() and not t.done for t in tracks))
        window_end = time.perf_counter()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
    step = _mean_step(tracks, window_start, window_end)
    return {
        "midbatch_ttft_p99_s": percentile(ttfts, 99),
        "midbatch_ttft_p50_s": percentile(ttfts, 50),
        "midbatch_ttfts_s": ttfts,
        "prefill_s": statistics.median(idle),
        "prefill_samples_s": idle,
        "decode_step_s": step if step is not None else 0.0,
        "midbatch_engine": type(engine).__name__,
        "midbatch_background": background,
        "midbatch_background_tokens": spec.midbatch_background_tokens,
        "midbatch_prompt_tokens": spec.midbatch_prompt_tokens,
        "midbatch_probe_tokens": spec.midbatch_probe_tokens,
        "midbatch_background_started": started,
        "midbatch_background_running_min": running_min,
        "midbatch_probes_sent": len(ttfts),
        "midbatch_timed_out": timed_out,
        "midbatch_valid": (
            not timed_out and step is not None and running_min == background and bool(ttfts)
        ),
        "midbatch_peak_rss_bytes": peak_rss_bytes(),
        "midbatch_other_cpu_fraction": meter.finish()["other_cpu_fraction"],
    }
