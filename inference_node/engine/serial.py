"""A simple engine that serves one request at a time on a dedicated thread.

One daemon thread owns the model. :meth:`SerialEngine.submit` (on the event loop) validates a
request and hands it to that thread through a :class:`queue.Queue`; the thread picks the next
request in priority order (lowest workload class first, then first come first served), prefills
its prompt once, then decodes one token per step with the model's KV cache, and sends each
:class:`TokenDelta` back with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import math
import queue
import threading
import time
import weakref
from typing import Any

import structlog
import torch

from inference_node.engine.types import (
    WORKLOAD_CLASSES,
    WORKLOAD_REALTIME,
    DeltaStream,
    EngineClosedError,
    EngineFullError,
    EngineRequest,
    EngineStats,
    FinishReason,
    SamplingParams,
    TokenDelta,
)
from inference_node.models import LanguageModel

log = structlog.get_logger(__name__)

_EWMA_ALPHA = 0.2
_JOIN_TIMEOUT_S = 30.0


class _State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


class _Job:
    """Engine-side state of one request. ``state`` changes only under the engine's lock."""

    def __init__(self, request: EngineRequest, workload_class: int, seq: int) -> None:
        self.request = request
        self.workload_class = workload_class
        self.seq = seq
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()
        self.state = _State.WAITING
        self.cancel_requested = False
        self.generated = 0

    def deliver(self, item: TokenDelta | BaseException) -> None:
        """Hand ``item`` to the consumer's loop; a closed loop cancels the request."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.cancel_requested = True

    def final(self, reason: FinishReason) -> TokenDelta:
        """An empty last delta finishing the request with ``reason``."""
        return TokenDelta("", (), reason, len(self.request.prompt_token_ids), self.generated)


class _DeltaStream(DeltaStream):
    """The consumer's view of a request; closing, dropping or cancelling it cancels the job."""

    def __init__(self, engine: SerialEngine, job: _Job) -> None:
        self._engine = engine
        self._job = job
        self._finished = False
        # Garbage collection may run this in any thread, even one holding the engine's lock,
        # so it only flags the job; the engine retires it without re-entering the lock.
        self._finalizer = weakref.finalize(self, engine._abandon, job)
        self._finalizer.atexit = False

    async def __anext__(self) -> TokenDelta:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._job.queue.get()
        except asyncio.CancelledError:
            self._stop()
            raise
        if isinstance(item, BaseException):
            self._stop()
            raise item
        if item.finish_reason is not None:
            self._finished = True
            self._finalizer.detach()
        return item

    async def aclose(self) -> None:
        """Stop iterating and cancel the request if it is still in flight."""
        self._stop()

    def _stop(self) -> None:
        self._finished = True
        if self._finalizer.detach() is not None:  # only once
            self._engine._cancel_job(self._job)


