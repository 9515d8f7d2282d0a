"""Worker side of the engine benchmark: each job measures one system inside its own process.

:func:`run_job` loads the model, warms the system up (untimed), serves the workload and returns
a JSON-able record; the driver adds the process's peak RSS context and roofline fractions.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench.engine_common import (
    HF_GENERATE_BATCH,
    HF_SEQUENTIAL,
    HF_STATIC,
    JOB_AUX,
    MIDBATCH_SEED_OFFSET,
    SLUICE,
    BenchRequest,
    JobSpec,
    RequestResult,
    build_workload,
    current_rss_bytes,
    peak_rss_bytes,
    percentile,
    random_prompt,
    summarize_run,
    token_pool,
)
from inference_node.engine import (
    DeltaStream,
    Engine,
    EngineRequest,
    FinishReason,
    SamplingParams,
    build_engine,
)
from inference_node.models import LanguageModel, load_language_model

HEAD_TOKENS = 16  # request 0's first tokens are kept to compare greedy outputs across systems
WARMUP_PROMPT_TOKENS = 8
WARMUP_NEW_TOKENS = 4
CB_PAGE_SIZE = 256
CB_POLL_S = 1.0
CB_STOP_TIMEOUT_S = 60.0
IDLE_PREFILL_SAMPLES = 3
MATMUL_WARMUP_ITERATIONS = 3
MATMUL_SHAPES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "cpu": ((2048, 2048, 2048), (256, 576, 1536)),
    "cuda": ((8192, 8192, 8192), (256, 576, 1536)),
}
PROBE_GAP_S = (0.05, 0.3)


def run_job(spec: JobSpec) -> dict[str, Any]:
    """Run the job ``spec`` describes in this process and return its record."""
    torch.set_num_threads(os.cpu_count() or 1)
    if spec.kind == JOB_AUX:
        return _run_aux(spec)
    lm = _load(spec)
    workload = _workload(lm, spec)[: spec.requests]
    runner = _RUNNERS[spec.system]
    record = runner(lm, workload, spec)
    record.update(_model_facts(lm))
    record["peak_rss_bytes"] = peak_rss_bytes()
    return record


# -- shared helpers -----------------------------------------------------------------------


def _load(spec: JobSpec) -> LanguageModel:
    return load_language_model(
        spec.model, device=spec.device, dtype=spec.dtype, cache_dir=Path(spec.cache_dir)
    )


def _special_ids(lm: LanguageModel) -> set[int]:
    ids: set[int] = set()
    config = lm.model.config
    for value in (
        getattr(config, "bos_token_id", None),
        getattr(config, "eos_token_id", None),
        getattr(config, "pad_token_id", None),
        lm.tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _vocab_size(lm: LanguageModel) -> int:
    return int(lm.model.get_input_embeddings().num_embeddings)


def _workload(lm: LanguageModel, spec: JobSpec) -> list[BenchRequest]:
    return build_workload(spec.seed, spec.workload_requests, _vocab_size(lm), _special_ids(lm))


def _warmup_request(lm: LanguageModel) -> BenchRequest:
    pool = token_pool(_vocab_size(lm), _special_ids(lm))
    prompt = random_prompt(random.Random(0), pool, WARMUP_PROMPT_TOKENS)
    return BenchRequest(-1, prompt, WARMUP_NEW_TOKENS)


def _pad_id(lm: LanguageModel) -> int:
    eos = lm.tokenizer.eos_token_id
    return int(eos) if eos is not None else 0


def _kv_bytes_per_token(lm: LanguageModel) -> int:
    """2 (K and V) × layers × KV heads × head size × bytes per element."""
    config = lm.model.config
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    element = torch.empty((), dtype=lm.dtype).element_size()
    return 2 * int(config.num_hidden_layers) * kv_heads * int(head_dim) * element


def _model_facts(lm: LanguageModel) -> dict[str, Any]:
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    weights += sum(b.numel() * b.element_size() for b in lm.model.buffers())
    return {
        "parameter_count": lm.parameter_count(),
        "weight_bytes": int(weights),
        "kv_bytes_per_token": _kv_bytes_per_token(lm),
        "threads": torch.get_num_threads(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- (a) and (b): Hugging Face generate ------------------------------------------------------


class FirstTokenStreamer(BaseStreamer):  # type: ignore[misc]
    """Records when ``generate`` hands over its first new tokens (its second ``put`` call;
    the first carries the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        """Count the call; the second one is the first decoded token (for every row)."""
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        """Nothing to flush."""


def _hf_generate(
    lm: LanguageModel, prompts: Sequence[Sequence[int]], new_tokens: int
) -> tuple[torch.Tensor, float, int]:
    """Greedy ``generate`` of exactly ``new_tokens`` for left-padded ``prompts``.

    Returns the output ids, when the first new token appeared and the padded prompt width.
    """
    width = max(len(p) for p in prompts)
    pad = _pad_id(lm)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    streamer = FirstTokenStreamer()
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=ids.to(lm.device),
            attention_mask=mask.to(lm.device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            streamer=streamer,
        )
    done = time.perf_counter()
    if out.shape[1] != width + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - width} tokens, not {new_tokens}")
    return out.cpu(), streamer.first_token_at or done, width


