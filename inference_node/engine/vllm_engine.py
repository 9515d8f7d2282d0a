"""An :class:`~inference_node.engine.types.Engine` on vLLM's v1 ``AsyncLLM``, in the node process.

``inference_node --engine vllm`` serves a generator through vLLM instead of the built-in
batching engine, behind the same ``Node`` contract: the servicer tokenizes as always and hands
the token ids over; vLLM schedules (continuous batching, paged KV cache, its own engine-core
process), samples, detokenizes and applies stop strings. vLLM is imported only here and only
when such an engine is built, so a node without vLLM installed (the main virtualenv) never
imports it; ``make setup-vllm`` builds ``.venv-vllm`` with it.

Threads: ``AsyncLLM`` is built on a private event loop (construction blocks for the model load
and warm-up, ~90 s on 2 CPU cores, before the node registers) and that loop runs on the engine
thread (``serve`` on the main thread, or ``start``). ``submit`` on the gRPC loop hands each
request to it with ``run_coroutine_threadsafe``; deltas come back with
``call_soon_threadsafe``. Closing, dropping or cancelling a stream cancels its task, which makes
vLLM abort the request (its ``generate`` aborts on cancellation) and free its KV blocks.

Mapping: Sluice's classes go to vLLM's ``priority`` scheduling (``scheduling_policy="priority"``;
lower runs first, then earlier ``arrival_time``: REALTIME 0, BATCH 1, FINETUNE 2, except that
a REALTIME prompt with a first-token budget goes as late among the waiting BATCH prompts as
its budget allows, and none goes ahead of a waiting REALTIME prompt: it then takes BATCH's
rank and an ``arrival_time`` between its neighbours': ``placement``);
``SamplingParams`` map one to one (greedy is temperature 0; EOS ids of the model are stop token
ids unless ``ignore_eos``). Load comes from vLLM's own scheduler stats (running and waiting
requests, KV cache usage, the time between its steps), read through a stat logger; vLLM knows
no classes, so its waiting count is attributed to the not-yet-started requests last in its
priority queue (the ones it holds back).
Fine-tuning and LoRA adapters are not served here (Train is refused FAILED_PRECONDITION
``MODEL_NOT_TRAINABLE`` because this is no ``BatchingEngine``; an adapter is refused at submit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from inference_node.engine.draining import Draining
from inference_node.engine.text import kv_bytes_per_token, sampling_violations
from inference_node.engine.types import (
    DeltaStream,
    DuplicateRequestError,
    EngineClosedError,
    EngineFaultError,
    EngineFullError,
    EngineRequest,
    EngineStats,
    FinishReason,
    InvalidRequestError,
    RequestTooLargeError,
    TokenDelta,
)
from inference_node.engine.vllm_mapping import (
    Placement,
    VllmStats,
    Waiting,
    finish_reason,
    placement,
    vllm_sampling,
)
from inference_node.model_types import LanguageModel
from sluice.contract import WorkloadClass

log = structlog.get_logger(__name__)

_JOIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class VllmOptions:
    """How the node sets vLLM up (from ``NodeSettings``)."""

    model_dir: Path
    """A Hugging Face checkpoint directory (config, safetensors, tokenizer)."""
    dtype: str = "float32"
    max_sequences: int = 32
    max_batched_tokens: int = 512
    kv_budget_bytes: int = 2 * 1024**3
    max_waiting: int = 256
    enforce_eager: bool = False
    """Skip torch.compile (faster start, slower steps)."""


def _tokens(job: _Job) -> int:
    return len(job.request.prompt_token_ids)


@dataclass(eq=False)
class _Job:
    request: EngineRequest
    workload_class: WorkloadClass
    seq: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenDelta | BaseException] = field(default_factory=asyncio.Queue)
    place: Placement = field(default_factory=lambda: Placement(0, 0.0))
    """Its place in vLLM's priority queue (:func:`~.vllm_mapping.placement`)."""
    started: bool = False
    """vLLM sent its first output: it is running (not waiting)."""
    generated: int = 0
    cancelled: bool = False
    future: concurrent.futures.Future[None] | None = None
    end: TokenDelta | BaseException | None = None
    """The last delta (or the error) to send once its task is done."""

    def deliver(self, item: TokenDelta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def final(self, reason: FinishReason) -> TokenDelta:
        return TokenDelta("", (), reason, len(self.request.prompt_token_ids), self.generated)


class _Stream(DeltaStream):
    """The consumer's side of one request; closing or dropping it cancels the request."""

    def __init__(self, engine: VllmEngine, job: _Job) -> None:
        self._job = job
        self._finished = False
        self._finalizer = weakref.finalize(self, engine._cancel_job, job)
        self._finalizer.atexit = False

    async def __anext__(self) -> TokenDelta:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._job.queue.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            self._finalizer.detach()
            raise item
        if item.finish_reason is not None:
            self._finished = True
            self._finalizer.detach()
        return item

    async def aclose(self) -> None:
        self._finished = True
        self._finalizer()  # cancels the request once; a no-op after it ended


class VllmEngine(Draining):
    """Generation on vLLM's ``AsyncLLM`` (module doc); implements the ``Engine`` protocol."""

    def __init__(self, lm: LanguageModel, options: VllmOptions) -> None:
        if options.max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        self._lm = lm
        self._options = options
        self._kv_per_token = kv_bytes_per_token(lm)
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._seq = itertools.count()
        self._epoch = time.monotonic() - 1.0
        """Queue keys count seconds from here: small numbers keep sub-microsecond gaps apart
        (at ``time.time()``'s 1.8e9 one float step is 0.24 us)."""
        self._closed = False
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._sink = VllmStats()
        self._tasks: set[asyncio.Task[None]] = set()
        """The requests' tasks (on the engine thread only)."""
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()
        self._served = threading.Event()
        self._shut_down = False
        started = time.monotonic()
        self._llm: Any = self._loop.run_until_complete(self._build())
        config = self._llm.vllm_config.cache_config
        blocks = int(getattr(config, "num_gpu_blocks", 0) or 0)
        self._kv_budget = (
            blocks * int(config.block_size) * self._kv_per_token
            if blocks
            else options.kv_budget_bytes
        )
        log.info(
            "vllm_engine_ready",
            model=lm.name,
            model_dir=str(options.model_dir),
            dtype=options.dtype,
            kv_blocks=blocks,
            kv_budget_bytes=self._kv_budget,
            seconds=round(time.monotonic() - started, 1),
        )

    async def _build(self) -> Any:
        """``AsyncLLM`` built inside the private loop, so its sockets and output task bind to
        it."""
        from vllm.engine.arg_utils import AsyncEngineArgs  # type: ignore[import-not-found]  # noqa: PLC0415
        from vllm.v1.engine.async_llm import AsyncLLM  # type: ignore[import-not-found]  # noqa: PLC0415

        o = self._options
        args = AsyncEngineArgs(
            model=str(o.model_dir),
            served_model_name=[self._lm.name],
            dtype=o.dtype,
            max_model_len=self._lm.max_context_tokens,
            max_num_seqs=o.max_sequences,
            max_num_batched_tokens=o.max_batched_tokens,
            kv_cache_memory_bytes=o.kv_budget_bytes,
            scheduling_policy="priority",
            enable_prefix_caching=False,
            enforce_eager=o.enforce_eager,
            disable_log_stats=True,  # our stat logger only (module doc)
            enable_logging_iteration_details=True,  # each step's rows and time: the step fit
        )
        return AsyncLLM.from_engine_args(args, stat_loggers=[self._sink])

    # -- the Engine protocol, on the caller's event loop ------------------------------------

    def submit(self, request: EngineRequest) -> DeltaStream:
        """Validate and hand ``request`` to vLLM; see :meth:`Engine.submit`."""
        workload_class = self._validate(request)
        with self._lock:
            if self._closed:
                raise EngineClosedError("engine is not accepting requests")
            if request.request_id in self._jobs:
                raise DuplicateRequestError(f"request {request.request_id!r} is already in flight")
            waiting = sum(1 for j in self._jobs.values() if not j.started and not j.cancelled)
            if waiting >= self._options.max_waiting:
                raise EngineFullError(f"{waiting} requests are already waiting")
            job = _Job(request, workload_class, next(self._seq), asyncio.get_running_loop())
            job.place = self._placement(job)
            self._jobs[request.request_id] = job
            job.future = asyncio.run_coroutine_threadsafe(self._generate(job), self._loop)
        job.future.add_done_callback(lambda _f: self._ended(job))
        return _Stream(self, job)

    def cancel(self, request_id: str) -> None:
        """Cancel a request; its stream ends with a CANCELLED delta."""
        with self._lock:
            job = self._jobs.get(request_id)
        if job is not None:
            self._cancel_job(job)

    def stats(self) -> EngineStats:
        """Per-class running and waiting (vLLM's counts, attributed), KV use, decode rate."""
        running = dict.fromkeys(WorkloadClass, 0)
        waiting = dict.fromkeys(WorkloadClass, 0)
        queued = 0
        with self._lock:
            live = [j for j in self._jobs.values() if not j.cancelled]
        unstarted = sorted((j for j in live if not j.started), key=self._order)
        held_back = min(self._sink.waiting, len(unstarted))
        held = {id(j) for j in unstarted[len(unstarted) - held_back :]} if held_back else set()
        for job in live:
            params = job.request.params
            if id(job) in held:
                waiting[job.workload_class] += 1
                queued += len(job.request.prompt_token_ids) + params.max_new_tokens
            else:
                running[job.workload_class] += 1
                queued += max(params.max_new_tokens - job.generated, 0)
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_used_bytes=int(self._sink.kv_usage * self._kv_budget) if live else 0,
            kv_budget_bytes=self._kv_budget,
            decode_tokens_per_s=self._sink.decode_rate,
            queued_tokens=queued,
            steps=self._sink.steps.snapshot(),
            step_cost=self._sink.step_model.cost,
        )

    def start(self) -> None:
        """Run vLLM's loop on a thread of its own (idempotent)."""
        if self._served.is_set():
            raise EngineClosedError("engine is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve, name=f"vllm-{self._lm.name}", daemon=True
            )
            self._thread.start()

    def serve(self) -> None:
        """Run vLLM's loop on the calling thread until :meth:`close`."""
        if self._served.is_set():
            return
        asyncio.set_event_loop(self._loop)
        self._serving.set()
        try:
            self._loop.run_forever()
        finally:
            self._shutdown_vllm()
            self._served.set()

    def close(self) -> None:
        """Cancel everything in flight, shut vLLM down (its engine-core process too)."""
        with self._lock:
            self._closed = True
            left = list(self._jobs.values())
        for job in left:
            self._cancel_job(job)
        if self._serving.is_set():
            if not self._served.is_set():
                with contextlib.suppress(RuntimeError):  # the loop already closed
                    asyncio.run_coroutine_threadsafe(self._stop_loop(), self._loop)
            if threading.current_thread() is not self._thread:
                self._served.wait(_JOIN_TIMEOUT_S)
        else:
            self._shutdown_vllm()

    # -- on the engine thread ------------------------------------------------------------------

    async def _generate(self, job: _Job) -> None:
        """Run ``job`` through vLLM, forwarding each delta; its end goes in ``job.end``, which
        :meth:`_ended` delivers (also when the task was cancelled before it ever ran)."""
        request = job.request
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            prompt = {
                "type": "token",
                "prompt_token_ids": list(request.prompt_token_ids),
                "arrival_time": job.place.key,  # its place among equal priorities
            }
            outputs = self._llm.generate(
                prompt,
                vllm_sampling(request.params, self._lm.eos_token_ids),
                request.request_id,
                priority=job.place.priority,
            )
            async for out in outputs:
                job.started = True
                delta = self._delta(job, out)
                if delta.finish_reason is not None:
                    job.end = delta
                elif delta.text or delta.token_ids:
                    job.deliver(delta)
        except Exception as exc:
            log.warning("vllm_request_failed", request_id=request.request_id, exc_info=exc)
            job.end = EngineFaultError(f"vLLM failed the request: {type(exc).__name__}")
        finally:
            self._tasks.discard(task)

    def _ended(self, job: _Job) -> None:
        """``job``'s task is done (finished, failed or cancelled): retire it, send its end."""
        self._retire(job)
        job.deliver(job.end if job.end is not None else job.final(FinishReason.CANCELLED))

    def _delta(self, job: _Job, out: Any) -> TokenDelta:
        completion = out.outputs[0]
        token_ids = tuple(int(t) for t in completion.token_ids)
        job.generated += len(token_ids)
        return TokenDelta(
            completion.text,
            token_ids,
            finish_reason(completion.finish_reason, completion.stop_reason),
            len(job.request.prompt_token_ids),
            job.generated,
        )

    async def _stop_loop(self) -> None:
        """Cancel the requests' tasks (vLLM aborts them), then vLLM's output task (before
        its engine core goes away under it), then stop the loop."""
        handler = getattr(self._llm, "output_handler", None)
        # Only these two: vLLM's own tasks (its engine-core client's socket reader) must
        # outlive the output task, which would otherwise fail on a "dead" engine.
        for group in (list(self._tasks), [handler] if handler is not None else []):
            for task in group:
                task.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*group, return_exceptions=True)
        self._loop.stop()

    def _shutdown_vllm(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        try:
            self._llm.shutdown()
        except Exception as exc:  # a dead engine core: nothing more to free
            log.warning("vllm_shutdown_failed", error=repr(exc))
        log.info("vllm_engine_closed", model=self._lm.name)

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _order(job: _Job) -> tuple[int, float]:
        return job.place.priority, job.place.key

    def _placement(self, job: _Job) -> Placement:
        """``job``'s place in vLLM's queue, from the prompts waiting there (under the lock)."""
        live = [j for j in self._jobs.values() if not j.cancelled]
        band = WorkloadClass.BATCH.rank
        unstarted = sorted((j for j in live if not j.started), key=self._order)
        higher = [j for j in unstarted if j.place.priority < band]
        waiting = [
            Waiting(j.place.key, j.workload_class is WorkloadClass.REALTIME, _tokens(j))
            for j in unstarted
            if j.place.priority == band
        ]
        return placement(
            job.workload_class,
            job.request.first_token_budget_s,
            _tokens(job),
            waiting,
            sum(_tokens(j) for j in higher),
            sum(1 for j in live if j.started),
            self._options.max_batched_tokens,
            self._sink.step_model.cost,
            time.monotonic() - self._epoch,
            seats=self._options.max_sequences - len(higher),
        )

    def _cancel_job(self, job: _Job) -> None:
        """Cancel ``job``'s task (vLLM aborts the request); any thread, idempotent."""
        with self._lock:
            if job.cancelled or job.request.request_id not in self._jobs:
                return
            job.cancelled = True
            future = job.future
        if future is not None:
            future.cancel()

    def _retire(self, job: _Job) -> None:
        with self._lock:
            if self._jobs.get(job.request.request_id) is job:
                del self._jobs[job.request.request_id]
            if self._jobs:
                return
            waiters, self._idle_waiters = self._idle_waiters, []
        for loop, idle in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(idle.set)

    def _validate(self, request: EngineRequest) -> WorkloadClass:
        """Every rule ``request`` breaks (:class:`InvalidRequestError`), then
        :class:`RequestTooLargeError`; returns its class (0 read as REALTIME)."""
        params = request.params
        prompt = request.prompt_token_ids
        violations = sampling_violations(params)
        if not prompt:
            violations.append(("prompt", "the prompt is empty"))
        elif min(prompt) < 0 or max(prompt) >= self._lm.vocab_size:
            violations.append(("prompt", f"token ids must be in [0, {self._lm.vocab_size})"))
        if params.max_new_tokens < 1:
            violations.append(("options.max_new_tokens", "must be at least 1"))
        if request.adapter:
            violations.append(
                ("adapter", f"{self._lm.name!r} runs on the vLLM engine, which serves no adapters")
            )
        workload_class = WorkloadClass.REALTIME
        try:
            workload_class = WorkloadClass.from_wire(request.workload_class)
        except ValueError:
            violations.append(("workload_class", f"unknown value {int(request.workload_class)}"))
        total = len(prompt) + params.max_new_tokens
        if total > self._lm.max_context_tokens:
            violations.append(
                (
                    "options.max_new_tokens",
                    f"prompt ({len(prompt)} tokens) plus max_new_tokens ({params.max_new_tokens})"
                    f" exceeds the context of {self._lm.max_context_tokens} tokens",
                )
            )
        if violations:
            raise InvalidRequestError(violations)
        if total * self._kv_per_token > self._kv_budget:
            raise RequestTooLargeError(
                f"request needs {total * self._kv_per_token} bytes of KV cache, "
                f"more than the budget of {self._kv_budget} bytes"
            )
        return workload_class