class SerialEngine:
    """Serves requests one at a time, in priority order, on one model-owning thread."""

    def __init__(
        self, lm: LanguageModel, *, max_waiting: int = 256, kv_budget_bytes: int | None = None
    ) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        self._lm = lm
        self._max_waiting = max_waiting
        self._kv_per_token = _kv_bytes_per_token(lm)
        self._kv_budget = (
            kv_budget_bytes
            if kv_budget_bytes is not None
            else self._kv_per_token * lm.max_context_tokens
        )
        self._vocab_size = int(lm.model.get_input_embeddings().num_embeddings)
        self._eos_ids = _eos_ids(lm)
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        self._abandoned: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._seq = itertools.count()
        self._closed = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._kv_used = 0
        self._decode_rate = 0.0

    # -- asyncio side ---------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> DeltaStream:
        """Validate and queue ``request``; see :meth:`Engine.submit`."""
        workload_class = self._validate(request)
        self._reap()
        with self._lock:
            if self._closed:
                raise EngineClosedError("engine is not accepting requests")
            if request.request_id in self._jobs:
                raise ValueError(f"request {request.request_id!r} is already in flight")
            waiting = sum(
                1
                for j in self._jobs.values()
                if j.state is _State.WAITING and not j.cancel_requested
            )
            if waiting >= self._max_waiting:
                raise EngineFullError(f"{waiting} requests are already waiting")
            job = _Job(request, workload_class, next(self._seq))
            self._jobs[request.request_id] = job
        self._inbox.put(job)
        return _DeltaStream(self, job)

    def cancel(self, request_id: str) -> None:
        """Cancel ``request_id``: at once if waiting, at the next step if running."""
        with self._lock:
            job = self._jobs.get(request_id)
        if job is not None:
            self._cancel_job(job)

    def stats(self) -> EngineStats:
        """Per-class counts, KV use and budget, decode rate and outstanding tokens."""
        running = dict.fromkeys(WORKLOAD_CLASSES, 0)
        waiting = dict.fromkeys(WORKLOAD_CLASSES, 0)
        queued = 0
        self._reap()
        with self._lock:
            for job in self._jobs.values():
                params = job.request.params
                if job.cancel_requested:
                    continue
                if job.state is _State.RUNNING:
                    running[job.workload_class] += 1
                    queued += max(params.max_new_tokens - job.generated, 0)
                elif job.state is _State.WAITING:
                    waiting[job.workload_class] += 1
                    queued += len(job.request.prompt_token_ids) + params.max_new_tokens
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_used_bytes=self._kv_used,
            kv_budget_bytes=self._kv_budget,
            decode_tokens_per_s=self._decode_rate,
            queued_tokens=queued,
        )

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - the Engine interface
        """Refuse new requests, wait up to ``timeout`` s for in-flight ones, cancel the rest.

        Cancelled running requests end at the engine's next step.
        """
        loop = asyncio.get_running_loop()
        idle = asyncio.Event()
        with self._lock:
            self._closed = True
            if self._jobs:
                self._idle_waiters.append((loop, idle))
            else:
                idle.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await idle.wait()
        with self._lock:
            left = list(self._jobs.values())
        for job in left:
            self._cancel_job(job)
        log.info("engine_drained", model=self._lm.name, cancelled=len(left))

    def start(self) -> None:
        """Start the engine thread (idempotent); ``EngineClosedError`` after :meth:`close`."""
        if self._stopping.is_set():
            raise EngineClosedError("engine is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"serial-engine-{self._lm.name}", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Cancel everything in flight, stop the engine thread and join it."""
        with self._lock:
            self._closed = True
            left = list(self._jobs.values())
        self._stopping.set()
        self._inbox.put(None)
        for job in left:
            self._cancel_job(job)
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("engine_thread_join_timeout", model=self._lm.name)

    def _validate(self, request: EngineRequest) -> int:
        params = request.params
        prompt = request.prompt_token_ids
        if not prompt:
            raise ValueError("the prompt is empty")
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise ValueError("temperature must be a finite number >= 0")
        if not 0 < params.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if any(not s for s in params.stop):
            raise ValueError("stop strings must not be empty")
        if request.workload_class not in (0, *WORKLOAD_CLASSES):
            raise ValueError(f"unknown workload class {request.workload_class}")
        total = len(prompt) + params.max_new_tokens
        if total > self._lm.max_context_tokens:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens})"
                f" exceeds the context of {self._lm.max_context_tokens} tokens"
            )
        if total * self._kv_per_token > self._kv_budget:
            raise ValueError(f"request needs more than the KV budget of {self._kv_budget} bytes")
        if min(prompt) < 0 or max(prompt) >= self._vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self._vocab_size})")
        return request.workload_class or WORKLOAD_REALTIME

    def _abandon(self, job: _Job) -> None:
        """Flag a job whose stream was garbage collected; lock-free, any thread."""
        job.cancel_requested = True
        self._abandoned.put(job)

    def _reap(self) -> None:
        """Cancel the jobs of streams that were garbage collected."""
        while True:
            try:
                job = self._abandoned.get_nowait()
            except queue.Empty:
                return
            self._cancel_job(job)

    def _cancel_job(self, job: _Job) -> None:
        """Cancel ``job``: end it now if waiting, flag it for the engine thread if running."""
        with self._lock:
            if job.state is _State.DONE:
                return
            job.cancel_requested = True
            if job.state is _State.RUNNING:
                return
            self._retire(job)
        job.deliver(job.final(FinishReason.CANCELLED))

    def _retire(self, job: _Job) -> None:
        """Mark ``job`` done, forget it, wake drains once idle; the caller holds the lock."""
        job.state = _State.DONE
        if self._jobs.get(job.request.request_id) is job:
            del self._jobs[job.request.request_id]
        if not self._jobs:
            for loop, idle in self._idle_waiters:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(idle.set)
            self._idle_waiters.clear()

    def _finish(self, job: _Job, item: TokenDelta | BaseException) -> None:
        """End the running ``job`` with ``item``; called on the engine thread only."""
        self._kv_used = 0
        with self._lock:
            self._retire(job)
        job.deliver(item)

    # -- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        heap: list[tuple[int, int, _Job]] = []
        log.info("engine_started", model=self._lm.name, kv_budget_bytes=self._kv_budget)
        while not self._stopping.is_set():
            job = self._next_job(heap)
            if job is not None:
                self._serve(job)
        log.info("engine_stopped", model=self._lm.name)

    def _next_job(self, heap: list[tuple[int, int, _Job]]) -> _Job | None:
        """Move new arrivals into ``heap`` (blocking while idle) and claim the best one."""
        block = not heap
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                break
            if item is None:
                return None
            heapq.heappush(heap, (item.workload_class, item.seq, item))
            block = False
        while heap:
            _, _, job = heapq.heappop(heap)
            with self._lock:
                if job.state is not _State.WAITING:
                    continue
                if not job.cancel_requested:
                    job.state = _State.RUNNING
                    return job
                self._retire(job)
            job.deliver(job.final(FinishReason.CANCELLED))
        return None

    def _serve(self, job: _Job) -> None:
        try:
            self._generate(job)
        except Exception as exc:
            log.exception(
                "engine_request_failed", model=self._lm.name, request_id=job.request.request_id
            )
            self._finish(job, exc)
        finally:
            self._kv_used = 0

    def _generate(self, job: _Job) -> None:
        """Prefill, then decode token by token, streaming stable text until a stop condition."""
        params = job.request.params
        prompt_len = len(job.request.prompt_token_ids)
        model, tokenizer, device = self._lm.model, self._lm.tokenizer, self._lm.device
        generator = _make_generator(params, device)
        generated: list[int] = []
        emitted = ""
        cache: Any = None
        with torch.inference_mode():
            input_ids = torch.tensor(
                [job.request.prompt_token_ids], dtype=torch.long, device=device
            )
            while True:
                if job.cancel_requested or self._stopping.is_set():
                    self._finish(job, job.final(FinishReason.CANCELLED))
                    return
                started = time.perf_counter()
                out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
                token = _sample(out.logits[0, -1].float(), params, generator)
                if generated:
                    self._record_decode_step(time.perf_counter() - started)
                generated.append(token)
                job.generated = len(generated)
                self._kv_used = _cache_bytes(cache, self._kv_per_token)

                text = tokenizer.decode(generated)
                reason, final_text = self._finish_reason(token, len(generated), text, params)
                if reason is not None:
                    delta = TokenDelta(
                        final_text[len(emitted) :], (token,), reason, prompt_len, len(generated)
                    )
                    self._finish(job, delta)
                    return
                stable = text.rstrip("\ufffd")
                stable = stable[: len(stable) - _held_back(stable, params.stop)]
                piece = ""
                if len(stable) > len(emitted) and stable.startswith(emitted):
                    piece, emitted = stable[len(emitted) :], stable
                job.deliver(TokenDelta(piece, (token,), None, prompt_len, len(generated)))
                input_ids = torch.tensor([[token]], dtype=torch.long, device=device)

    def _finish_reason(
        self, token: int, count: int, text: str, params: SamplingParams
    ) -> tuple[FinishReason | None, str]:
        """The reason to stop after ``token`` (if any) and the completion's final text."""
        found = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        if found:
            return FinishReason.STOP, text[: min(found)]
        if token in self._eos_ids and not params.ignore_eos:
            return FinishReason.EOS, text
        if count >= params.max_new_tokens:
            return FinishReason.LENGTH, text
        return None, text

    def _record_decode_step(self, seconds: float) -> None:
        rate = 1.0 / max(seconds, 1e-9)
        previous = self._decode_rate
        self._decode_rate = rate if previous == 0 else previous + _EWMA_ALPHA * (rate - previous)