def _run_hf_sequential(
    lm: LanguageModel, workload: Sequence[BenchRequest], spec: JobSpec
) -> dict[str, Any]:
    """(a): one ``generate`` call per request, back to back (closed loop at C=1)."""
    warm = _warmup_request(lm)
    _hf_generate(lm, [warm.prompt], warm.max_new_tokens)
    rss_before = current_rss_bytes()
    results: list[RequestResult] = []
    head: list[int] = []
    started = time.perf_counter()
    for request in workload:
        sent = time.perf_counter()
        out, first, width = _hf_generate(lm, [request.prompt], request.max_new_tokens)
        done = time.perf_counter()
        results.append(
            RequestResult(
                request.index,
                len(request.prompt),
                request.max_new_tokens,
                first - sent,
                done - sent,
            )
        )
        if request.index == 0:
            head = out[0, width : width + HEAD_TOKENS].tolist()
    record = summarize_run(HF_SEQUENTIAL, 1, results, time.perf_counter() - started)
    record.update(rss_before_run_bytes=rss_before, request0_head=head)
    return record


def _run_hf_static(
    lm: LanguageModel, workload: Sequence[BenchRequest], spec: JobSpec
) -> dict[str, Any]:
    """(b): padded static batches of C in arrival order, each run to its longest output."""
    size = spec.concurrency
    warm = _warmup_request(lm)
    _hf_generate(lm, [warm.prompt, warm.prompt[2:]], warm.max_new_tokens)
    rss_before = current_rss_bytes()
    results: list[RequestResult] = []
    head: list[int] = []
    slots = padded_prompt = 0
    started = time.perf_counter()
    for start in range(0, len(workload), size):
        batch = workload[start : start + size]
        new_tokens = max(r.max_new_tokens for r in batch)
        sent = time.perf_counter()
        out, first, width = _hf_generate(lm, [r.prompt for r in batch], new_tokens)
        done = time.perf_counter()
        slots += new_tokens * len(batch)
        padded_prompt += width * len(batch)
        for row, request in enumerate(batch):
            # Each client only asked for its own tokens: the rest of its row is waste.
            results.append(
                RequestResult(
                    request.index,
                    len(request.prompt),
                    request.max_new_tokens,
                    first - sent,
                    done - sent,
                )
            )
            if request.index == 0:
                head = out[row, width : width + HEAD_TOKENS].tolist()
    record = summarize_run(HF_STATIC, size, results, time.perf_counter() - started)
    useful = record["output_tokens"]
    record.update(
        rss_before_run_bytes=rss_before,
        request0_head=head,
        batches=math.ceil(len(workload) / size),
        generated_slots=slots,
        padded_prompt_tokens=padded_prompt,
        waste_fraction=1.0 - useful / slots if slots else 0.0,
    )
    return record


# -- (c): transformers' continuous batching ------------------------------------------------


