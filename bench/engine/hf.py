"""Hugging Face baselines of the engine benchmark, each run inside a worker process.

* (a) ``hf_sequential``: ``model.generate`` one request at a time;
* (b) ``hf_static``: ``generate`` on left-padded static batches of C in arrival order;
* (c) ``hf_generate_batch``: transformers' continuous-batching manager, closed loop of C.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from bench.engine.common import (
    HEAD_TOKENS,
    HF_GENERATE_BATCH,
    HF_SEQUENTIAL,
    HF_STATIC,
    BenchRequest,
    CpuMeter,
    JobSpec,
    RequestResult,
    current_rss_bytes,
    summarize_run,
)
from bench.engine.model import pad_id, warmup_request
from inference_node.engine.text import kv_bytes_per_token
from inference_node.models import LanguageModel

CB_PAGE_SIZE = 256
CB_POLL_S = 1.0
CB_STOP_TIMEOUT_S = 60.0


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
    pad = pad_id(lm)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    streamer = FirstTokenStreamer()
    with torch.inference_mode():
        out = lm.hf_model().generate(
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


def run_hf_sequential(
    lm: LanguageModel, workload: Sequence[BenchRequest], spec: JobSpec
) -> dict[str, Any]:
    """(a): one ``generate`` call per request, back to back (closed loop at C=1)."""
    warm = warmup_request(lm)
    _hf_generate(lm, [warm.prompt], warm.max_new_tokens)
    rss_before = current_rss_bytes()
    results: list[RequestResult] = []
    head: list[int] = []
    meter = CpuMeter()
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
    record.update(meter.finish(), rss_before_run_bytes=rss_before, request0_head=head)
    return record


def run_hf_static(
    lm: LanguageModel, workload: Sequence[BenchRequest], spec: JobSpec
) -> dict[str, Any]:
    """(b): padded static batches of C in arrival order, each run to its longest output."""
    size = spec.concurrency
    warm = warmup_request(lm)
    _hf_generate(lm, [warm.prompt, warm.prompt[2:]], warm.max_new_tokens)
    rss_before = current_rss_bytes()
    results: list[RequestResult] = []
    head: list[int] = []
    slots = padded_prompt = 0
    meter = CpuMeter()
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
        meter.finish(),
        rss_before_run_bytes=rss_before,
        request0_head=head,
        batches=math.ceil(len(workload) / size),
        generated_slots=slots,
        padded_prompt_tokens=padded_prompt,
        waste_fraction=1.0 - useful / slots if slots else 0.0,
    )
    return record


# -- (c): transformers' continuous batching ------------------------------------------------


def run_hf_generate_batch(
    lm: LanguageModel, workload: Sequence[BenchRequest], spec: JobSpec
) -> dict[str, Any]:
    """(c): transformers' continuous batching manager (the engine behind ``generate_batch``).

    ``generate_batch`` takes one ``max_new_tokens`` for all prompts and returns only at the
    end, so the benchmark drives its manager directly (``init_continuous_batching``):
    ``add_request`` takes a per-request ``max_new_tokens`` and works while others run, so a
    closed loop of C requests is kept in flight, and ``streaming=True`` yields each token,
    which gives TTFT. ``eos_token_id=-1`` disables EOS.
    """
    model = lm.hf_model()
    size = spec.concurrency
    per_block = CB_PAGE_SIZE * kv_bytes_per_token(lm)
    longest = max(len(r.prompt) + r.max_new_tokens for r in workload)
    wanted_blocks = size * (math.ceil(longest / CB_PAGE_SIZE) + 1) + 2
    num_blocks = max(1, min(wanted_blocks, spec.kv_budget_bytes // per_block))
    generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False,
        max_new_tokens=max(r.max_new_tokens for r in workload),
        eos_token_id=-1,
        pad_token_id=pad_id(lm),
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
        _cb_closed_loop(manager, [warmup_request(lm)], 1)
        rss_before = current_rss_bytes()
        meter = CpuMeter()
        started = time.perf_counter()
        results, heads = _cb_closed_loop(manager, workload, size)
        wall = time.perf_counter() - started
        cpu = meter.finish()
    finally:
        manager.stop(block=True, timeout=CB_STOP_TIMEOUT_S)
        manager.destroy()
    record = summarize_run(HF_GENERATE_BATCH, size, results, wall)
    record.update(
        cpu,
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
