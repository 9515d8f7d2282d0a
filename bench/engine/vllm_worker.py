"""The ``vllm`` system of the engine benchmark: vLLM's own v1 ``AsyncLLM``, in the worker.

The driver runs this job with the interpreter of ``.venv-vllm``
(:func:`bench.engine.driver.worker_python`). vLLM and torch are imported inside functions
only, so the module imports in the main virtualenv too (its tests need neither).

Rules:

* Same workload as every system: the model is loaded as the other workers load it (which
  converts SmolLM2's GGUF into the cache the first time), its vocabulary and special ids seed
  the workload, and it is dropped before vLLM starts.
* vLLM is set up as ``VllmEngine._build`` (``inference_node/engine/vllm_engine.py``) sets it
  up for an ``--engine vllm`` node (:func:`engine_args`): the node's converted Hugging Face
  directory (``checkpoint_dir``), the job's dtype, the model's context as ``max_model_len``,
  ``max_num_seqs`` max(C, 32) (sluice's ``max_sequences``), the job's tokens per step and KV
  cache bytes (the values sluice runs with), torch.compile on, stats logging off; prefix
  caching off, unlike the node (which turns it on to resume the prompts it pauses or
  preempts): the built-in engine has no prefix cache, and this compares the engines' speed.
  Scheduling stays vLLM's default first-come-first-served: the node asks for
  ``priority`` only to order Sluice's classes, and every request here is of one class.
* Requests: token-id prompts (``TokensPrompt``); greedy, exactly ``max_new_tokens`` tokens
  (``min_tokens`` = ``max_tokens``, EOS ignored); outputs streamed as deltas, so TTFT ends at
  the first delta that carries a token; C asyncio clients in a closed loop, as for sluice.
  A request that does not end on its length with all its tokens fails the run.
* Untimed: vLLM's start (model load, torch.compile, its profile run), then sluice's warm-up
  request, once alone and then twice at once (a batched decode has run before the clock).
* Peak RSS and own CPU count the worker and every process vLLM starts (its engine core and
  model worker): :mod:`bench.engine.proctree`, RSS sampled every ``RSS_SAMPLE_S`` from vLLM's
  start on (an upper bound: a page shared by two processes counts twice).
* Threads are vLLM's own choice (``VLLM_CPU_OMP_THREADS_BIND``, ``auto`` unless set, as on a
  node): the job's ``threads`` is not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib.metadata
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.engine.common import (
    MIN_ENGINE_SEQUENCES,
    VLLM,
    BenchRequest,
    JobSpec,
    RequestResult,
    closed_loop,
    cpu_fractions,
    cpu_sample,
    current_rss_bytes,
    peak_rss_bytes,
    summarize_run,
)
from bench.engine.proctree import TreeRssSampler, tree_cpu_seconds

RSS_SAMPLE_S = 0.5
CANCEL_WAIT_S = 2.0
LENGTH = "length"  # vLLM's finish_reason for a request that reached max_tokens


@dataclass(frozen=True)
class VllmCalls:
    """How a request reaches vLLM: the engine (``AsyncLLM.generate``) and the factories of
    its prompt and sampling objects (injected, so the closed loop runs on fakes in tests)."""

    llm: Any
    prompt: Callable[[Sequence[int]], Any]
    sampling: Callable[[int], Any]


@dataclass
class Outcome:
    """One vLLM request as its client saw it."""

    ttft_s: float
    latency_s: float
    tokens: list[int]
    finish: str | None


@dataclass(frozen=True)
class ModelSetup:
    """What the dropped model leaves behind: the workload and vLLM's inputs."""

    model_dir: Path
    max_model_len: int
    workload: list[BenchRequest]
    warmup: BenchRequest
    facts: dict[str, Any]


def engine_args(
    spec: JobSpec, model_dir: Path, max_model_len: int, max_sequences: int
) -> dict[str, Any]:
    """``AsyncEngineArgs`` keywords for ``spec``, as the node builds them (module doc)."""
    return {
        "model": str(model_dir),
        "served_model_name": [spec.model],
        "dtype": spec.dtype,
        "max_model_len": max_model_len,
        "max_num_seqs": max_sequences,
        "max_num_batched_tokens": spec.max_batched_tokens,
        "kv_cache_memory_bytes": spec.kv_budget_bytes,
        "enable_prefix_caching": False,
        "enforce_eager": False,
        "disable_log_stats": True,
    }


async def vllm_request(
    calls: VllmCalls, request_id: str, prompt: Sequence[int], new_tokens: int
) -> Outcome:
    """Serve one request through ``calls.llm.generate`` and read its deltas to the end."""
    sent = time.perf_counter()
    first: float | None = None
    tokens: list[int] = []
    finish: str | None = None
    outputs = calls.llm.generate(calls.prompt(prompt), calls.sampling(new_tokens), request_id)
    async for output in outputs:
        completion = output.outputs[0]
        if completion.token_ids:
            if first is None:
                first = time.perf_counter()
            tokens.extend(int(t) for t in completion.token_ids)
        if completion.finish_reason is not None:
            finish = str(completion.finish_reason)
    done = time.perf_counter()
    return Outcome((first if first is not None else done) - sent, done - sent, tokens, finish)


async def vllm_loop(
    calls: VllmCalls, requests: Sequence[BenchRequest], concurrency: int, prefix: str
) -> tuple[list[RequestResult], dict[int, list[int]]]:
    """:func:`closed_loop` through vLLM."""

    async def serve(request_id: str, request: BenchRequest) -> Outcome:
        return await vllm_request(calls, request_id, request.prompt, request.max_new_tokens)

    return await closed_loop(requests, concurrency, prefix, serve, LENGTH)