def _make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator seeded from ``params.seed`` (random if unset); none if greedy."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0, else temperature plus nucleus (top-p) sampling."""
    if generator is None:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could be the start of a stop string."""
    longest = min(max((len(s) for s in stops), default=0) - 1, len(text))
    for size in range(longest, 0, -1):
        tail = text[-size:]
        if any(s.startswith(tail) for s in stops):
            return size
    return 0


def _eos_ids(lm: LanguageModel) -> frozenset[int]:
    ids: set[int] = set()
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    configured = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured)
    return frozenset(ids)


def _kv_bytes_per_token(lm: LanguageModel) -> int:
    """2 (K and V) x layers x KV heads x head size x bytes per element."""
    config = lm.model.config
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(getattr(config, "hidden_size", 0)) // heads
    layers = int(getattr(config, "num_hidden_layers", 0))
    element = torch.empty((), dtype=lm.dtype).element_size()
    return 2 * layers * kv_heads * int(head_dim) * element


def _cache_bytes(cache: Any, per_token: int) -> int:
    """Bytes held by the live KV cache tensors, or an estimate from its length."""
    total = 0
    for layer in getattr(cache, "layers", None) or ():
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    if total == 0 and cache is not None and hasattr(cache, "get_seq_length"):
        total = per_token * int(cache.get_seq_length())
    return total
