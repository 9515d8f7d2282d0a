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

Mapping: Sluice's classes go to vLLM's ``priority`` scheduling (lower runs first: REALTIME 0,
BATCH 1, FINETUNE 2; then the earlier ``arrival_time``, set to the prompt's prefill finish tag,
``finish_tag``), except that a REALTIME prompt with a first-token budget goes as late among the
waiting BATCH prompts as its budget allows, at BATCH's rank keyed between its neighbours, and
no later prompt goes ahead of one placed there (``placement``). vLLM preempts only for KV
cache, so with every seat taken a REALTIME prompt would wait for some stream to end: after each
step the node preempts a running lower-class request for each REALTIME one vLLM holds back,
and sends it again later with its output so far as prompt (``_seat_realtime``). vLLM also runs
a begun prefill before any waiting prompt: the lower-class ones go back to its queue before a
REALTIME prompt is sent (``pause_prefills``; prefix caching keeps their blocks). Sampling maps
one to one (greedy is temperature 0; the model's EOS ids stop unless ``ignore_eos``). Load
comes from vLLM's scheduler stats (running and waiting requests, KV use, step times) through a
stat logger; its waiting count goes to the not-yet-started requests last in its queue.
Fine-tuning and LoRA adapters are not served here (Train is refused FAILED_PRECONDITION
``MODEL_NOT_TRAINABLE`` because this is no ``BatchingEngine``; an adapter is refused at submit).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from dataclasses import replace
from typing import Any

import structlog

from inference_node.engine.draining import Draining
from inference_node.engine.pace import pace_args
from inference_node.engine.step_model import StepCost
from inference_node.engine.text import kv_bytes_per_token
from inference_node.engine.types import (
    DeltaStream,
    DuplicateRequestError,
    EngineClosedError,
    EngineFaultError,
    EngineFullError,
    EngineRequest,
    EngineStats,
    FinishReason,
    TokenDelta,
)
from inference_node.engine.vllm_jobs import (
    Job,
    JobStream,
    load,
    pause_prefills,
    prefill_s,
    prefill_tokens,
    resumed_place,
    seat,
    validate,
)
from inference_node.engine.vllm_mapping import (
    FirstTokenCalibration,
    Placement,
    Seat,
    VllmOptions,
    VllmStats,
    Waiting,
    engine_args,
    finish_reason,
    finish_tag,
    held_by_vllm,
    placement,
    seat_preemptions,
    vllm_sampling,
)
from inference_node.model_types import LanguageModel
from sluice.contract import WorkloadClass

log = structlog.get_logger(__name__)

_JOIN_TIMEOUT_S = 30.0
SEATING_STEPS = 3
"""vLLM steps a preemption has to seat its REALTIME prompt (the abort reaches vLLM's engine
core, which may have scheduled the next step already) before one still held back gets another
(the seat may have gone to a prompt ahead of it)."""


class VllmEngine(Draining):
    """Generation on vLLM's ``AsyncLLM`` (module doc); implements the ``Engine`` protocol."""

    def __init__(self, lm: LanguageModel, options: VllmOptions) -> None:
        if options.max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        self._lm = lm
        self._options = options
        self._kv_per_token = kv_bytes_per_token(lm)
        self._lock = threading.RLock()  # a stream's finalizer may run where it is held
        self._jobs: dict[str, Job] = {}
        self._seq = itertools.count()
        self._epoch = time.monotonic() - 1.0
        """Queue keys count seconds from here: small numbers keep sub-microsecond gaps apart
        (at ``time.time()``'s 1.8e9 one float step is 0.24 us)."""
        self._closed = False
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._sink = VllmStats()
        self._sink.on_step = self._seat_realtime
        self._calibration = FirstTokenCalibration()
        """How late REALTIME first tokens came against their prediction (under the lock)."""
        self._steps = 0
        """vLLM steps seen (engine thread): a preemption seats its REALTIME prompt within
        ``SEATING_STEPS`` of them, or one still held back gets another."""
        self._tasks: set[asyncio.Task[None]] = set()  # the requests' (engine thread only)
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

        args = AsyncEngineArgs(**engine_args(self._options, self._lm))
        return AsyncLLM.from_engine_args(args, stat_loggers=[self._sink])

    # -- the Engine protocol, on the caller's event loop ------------------------------------

    def submit(self, request: EngineRequest) -> DeltaStream:
        """Validate and hand ``request`` to vLLM; see :meth:`Engine.submit`."""
        workload_class = validate(request, self._lm, self._kv_per_token, self._kv_budget)
        with self._lock:
            if self._closed:
                raise EngineClosedError("engine is not accepting requests")
            if request.request_id in self._jobs:
                raise DuplicateRequestError(f"request {request.request_id!r} is already in flight")
            waiting = sum(1 for j in list(self._jobs.values()) if j.new_and_waiting)
            if waiting >= self._options.max_waiting:
                raise EngineFullError(f"{waiting} requests are already waiting")
            job = Job(request, workload_class, next(self._seq), asyncio.get_running_loop())
            job.place = self._placement(job)
            self._jobs[request.request_id] = job
            job.future = asyncio.run_coroutine_threadsafe(self._generate(job), self._loop)
        job.future.add_done_callback(lambda _f: self._ended(job))
        return JobStream(job, self._cancel_job)

    def cancel(self, request_id: str) -> None:
        """Cancel a request; its stream ends with a CANCELLED delta."""
        with self._lock:
            job = self._jobs.get(request_id)
        if job is not None:
            self._cancel_job(job)

    @property
    def paces_prompts(self) -> bool:
        """True with the pace cap on (``--vllm-pace``): its scheduler caps each step's prompt
        tokens of a class below a stream out of slack (:mod:`~inference_node.engine.vllm_pace`)."""
        return self._options.pace

    def stats(self) -> EngineStats:
        """Per-class running and waiting (vLLM's counts, attributed), KV use, decode rate, the
        lower-class streams REALTIME cannot unseat (``pinned``), prompt tokens ahead (``load``)."""
        now, rows, cost = time.monotonic(), self._options.max_sequences, self._sink.step_model.cost
        with self._lock:
            live = [j for j in list(self._jobs.values()) if not j.cancelled]
            kept = [j for j in live if j.started and not j.workload_class.is_top]
            pinned = sum(1 for j in kept if not self._seat(j, now, rows, cost).movable)
            hits = self._sink.prefix_hits.ratio() if self._options.prefix_caching else None
        unstarted = sorted((j for j in live if not j.started), key=self._order)
        held = held_by_vllm(unstarted, self._sink.waiting)
        steps = self._options.max_batched_tokens if self._options.prefix_caching else None
        running, waiting, queued, ahead = load(live, {id(j) for j in held}, steps)
        return EngineStats(
            running=running,
            waiting=waiting,
            kv_used_bytes=int(self._sink.kv_usage * self._kv_budget) if live else 0,
            kv_budget_bytes=self._kv_budget,
            decode_tokens_per_s=self._sink.decode_rate,
            queued_tokens=queued,
            steps=self._sink.steps.snapshot(),
            step_cost=cost,
            pinned=pinned,
            realtime_ahead_tokens=ahead,
            prefix_hit_ratio=hits,
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

    async def _generate(self, job: Job) -> None:
        """Run ``job`` through vLLM (a REALTIME one after pausing lower-class prefills),
        forwarding each delta, again from where it stopped after each preemption or pause; its
        end goes in ``job.end``, which :meth:`_ended` delivers (also if cancelled unrun)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self._options.prefix_caching and job.place.priority == WorkloadClass.REALTIME.rank:
                with self._lock:
                    jobs, step = list(self._jobs.values()), self._options.max_batched_tokens
                    pause_prefills(jobs, job, self._sink.waiting, (self._steps, step), self._order)
            while True:
                job.run = run = asyncio.ensure_future(self._run_once(job))
                try:
                    await asyncio.wait({run})
                except asyncio.CancelledError:  # the caller went away: vLLM aborts it
                    if not job.preempted:  # else its cancel is in flight: let it abort
                        run.cancel()
                    await asyncio.wait({run})
                    raise
                if not (run.cancelled() and job.preempted) or job.cancelled:
                    run.result()
                    return
                paused, job.pausing, job.preempted = job.pausing, False, False
                job.restarts, job.pauses = job.restarts + 1, job.pauses + paused
                with self._lock:  # lifted: at REALTIME's rank, by its tag; paused: where it was
                    if job.lifted:
                        job.place = Placement(job.workload_class.rank, job.tag)
                    elif not paused:
                        job.place = resumed_place(job, list(self._jobs.values()))
        except Exception as exc:
            log.warning("vllm_request_failed", request_id=job.request.request_id, exc_info=exc)
            job.end = EngineFaultError(f"vLLM failed the request: {type(exc).__name__}")
        finally:
            self._tasks.discard(task)

    async def _run_once(self, job: Job) -> None:
        """One vLLM request for ``job``: its prompt and output so far, for the tokens left,
        at its place in the queue."""
        request = job.request
        params = replace(
            request.params, max_new_tokens=request.params.max_new_tokens - job.generated
        )
        prompt = {
            "type": "token",
            "prompt_token_ids": [*request.prompt_token_ids, *job.token_ids],
            "arrival_time": job.place.key,  # its place among equal priorities
        }
        job.sent_step = self._steps
        pace = None
        if self._options.pace:
            exact = request.params.ignore_eos and not request.params.stop
            pace = pace_args(
                request.step_budget_s, request.params.max_new_tokens, exact,
                job.workload_class.rank, job.first_at, job.generated,
            )  # fmt: skip
        outputs = self._llm.generate(
            prompt,
            vllm_sampling(params, self._lm.eos_token_ids, pace),
            f"{request.request_id}#{job.restarts}" if job.restarts else request.request_id,
            priority=job.place.priority,
        )
        async for out in outputs:
            if not job.started:
                job.started = True
                self._first_token(job, out.num_cached_tokens)
            delta = self._delta(job, out)
            if delta.finish_reason is not None:
                job.end = delta
            elif delta.text or delta.token_ids:
                job.deliver(delta)

    def _first_token(self, job: Job, cached: int | None) -> None:
        """``job``'s first token came (engine thread): a new prompt's ``cached`` tokens count
        in the prefix hit ratio; a REALTIME one calibrates placement, unless it was lifted or
        waited for a seat a preemption freed (the prediction counts no such wait)."""
        now, predicted, fresh = time.monotonic(), job.place.predicted_s, not job.restarts
        if job.first_at is None:
            job.first_at = now
        with self._lock:
            if cached is not None and fresh:
                self._sink.prefix_hits.observe(len(job.request.prompt_token_ids), cached)
            waited = job.seat_freed_at is not None
            if waited or not fresh or predicted <= 0 or not job.workload_class.is_top:
                return
            self._calibration.record(now, predicted, now - job.submitted_at)
        if job.place.priority != job.workload_class.rank:  # placed among BATCH prompts
            log.info(
                "realtime_placed",
                request_id=job.request.request_id,
                predicted_ms=round(predicted * 1000, 1),
                first_token_ms=round((now - job.submitted_at) * 1000, 1),
            )

    def _seat_realtime(self) -> None:
        """After each vLLM step (engine thread): with every seat taken, preempt a running
        lower-class request for each REALTIME one vLLM holds back (:func:`seat_preemptions`);
        the preempted one goes back to vLLM with its output so far, at its place."""
        self._steps += 1
        rows = self._options.max_sequences
        if self._sink.running < rows or self._sink.waiting <= 0:
            return  # a seat is free, or nothing waits: vLLM seats what waits itself
        try:
            with self._lock:
                jobs = {
                    j.request.request_id: j for j in list(self._jobs.values()) if not j.cancelled
                }
                now, cost = time.monotonic(), self._sink.step_model.cost
                seats = [self._seat(j, now, rows, cost) for j in jobs.values()]
            since = self._steps - SEATING_STEPS
            seating = {rid for rid, j in jobs.items() if j.seating_since(since)}
            pairs, lifts = seat_preemptions(
                seats, self._sink.running, self._sink.waiting, rows, seating
            )
            for lifted_id in lifts:  # not started: nothing to prefill again
                lifted = jobs[lifted_id]
                if lifted.run is not None and not lifted.run.done() and not lifted.preempted:
                    lifted.preempted, lifted.lifted = True, True
                    lifted.run.cancel()
                    log.info("realtime_lifted", request_id=lifted_id)
            for waiting_id, victim_id in pairs:
                victim = jobs[victim_id]
                if victim.run is None or victim.run.done():
                    continue
                jobs[waiting_id].seat_freed_at = self._steps
                victim.preempted, victim.started = True, False
                victim.run.cancel()
                kept = victim.generated
                log.info("sequence_preempted", request_id=victim_id, by=waiting_id, generated=kept)
        except Exception as exc:  # never break vLLM's output handler
            log.warning("vllm_seat_check_failed", exc_info=exc)

    def _ended(self, job: Job) -> None:
        """``job``'s task is done (finished, failed or cancelled): retire it, send its end."""
        self._retire(job)
        job.deliver(job.end if job.end is not None else job.final(FinishReason.CANCELLED))

    def _delta(self, job: Job, out: Any) -> TokenDelta:
        completion = out.outputs[0]
        token_ids = tuple(int(t) for t in completion.token_ids)
        job.token_ids.extend(token_ids)
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
        # Only these two: vLLM's own (its socket reader) must outlive the output task.
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
    def _order(job: Job) -> tuple[int, float]:
        return job.place.priority, job.place.key

    def _seat(self, job: Job, now: float, rows: int, cost: StepCost | None) -> Seat:
        return seat(job, self._order(job), now, rows, cost, self._lm.tokenizer.decode)

    def _placement(self, job: Job) -> Placement:
        """``job``'s place in vLLM's queue, from the prompts waiting there, and its finish tag
        (``job.tag``) (under the lock, at submit)."""
        live = [j for j in list(self._jobs.values()) if not j.cancelled]
        band, rank, request = WorkloadClass.BATCH.rank, job.workload_class.rank, job.request
        clock = time.monotonic()
        now, own = clock - self._epoch, prefill_s(job, self._sink.step_model.cost)
        unstarted = sorted((j for j in live if not j.started), key=self._order)
        job.tag = tag = finish_tag(now, own)  # REALTIME: those with earlier tags are ahead
        higher = [j for j in unstarted if j.place.priority < band and (rank or j.place.key < tag)]
        waiting = [
            Waiting(j.place.key, j.workload_class is WorkloadClass.REALTIME, prefill_tokens(j))
            for j in unstarted
            if j.place.priority == band
        ]
        return placement(
            job.workload_class,
            request.first_token_budget_s,
            prefill_tokens(job),
            waiting,
            sum(prefill_tokens(j) for j in higher),
            sum(1 for j in live if j.started),
            self._options.max_batched_tokens,
            self._sink.step_model.cost,
            now,
            seats=self._options.max_sequences - len(higher),
            margin_s=self._calibration.margin(clock) if request.first_token_budget_s > 0 else None,
            own_s=own,
        )

    def _cancel_job(self, job: Job) -> None:
        """Cancel ``job``'s task (vLLM aborts the request); any thread, idempotent."""
        with self._lock:
            if job.cancelled or job.request.request_id not in self._jobs:
                return
            job.cancelled = True
            future = job.future
        if future is not None:
            future.cancel()

    def _retire(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.request.request_id) is job:
                del self._jobs[job.request.request_id]
            if self._jobs:
                return
            waiters, self._idle_waiters = self._idle_waiters, []
        for loop, idle in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(idle.set)
