"""What every engine shares: the request lifecycle between the event loop and the engine thread.

:meth:`ThreadedEngine.submit` (on the event loop) validates a request and hands it to the
model-owning thread through a :class:`queue.Queue`; that thread sends each :class:`TokenDelta`
back with ``loop.call_soon_threadsafe``. Closing, dropping or cancelling a stream cancels its
request: at once while it waits, at the engine's next step while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import math
import queue
import threading
import time
import weakref

import structlog

from inference_node.engine.draining import Draining
from inference_node.engine.step_model import StepModel
from inference_node.engine.step_times import StepTimes
from inference_node.engine.text import checked_request, kv_bytes_per_token
from inference_node.engine.types import (
    DeltaStream,
    DuplicateRequestError,
    EngineClosedError,
    EngineFullError,
    EngineRequest,
    EngineStats,
    FinishReason,
    RequestFaultError,
    RequestTooLargeError,
    TokenDelta,
    joined,
)
from inference_node.model_types import LanguageModel
from sluice.contract import WorkloadClass

log = structlog.get_logger(__name__)

_EWMA_ALPHA = 0.2
_SLOW_ALPHA = 0.05
"""The prefill carried per step is averaged over ~20 steps: a sequence's remaining decode
spans many, and one step's prompts say little of the next ones'."""
_JOIN_TIMEOUT_S = 30.0


class JobState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DONE = "done"


class Wake:
    """Put in an engine's inbox to make its thread look at its state again (a fine-tune
    handed to it or stopped)."""


WAKE = Wake()


class Job:
    """Engine-side state of one request. ``state`` changes only under the engine's lock."""

    def __init__(self, request: EngineRequest, workload_class: WorkloadClass, seq: int) -> None:
        self.arrived = time.perf_counter()
        """When it was submitted (``time.perf_counter``): training units measure from it
        how long the request waited for them."""
        self.request = request
        self.workload_class = workload_class
        self.seq = seq
        left = request.time_left_s
        self.deadline = time.monotonic() + left if left > 0 else math.inf
        """Its caller's deadline (``time.monotonic``; infinite: none)."""
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenDelta | BaseException] = asyncio.Queue()
        self.state = JobState.WAITING
        self.cancel_requested = False
        self.generated = 0
        self.pinned = False
        """Kept from preemption, first to wait (:mod:`inference_node.engine.promises`)."""

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

    def __init__(self, engine: ThreadedEngine, job: Job) -> None:
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
        item = self._merge_pending(item)
        if item.finish_reason is not None:
            self._finished = True
            self._finalizer.detach()
        return item

    def _merge_pending(self, item: TokenDelta) -> TokenDelta:
        """``item`` merged with the deltas that queued up behind it while the consumer was
        busy (vLLM's output collector does the same): a consumer that falls behind is sent
        fewer, larger chunks instead of a growing backlog of one-token messages, and one that
        keeps up gets every token as it comes. An error behind them is raised next call."""
        queue_ = self._job.queue
        if queue_.empty() or item.finish_reason is not None:
            return item
        merged = [item]
        while not queue_.empty() and merged[-1].finish_reason is None:
            nxt = queue_.get_nowait()
            if isinstance(nxt, BaseException):
                queue_.put_nowait(nxt)  # nothing else can follow an error
                break
            merged.append(nxt)
        return joined(merged)

    async def aclose(self) -> None:
        """Stop iterating and cancel the request if it is still in flight."""
        self._stop()

    def _stop(self) -> None:
        self._finished = True
        if self._finalizer.detach() is not None:  # only once
            self._engine._cancel_job(self._job)


