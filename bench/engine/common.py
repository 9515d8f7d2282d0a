"""Torch-free pieces of the engine benchmark shared by the driver and its workers.

The driver (:mod:`bench.engine.cli`) plans one :class:`JobSpec` per measurement and runs each
in its own ``python -m bench.engine --worker`` subprocess; workers rebuild the same seeded
workload from the spec, so every system serves exactly the same requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from bench.stats import percentile

HF_SEQUENTIAL = "hf_sequential"
HF_STATIC = "hf_static"
HF_GENERATE_BATCH = "hf_generate_batch"
SLUICE = "sluice"
VLLM = "vllm"
SYSTEMS: tuple[str, ...] = (HF_SEQUENTIAL, HF_STATIC, HF_GENERATE_BATCH, SLUICE, VLLM)
SYSTEM_LABELS: dict[str, str] = {
    HF_SEQUENTIAL: "(a) HF generate, one at a time",
    HF_STATIC: "(b) HF generate, padded static batches",
    HF_GENERATE_BATCH: "(c) HF generate_batch (continuous batching)",
    SLUICE: "(d) Sluice engine",
    VLLM: "(e) vLLM's own engine (v1 AsyncLLM in the worker, run by the .venv-vllm interpreter) "
    "on the node's converted checkpoint with the engine settings of an `--engine vllm` node "
    "(dtype, sequences max(C, 32), tokens per step, KV cache bytes; prefix caching off, as "
    "the built-in engine has none), "
    "its start and torch.compile untimed; its peak RSS sums the worker and the processes "
    "vLLM starts (shared pages counted in each)",
}

JOB_RUN = "run"
DEFAULT_MODEL = "smollm2-135m-instruct"
JOB_AUX = "aux"  # the matmul roofline, then (unless skipped) the mid-batch TTFT mode

OUTPUT_LENGTHS: tuple[int, ...] = (16, 64, 128)
PROMPT_MIN_TOKENS = 20
PROMPT_MAX_TOKENS = 300
LOWEST_PROMPT_ID = 100  # ids below this are left out of prompts (special and control tokens)
GIB = 1 << 30
MIB = 1 << 20
MIDBATCH_SEED_OFFSET = 1_000_003  # the mid-batch prompts come from their own seeded stream
HEAD_TOKENS = 16  # request 0's first tokens are kept to compare greedy outputs across systems
MIN_ENGINE_SEQUENCES = 32  # sluice and vllm run with max(C, 32) sequences at most


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker subprocess needs to run one measurement."""

    kind: str
    system: str
    concurrency: int
    requests: int
    model: str
    device: str
    dtype: str
    cache_dir: str
    seed: int
    workload_requests: int
    kv_budget_bytes: int
    max_batched_tokens: int
    threads: int = 0  # torch threads; 0: one per CPU
    matmul_seconds: float = 1.5
    midbatch: bool = True
    midbatch_background: int = 31
    midbatch_background_tokens: int = 400
    midbatch_prompt_tokens: int = 150
    midbatch_probe_tokens: int = 8
    midbatch_probes: int = 10
    midbatch_start_timeout_s: float = 120.0
    midbatch_probe_timeout_s: float = 30.0

    def to_json(self) -> str:
        """The spec as one JSON object (the worker's ``--worker`` argument)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """Parse :meth:`to_json` output."""
        return cls(**json.loads(text))

    @property
    def label(self) -> str:
        """A short human-readable name for progress lines."""
        if self.kind == JOB_AUX:
            return "matmul roofline" + (" + mid-batch TTFT" if self.midbatch else "")
        return f"{self.system} C={self.concurrency} ({self.requests} requests)"


@dataclass(frozen=True)
class BenchRequest:
    """One workload request: a prompt of token ids and a fixed number of tokens to generate."""

    index: int
    prompt: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class RequestResult:
    """What one request measured: its sizes, time to first token and total latency."""

    index: int
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    latency_s: float


def token_pool(vocab_size: int, special_ids: Iterable[int]) -> list[int]:
    """Prompt token ids: ``[min(100, vocab/4), vocab)`` without the model's special ids."""
    low = min(LOWEST_PROMPT_ID, vocab_size // 4)
    special = set(special_ids)
    return [i for i in range(low, vocab_size) if i not in special]


def build_workload(
    seed: int, count: int, vocab_size: int, special_ids: Iterable[int]
) -> list[BenchRequest]:
    """The seeded workload: ``count`` requests, prompts of 20–300 random tokens, outputs of
    16, 64 or 128 tokens. The first ``n`` requests are the same whatever ``count`` is."""
    rng = random.Random(seed)
    pool = token_pool(vocab_size, special_ids)
    workload = []
    for index in range(count):
        length = rng.randint(PROMPT_MIN_TOKENS, PROMPT_MAX_TOKENS)
        prompt = tuple(rng.choice(pool) for _ in range(length))
        workload.append(BenchRequest(index, prompt, rng.choice(OUTPUT_LENGTHS)))
    return workload


def random_prompt(rng: random.Random, pool: Sequence[int], length: int) -> tuple[int, ...]:
    """A prompt of ``length`` ids drawn from ``pool``."""
    return tuple(rng.choice(pool) for _ in range(length))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ``ru_maxrss`` in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    """This process's current resident set size (0 where ``/proc`` is unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * resource.getpagesize()


def cpu_sample() -> tuple[float, float, float]:
    """Machine-wide busy and total CPU seconds (``/proc/stat``; steal counts as busy) and this
    process's own CPU seconds, now."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    own = usage.ru_utime + usage.ru_stime
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0, 0.0, own
    total = sum(ticks) / hz
    idle = (ticks[3] + ticks[4]) / hz  # idle and iowait
    return total - idle, total, own


class CpuMeter:
    """How much of the machine's CPU time this process and everything else used over a window.

    Other processes on a small machine slow a run down badly (their threads and ours fight for
    the same cores), so every measurement records ``other_cpu_fraction``.
    """

    def __init__(self) -> None:
        self._start = cpu_sample()

    def finish(self) -> dict[str, float]:
        """``own_cpu_fraction`` and ``other_cpu_fraction`` of all CPU time since creation."""
        busy, total, own = (b - a for a, b in zip(self._start, cpu_sample(), strict=True))
        return cpu_fractions(busy, total, own)


def cpu_fractions(busy_s: float, total_s: float, own_s: float) -> dict[str, float]:
    """Of ``total_s`` machine CPU seconds, the share ``own_s`` used (``own_cpu_fraction``)
    and the share the rest of ``busy_s`` used (``other_cpu_fraction``); zeros when
    ``total_s`` is not positive."""
    if total_s <= 0:
        return {"own_cpu_fraction": 0.0, "other_cpu_fraction": 0.0}
    return {
        "own_cpu_fraction": min(1.0, own_s / total_s),
        "other_cpu_fraction": min(1.0, max(0.0, busy_s - own_s) / total_s),
    }


def summarize_run(
    system: str, concurrency: int, results: Sequence[RequestResult], wall_s: float
) -> dict[str, Any]:
    """The run record for ``results`` served in ``wall_s`` seconds (throughput, TTFT, sizes)."""
    ttfts = [r.ttft_s for r in results]
    output_tokens = sum(r.output_tokens for r in results)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    wall = max(wall_s, 1e-9)
    return {
        "system": system,
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": output_tokens / wall,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else 0.0,
        "latency_p50_s": percentile([r.latency_s for r in results], 50),
        "latency_p99_s": percentile([r.latency_s for r in results], 99),
    }


def failed_run(spec: JobSpec, error: str) -> dict[str, Any]:
    """A run record for a measurement that could not be made: zeros plus ``error``."""
    return {
        "system": spec.system,
        "concurrency": spec.concurrency,
        "requests": spec.requests,
        "output_tokens": 0,
        "prompt_tokens": 0,
        "wall_s": 0.0,
        "output_tokens_per_s": 0.0,
        "total_tokens_per_s": 0.0,
        "ttft_p50_s": 0.0,
        "ttft_p99_s": 0.0,
        "ttft_mean_s": 0.0,
        "latency_p50_s": 0.0,
        "latency_p99_s": 0.0,
        "peak_rss_bytes": 0,
        "other_cpu_fraction": 0.0,
        "error": error,
    }


class ClientOutcome(Protocol):
    """One request as a closed-loop client saw it (each system's own outcome type)."""

    @property
    def ttft_s(self) -> float: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def finish(self) -> object: ...


_O = TypeVar("_O", bound=ClientOutcome)


async def closed_loop(
    requests: Sequence[BenchRequest],
    concurrency: int,
    prefix: str,
    serve: Callable[[str, BenchRequest], Awaitable[_O]],
    length: object,
) -> tuple[list[RequestResult], dict[int, list[int]]]:
    """C client tasks; each takes the next request from a shared list when its last one
    finished (``serve(request_id, request)``). A request must end by ``length`` with exactly
    its tokens. Returns the results and each request's first ``HEAD_TOKENS`` tokens."""
    pending: Iterator[BenchRequest] = iter(requests)
    results: list[RequestResult] = []
    heads: dict[int, list[int]] = {}

    async def client() -> None:
        for request in pending:
            request_id = f"{prefix}-{request.index}"
            outcome = await serve(request_id, request)
            if outcome.finish != length or len(outcome.tokens) != request.max_new_tokens:
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