async def measure(calls: VllmCalls, setup: ModelSetup, spec: JobSpec) -> dict[str, Any]:
    """Warm up (untimed), then serve the workload at ``spec.concurrency``: the run record."""
    second = dataclasses.replace(setup.warmup, index=setup.warmup.index - 1)
    await vllm_loop(calls, [setup.warmup], 1, "warmup")
    await vllm_loop(calls, [setup.warmup, second], 2, "warmup-pair")
    rss_before = current_rss_bytes()
    root = os.getpid()
    busy_before, total_before, _ = cpu_sample()
    own_before = tree_cpu_seconds(root)
    started = time.perf_counter()
    results, heads = await vllm_loop(calls, setup.workload, spec.concurrency, "bench")
    wall = time.perf_counter() - started
    busy_after, total_after, _ = cpu_sample()
    cpu = cpu_fractions(
        busy_after - busy_before, total_after - total_before, tree_cpu_seconds(root) - own_before
    )
    record = summarize_run(VLLM, spec.concurrency, results, wall)
    record.update(cpu, rss_before_run_bytes=rss_before, request0_head=heads.get(0, []))
    return record


def _setup(spec: JobSpec) -> ModelSetup:
    """Load the model as the other workers do, keep what the run needs, drop the weights."""
    from bench.engine.model import (  # noqa: PLC0415 - torch: only in the worker
        load_model,
        model_facts,
        warmup_request,
        workload_for,
    )
    from inference_node.engine.vllm_mapping import checkpoint_dir  # noqa: PLC0415

    lm = load_model(spec)
    facts = model_facts(lm)
    facts.pop("threads", None)  # vLLM binds its own threads
    setup = ModelSetup(
        model_dir=checkpoint_dir(spec.model, None, Path(spec.cache_dir)),
        max_model_len=lm.max_context_tokens,
        workload=workload_for(lm, spec)[: spec.requests],
        warmup=warmup_request(lm),
        facts=facts,
    )
    del lm
    gc.collect()
    return setup


async def _serve(spec: JobSpec, setup: ModelSetup) -> dict[str, Any]:
    """Start vLLM (untimed), measure, shut it down."""
    from vllm import SamplingParams, TokensPrompt  # type: ignore[import-not-found]  # noqa: PLC0415
    from vllm.engine.arg_utils import AsyncEngineArgs  # type: ignore[import-not-found]  # noqa: PLC0415
    from vllm.platforms import current_platform  # type: ignore[import-not-found]  # noqa: PLC0415
    from vllm.sampling_params import RequestOutputKind  # type: ignore[import-not-found]  # noqa: PLC0415
    from vllm.v1.engine.async_llm import AsyncLLM  # type: ignore[import-not-found]  # noqa: PLC0415

    if current_platform.device_type != spec.device:
        raise RuntimeError(
            f"this vLLM build runs on {current_platform.device_type}, the job asks {spec.device}"
        )
    max_sequences = max(spec.concurrency, MIN_ENGINE_SEQUENCES)
    kwargs = engine_args(spec, setup.model_dir, setup.max_model_len, max_sequences)
    started = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    start_s = time.perf_counter() - started

    def sampling(new_tokens: int) -> Any:
        return SamplingParams(
            temperature=0.0,
            max_tokens=new_tokens,
            min_tokens=new_tokens,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )

    calls = VllmCalls(llm, lambda ids: TokensPrompt(prompt_token_ids=list(ids)), sampling)
    try:
        record = await measure(calls, setup, spec)
    finally:
        await _shut_down(llm)
    record.update(
        engine=type(llm).__name__,
        engine_args=kwargs,
        max_sequences=max_sequences,
        kv_budget_bytes=spec.kv_budget_bytes,
        kv_blocks=int(getattr(llm.vllm_config.cache_config, "num_gpu_blocks", 0) or 0),
        vllm_start_s=start_s,
        vllm_omp_threads_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    )
    return record


async def _shut_down(llm: Any) -> None:
    """Stop vLLM's output task before its engine core goes away under it (as the node does),
    then shut vLLM down, its processes too."""
    handler = getattr(llm, "output_handler", None)
    if handler is not None:
        handler.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                await asyncio.gather(handler, return_exceptions=True)
    llm.shutdown()


def run_vllm(spec: JobSpec) -> dict[str, Any]:
    """The worker's entry point for a ``vllm`` job: its run record (module doc)."""
    import torch  # noqa: PLC0415 - present wherever vLLM is

    setup = _setup(spec)
    rss_after_drop = current_rss_bytes()
    sampler = TreeRssSampler(os.getpid(), RSS_SAMPLE_S)
    sampler.start()
    try:
        record = asyncio.run(_serve(spec, setup))
    finally:
        sampler.stop()
    children_peak = int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
    record.update(setup.facts)
    record.update(
        # Without /proc, the two peaks summed (which may not have coincided).
        peak_rss_bytes=sampler.peak_bytes or (peak_rss_bytes() + children_peak),
        peak_processes=sampler.peak_processes,
        rss_after_model_drop_bytes=rss_after_drop,
        peak_rss_self_bytes=peak_rss_bytes(),
        peak_rss_largest_child_bytes=children_peak,
        vllm_version=importlib.metadata.version("vllm"),
        vllm_torch_version=torch.__version__,
        note=f"RSS of {sampler.peak_processes} processes" if sampler.peak_processes else "",
    )
    return record