class ThreadedEngine(Draining):
    """The asyncio side every engine shares: submit, cancel, stats, drain, start, close.

    A subclass implements ``_run`` (the model-owning thread's loop) and may override
    ``_check_fits`` (capacity checks at submit) and ``_thread_name``.
    """

    _thread_name = "engine"
    _prefills_beside_decode = True
    """A prompt's prefill runs in the steps that decode the others, so the prompts ahead of a
    new one are what it waits for (stats tell them); False where a request runs alone."""
    paces_prompts = False
    """Its steps take the prompt tokens their chunking allows, whatever the streams' pace."""

    def __init__(
        self, lm: LanguageModel, *, max_waiting: int = 256, kv_budget_bytes: int | None = None
    ) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        self._lm = lm
        self._max_waiting = max_waiting
        self._kv_per_token = kv_bytes_per_token(lm)
        self._kv_budget = (
            kv_budget_bytes
            if kv_budget_bytes is not None
            else self._kv_per_token * lm.max_context_tokens
        )
        self._vocab_size = lm.vocab_size
        self._eos_ids = lm.eos_token_ids
        self._inbox: queue.Queue[Job | Wake | None] = queue.Queue()
        self._abandoned: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._seq = itertools.count()
        self._closed = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._kv_used = 0
        self._decode_rate = 0.0
        self.prefill_per_step = 0.0
        """Prompt tokens a decode step prefilled lately (a slow average; engine thread)."""
        self.step_times = StepTimes()
        """Durations of the steps that decoded (engine thread; read by the node's metrics)."""
        self.step_model = StepModel()
        """Step time against decode rows and prefilled tokens (engine thread; load reports)."""

    # -- asyncio side ---------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> DeltaStream:
        """Validate and queue ``request``; see :meth:`Engine.submit`."""
        workload_class = self._validate(request)
        self._reap()
        with self._lock:
            if self._closed:
                raise EngineClosedError("engine is not accepting requests")
            if request.request_id in self._jobs:
                raise DuplicateRequestError(f"request {request.request_id!r} is already in flight")
            waiting = sum(
                1
                for j in self._jobs.values()
                if j.state is JobState.WAITING and not j.cancel_requested
            )
            if waiting >= self._max_waiting:
                raise EngineFullError(f"{waiting} requests are already waiting")
            job = Job(request, workload_class, next(self._seq))
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
        """Per-class counts, KV use and budget, decode rate, outstanding tokens and (where
        prefill runs beside decode) the prompt tokens ahead of a REALTIME prompt: the running
        ones not yet at their first token, then the waiting REALTIME and pinned ones."""
        running = dict.fromkeys(WorkloadClass, 0)
        waiting = dict.fromkeys(WorkloadClass, 0)
        queued = pinned = ahead = 0
        self._reap()
        with self._lock:
            for job in self._jobs.values():
                params = job.request.params
                if job.cancel_requested:
                    continue
                if job.state is JobState.RUNNING:
                    running[job.workload_class] += 1
                    pinned += job.pinned
                    queued += max(params.max_new_tokens - job.generated, 0)
                    ahead += 0 if job.generated else len(job.request.prompt_token_ids)
                elif job.state is JobState.WAITING:
                    waiting[job.workload_class] += 1
                    pinned += job.pinned
                    queued += len(job.request.prompt_token_ids) + params.max_new_tokens
                    if job.pinned or job.workload_class.is_top:
                        ahead += len(job.request.prompt_token_ids) + job.generated
        adapter_bytes, adapter_budget = self._adapter_bytes()
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_used_bytes=self._kv_used,
            kv_budget_bytes=self._kv_budget_now(),
            decode_tokens_per_s=self._decode_rate,
            queued_tokens=queued,
            adapter_bytes=adapter_bytes,
            adapter_budget_bytes=adapter_budget,
            steps=self.step_times.snapshot(),
            step_cost=self.step_model.cost,
            pinned=pinned,
            realtime_ahead_tokens=ahead if self._prefills_beside_decode else None,
        )

    def start(self) -> None:
        """Start the engine thread (idempotent); ``EngineClosedError`` after :meth:`close`."""
        if self._stopping.is_set():
            raise EngineClosedError("engine is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"{self._thread_name}-{self._lm.name}", daemon=True
            )
            self._thread.start()

    def serve(self) -> None:
        """Run the engine loop on the calling thread until :meth:`close` (instead of
        :meth:`start`). Nodes and benchmarks call it on the main thread and run asyncio on a
        helper one (docs/decisions/node-engine-main-thread.md)."""
        if self._thread is not None:
            raise RuntimeError("engine already runs on its own thread")
        if not self._stopping.is_set():  # closed before it got here: nothing to serve
            self._run()

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

    def _validate(self, request: EngineRequest) -> WorkloadClass:
        """Check ``request`` against the model and budget: every rule it breaks at once
        (:class:`InvalidRequestError`, :func:`~.text.checked_request`), then
        :class:`RequestTooLargeError`; returns its class."""
        workload_class, total = checked_request(
            request,
            self._vocab_size,
            self._lm.max_context_tokens,
            self._adapter_violations(request.adapter),
        )
        self._check_fits(total)
        return workload_class

    def _adapter_violations(self, reference: str) -> list[tuple[str, str]]:
        """Why a request naming adapter ``reference`` is refused at submit (empty: accepted
        so far; whether the adapter exists is found out when it loads). This engine serves
        none."""
        return [("adapter", f"{self._lm.name!r} is not served with adapters")] if reference else []

    def _adapter_bytes(self) -> tuple[int, int]:
        """Bytes of LoRA adapters held for this engine, and the most it may hold."""
        return 0, 0

    def _kv_budget_now(self) -> int:
        """Bytes the KV cache may use now (less than the budget while a fine-tune holds part
        of it)."""
        return self._kv_budget

    def _check_fits(self, total_tokens: int) -> None:
        """Raise :class:`RequestTooLargeError` when a request of ``total_tokens`` can never fit."""
        if total_tokens * self._kv_per_token > self._kv_budget:
            raise RequestTooLargeError(
                f"request needs {total_tokens * self._kv_per_token} bytes of KV cache, "
                f"more than the budget of {self._kv_budget} bytes"
            )

    def _run(self) -> None:
        """The engine thread's loop (owns the model)."""
        raise NotImplementedError

    def _abandon(self, job: Job) -> None:
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

    def _cancel_job(self, job: Job) -> None:
        """Cancel ``job``: end it now if waiting, flag it for the engine thread if running."""
        with self._lock:
            if job.state is JobState.DONE:
                return
            job.cancel_requested = True
            if job.state is JobState.RUNNING:
                return
            self._retire(job)
        job.deliver(job.final(FinishReason.CANCELLED))

    def _retire(self, job: Job) -> None:
        """Mark ``job`` done, forget it, wake drains once idle; the caller holds the lock."""
        job.state = JobState.DONE
        if self._jobs.get(job.request.request_id) is job:
            del self._jobs[job.request.request_id]
        if not self._jobs:
            for loop, idle in self._idle_waiters:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(idle.set)
            self._idle_waiters.clear()

    def _finish(self, job: Job, item: TokenDelta | BaseException) -> None:
        """End the running ``job`` with ``item``; called on the engine thread only."""
        with self._lock:
            self._retire(job)
        job.deliver(item)

    def _request_fault(self, job: Job, stage: str, exc: BaseException) -> RequestFaultError:
        """The error that ends ``job`` alone after ``exc`` was raised while processing its own
        tokens; logged once with the traceback. The message names the stage, not internals
        (a :class:`~inference_node.engine.text.SamplingError` says what was wrong)."""
        log.warning(
            "engine_request_fault",
            model=self._lm.name,
            request_id=job.request.request_id,
            stage=stage,
            error=type(exc).__name__,
            exc_info=exc,
        )
        message = f"{stage} failed for this request"
        if isinstance(exc, ArithmeticError):
            message += f": {exc}"
        fault = RequestFaultError(stage, message)
        fault.__cause__ = exc
        return fault

    def _record_decode_step(self, seconds: float, tokens: int = 1, prefilled: int = 0) -> None:
        """Fold one decode step (``tokens`` tokens in ``seconds``, ``prefilled`` prompt tokens
        riding along) into the EWMA rate, the step-time histogram and the step-cost fit."""
        self.step_times.observe(seconds)
        self.step_model.observe(seconds, tokens, prefilled)
        rate = tokens / max(seconds, 1e-9)
        previous = self._decode_rate
        self._decode_rate = rate if previous == 0 else previous + _EWMA_ALPHA * (rate - previous)
        self.prefill_per_step += _SLOW_ALPHA * (prefilled - self.prefill_per_step)