def _run_hf_generate_batch(
    lm: LanguageModel, workload: Sequence[BenchRequest], spec: JobSpec
) -> dict[str, Any]:
    """(c): transformers' continuous batching manager (the engine behind ``generate_batch``).

    ``generate_batch`` takes one ``max_new_tokens`` for all prompts and returns only at the
    end, so the benchmark drives its manager directly (``init_continuous_batching``):
    ``add_request`` takes a per-request ``max_new_tokens`` and works while others run, so a
    closed loop of C requests is kept in flight, and ``streaming=True`` yields each token,
    which gives TTFT. ``eos_token_id=-1`` disables EOS.
    """
    model = lm.model
    size = spec.concurrency
    per_block = CB_PAGE_SIZE * _kv_bytes_per_token(lm)
    longest = max(len(r.prompt) + r.max_new_tokens for r in workload)
    wanted_blocks = size * (math.ceil(longest / CB_PAGE_SIZE) + 1) + 2
    num_blocks = max(1, min(wanted_blocks, spec.kv_budget_bytes // per_block))
    generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(r.max_new_tokens for r in workload),
        eos_token_id=-1,
        pad_token_id=_pad_id(lm),
    )
    cb_config = ContinuousBatchingConfig(
        page_size=CB_PAGE_SIZE, num_blocks=num_blocks, max_batch_tokens=spec.max_batched_tokens
    )
    with torch.inference_mode():  # the generation thread inherits the caller's mode
        manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        attn_implementation = str(model.config._attn_implementation)
        manager.start()
    try:
        _cb_closed_loop(manager, [_warmup_request(lm)], 1)
        rss_before = current_rss_bytes()
        started = time.perf_counter()
        results, heads = _cb_closed_loop(manager, workload, size)
        wall = time.perf_counter() - started
    finally:
        manager.stop(block=True, timeout=CB_STOP_TIMEOUT_S)
        manager.destroy()
    record = summarize_run(HF_GENERATE_BATCH, size, results, wall)
    record.update(
        rss_before_run_bytes=rss_before,
        request0_head=heads.get(0, []),
        cb_api="init_continuous_batching + add_request(streaming=True), closed loop",
        cb_attn_implementation=attn_implementation,
        cb_num_blocks=num_blocks,
        cb_page_size=CB_PAGE_SIZE,
        cb_max_batch_tokens=spec.max_batched_tokens,
    )
    return record


def _cb_closed_loop(
    manager: Any, requests: Sequence[BenchRequest], concurrency: int
) -> tuple[list[RequestResult], dict[int, list[int]]]:
    """Keep ``concurrency`` requests in the manager until ``requests`` are all served."""
    pending: Iterator[BenchRequest] = iter(requests)
    in_flight: dict[str, tuple[BenchRequest, float]] = {}
    first: dict[str, float] = {}
    results: list[RequestResult] = []
    heads: dict[int, list[int]] = {}

    def submit_next() -> None:
        request = next(pending, None)
        if request is None:
            return
        request_id = f"bench-{request.index}"
        sent = time.perf_counter()
        accepted = manager.add_request(
            list(request.prompt),
            request_id=request_id,
            max_new_tokens=request.max_new_tokens,
            streaming=True,
            eos_token_id=-1,
        )
        if accepted is None:
            raise RuntimeError(f"the manager refused request {request_id}")
        in_flight[request_id] = (request, sent)

    for _ in range(concurrency):
        submit_next()
    while in_flight:
        output = manager.get_result(timeout=CB_POLL_S)
        now = time.perf_counter()
        if output is None:
            if not manager.is_running():
                fatal = manager.background_thread_status.fatal_error
                raise RuntimeError(f"the generation thread stopped: {fatal!r}")
            continue
        request_id = output.request_id
        if request_id not in in_flight:
            continue
        if request_id not in first and output.generated_tokens:
            first[request_id] = now
        if not output.is_finished():
            continue
        if output.error is not None:
            raise RuntimeError(f"request {request_id} failed: {output.error}")
        request, sent = in_flight.pop(request_id)
        produced = len(output.generated_tokens)
        if produced != request.max_new_tokens:
            raise RuntimeError(f"{request_id}: {produced} tokens, not {request.max_new_tokens}")
        results.append(
            RequestResult(
                request.index,
                len(request.prompt),
                produced,
                first.get(request_id, now) - sent,
                now - sent,
            )
        )
        heads[request.index] = list(output.generated_tokens[:HEAD_TOKENS])
        submit_next()
    return results, heads


# -- (d): the Sluice engine ---------------------------------------------------------------


@dataclass
class _Outcome:
    """One engine request as its client saw it."""

    ttft_s: float
    latency_s: float
    tokens: list[int]
    finish: FinishReason | None
    timed_out: bool


async def _engine_request(
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
    stream = engine.submit(EngineRequest(request_id, prompt, params, workload_class=1))
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
    """C client tasks; each takes the next request from a shared list when its last finished."""
    pending: Iterator[BenchRequest] = iter(requests)
    results: list[RequestResult] = []
    heads: dict[int, list[int]] = {}

    async def client() -> None:
        for request in pending:
            request_id = f"{prefix}-{request.index}"
            outcome = await _engine_request(
                engine, request_id, request.prompt, request.max_new_tokens
            )
            if outcome.finish is not FinishReason.LENGTH or len(outcome.tokens) != (
                request.max_new_tokens
            ):
                raise RuntimeError(
                    f"{request_id}: {len(outcome.tokens)} tokens of {request.max_new_tokens},"
                    f" finish {outcome.finish}"
                )
            results.append(
                RequestResult(
                    request.index,
                    len(request.prompt),
                    len(outcome.tokens),
                    outcome.ttft_s,
                    outcome.latency_s,
                )
            )
            heads[request.index] = outcome.tokens[:HEAD_TOKENS]

    await asyncio.gather(*(client() for _ in range(max(1, min(concurrency, len(requests))))))
    return results, heads


def _build_engine(lm: LanguageModel, spec: JobSpec, max_sequences: int) -> Engine:
    return build_engine(
        lm,
        max_sequences=max_sequences,
        max_batched_tokens=spec.max_batched_tokens,
        kv_budget_bytes=spec.kv_budget_bytes,
    )


def _run_sluice(
    lm: LanguageModel, workload: Sequence[BenchRequest], spec: JobSpec
) -> dict[str, Any]:
    """(d): ``build_engine`` with max(C, 32) sequences, C asyncio clients in a closed loop."""
    return asyncio.run(_sluice(lm, workload, spec))


async def _sluice(
    lm: LanguageModel, workload: Sequence[BenchRequest], spec: JobSpec
) -> dict[str, Any]:
    max_sequences = max(spec.concurrency, 32)
    engine = _build_engine(lm, spec, max_sequences)
    engine.start()
    try:
        await _engine_closed_loop(engine, [_warmup_request(lm)], 1, "warmup")
        rss_before = current_rss_bytes()
        started = time.perf_counter()
        results, heads = await _engine_closed_loop(engine, workload, spec.concurrency, "bench")
        wall = time.perf_counter() - started
        stats = engine.stats()
    finally:
        engine.close()
    record = summarize_run(SLUICE, spec.concurrency, results, wall)
    record.update(
        rss_before_run_bytes=rss_before,
        request0_head=heads.get(0, []),
        engine=type(engine).__name__,
        max_sequences=max_sequences,
        kv_budget_bytes=spec.kv_budget_bytes,
        engine_decode_tokens_per_s=stats.decode_tokens_per_s,
    )
    return record


_RUNNERS: dict[str, Callable[[LanguageModel, Sequence[BenchRequest], JobSpec], dict[str, Any]]]
_RUNNERS = {
    HF_SEQUENTIAL: _run_hf_sequential,
    HF_STATIC: _run_hf_static,
    HF_GENERATE_BATCH: _run_hf_generate_batch,
    SLUICE: _run_sluice,
}


# -- the auxiliary job: matmul roofline and mid-batch TTFT -------------------------------------


def _run_aux(spec: JobSpec) -> dict[str, Any]:
    device = torch.device(spec.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
    record: dict[str, Any] = {
        "torch_version": torch.__version__,
        "transformers_version": importlib.metadata.version("transformers"),
        "threads": torch.get_num_threads(),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
    }
    record.update(measure_matmul(device, dtype, spec.matmul_seconds))
    if spec.midbatch:
        try:
            lm = _load(spec)
            record.update(asyncio.run(_midbatch(lm, spec)))
        except Exception as exc:  # the roofline is still worth reporting
            record["midbatch_error"] = f"{type(exc).__name__}: {exc}"
    return record


def measure_matmul(device: torch.device, dtype: torch.dtype, seconds: float) -> dict[str, Any]:
    """Best ``torch.matmul`` GFLOP/s over a square and a model-shaped product."""
    shapes = []
    per_sync = 20 if device.type == "cuda" else 1
    for m, k, n in MATMUL_SHAPES.get(device.type, MATMUL_SHAPES["cpu"]):
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        c = torch.empty(m, n, dtype=dtype, device=device)
        for _ in range(MATMUL_WARMUP_ITERATIONS):
            torch.matmul(a, b, out=c)
        _sync(device)
        iterations = 0
        started = time.perf_counter()
        while True:
            for _ in range(per_sync):
                torch.matmul(a, b, out=c)
            _sync(device)
            iterations += per_sync
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        gflops = 2.0 * m * k * n * iterations / elapsed / 1e9
        shapes.append({"shape": [m, k, n], "gflops": gflops, "iterations": iterations})
        del a, b, c
    return {
        "matmul_gflops": max(s["gflops"] for s in shapes),
        "matmul": {"dtype": str(dtype).removeprefix("torch."), "shapes": shapes},
    }


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


async def _midbatch(lm: LanguageModel, spec: JobSpec) -> dict[str, Any]:
    """TTFT of probes arriving one at a time while ``midbatch_background`` requests decode."""
    rng = random.Random(spec.seed + MIDBATCH_SEED_OFFSET)
    pool = token_pool(_vocab_size(lm), _special_ids(lm))

    def prompt() -> tuple[int, ...]:
        return random_prompt(rng, pool, spec.midbatch_prompt_tokens)

    background = spec.midbatch_background
    engine = _build_engine(lm, spec, max(32, background + 1))
    engine.start()
    tracks = [_Track() for _ in range(background)]
    streams: list[DeltaStream] = []
    tasks: list[asyncio.Task[None]] = []
    ttfts: list[float] = []
    timed_out = False
    running_min = background
    try:
        warm = _warmup_request(lm)
        await _engine_request(engine, "warmup", warm.prompt, warm.max_new_tokens)
        idle = []
        for i in range(IDLE_PREFILL_SAMPLES):  # distinct prompts: no prefix cache can help
            outcome = await _engine_request(
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
            outcome = await _engine_request(
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
        window_end = time.perf_counter()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        engine.close()
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
    }
