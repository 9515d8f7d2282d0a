"""The vLLM node's requests (:mod:`inference_node.engine.vllm_engine`): what it refuses at
submit, each request's state across the node's threads and its preemptions, the consumer's
stream of it, how seat preemption (:func:`~.vllm_mapping.seat_preemptions`) sees it, and
the load they make.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import structlog

from inference_node.engine.step_model import StepCost
from inference_node.engine.text import checked_request
from inference_node.engine.types import (
    DeltaStream,
    EngineRequest,
    FinishReason,
    RequestTooLargeError,
    TokenDelta,
)
from inference_node.engine.vllm_mapping import (
    KEY_GAP_S,
    Placement,
    Seat,
    held_by_vllm,
    may_give_seat,
)
from inference_node.model_types import LanguageModel
from sluice.contract import WorkloadClass

_TOP = WorkloadClass.REALTIME.rank
log = structlog.get_logger(__name__)


def prefill_tokens(job: Job) -> int:
    """The tokens it prefills: its prompt, and its output so far once preempted."""
    return len(job.request.prompt_token_ids) + len(job.token_ids)


def prefill_s(job: Job, cost: StepCost | None) -> float:
    """Its prefill alone at the fitted step ``cost`` (0 before a fit)."""
    return cost.per_prefill_token_s * prefill_tokens(job) if cost is not None else 0.0


@dataclass(eq=False)
class Job:
    """One request handed to vLLM: what the consumer's loop, the gRPC thread and the engine
    thread share about it (under the engine's lock where it says so)."""

    request: EngineRequest
    workload_class: WorkloadClass
    seq: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenDelta | BaseException] = field(default_factory=asyncio.Queue)
    place: Placement = field(default_factory=lambda: Placement(0, 0.0))
    """Its place in vLLM's priority queue (:func:`~.vllm_mapping.placement`)."""
    started: bool = False
    """vLLM sent its first output: it is running (not waiting)."""
    token_ids: list[int] = field(default_factory=list)
    """Its output so far: a preempted request goes back to vLLM with them as prompt."""
    submitted_at: float = field(default_factory=time.monotonic)
    first_at: float | None = None
    """When its first token came (monotonic; engine thread): its pace is kept from there."""
    run: asyncio.Task[None] | None = None
    """Its current vLLM request (engine thread); cancelled to preempt it."""
    preempted: bool = False
    restarts: int = 0
    pauses: int = 0
    """Of its restarts, those that sent it back unstarted for a REALTIME prompt
    (:func:`pause_prefills`): nothing it streamed is prefilled again."""
    paused_at: int = -1
    """vLLM steps seen when it was last sent back so (engine thread)."""
    pausing: bool = False
    """Its current preemption is a pause (engine thread)."""
    sent_step: int = 0
    """vLLM steps the engine had seen when it was last sent (engine thread)."""
    tag: float = 0.0
    """Its key at its class's rank (:func:`~.vllm_mapping.finish_tag`, set at submit)."""
    lifted: bool = False
    """A REALTIME prompt placed among BATCH ones that went back at REALTIME's rank."""
    seat_freed_at: int | None = None
    """The vLLM step at which a preemption freed a seat for this REALTIME prompt."""
    cancelled: bool = False
    future: concurrent.futures.Future[None] | None = None
    end: TokenDelta | BaseException | None = None
    """The last delta (or the error) to send once its task is done."""

    @property
    def generated(self) -> int:
        return len(self.token_ids)

    def seating_since(self, step: int) -> bool:
        """A preemption freed a seat for it at ``step`` or later (it may not have reached it)."""
        return self.seat_freed_at is not None and self.seat_freed_at >= step

    @property
    def new_and_waiting(self) -> bool:
        """Not started, and no stream preempted back into the queue (those count apart)."""
        return not (self.started or self.cancelled) and (
            self.lifted or self.restarts == self.pauses
        )

    def deliver(self, item: TokenDelta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def final(self, reason: FinishReason) -> TokenDelta:
        return TokenDelta("", (), reason, len(self.request.prompt_token_ids), self.generated)


class JobStream(DeltaStream):
    """The consumer's side of one request; closing or dropping it cancels the request."""

    def __init__(self, job: Job, cancel: Callable[[Job], None]) -> None:
        self._job = job
        self._finished = False
        self._finalizer = weakref.finalize(self, cancel, job)
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


def load(
    live: Sequence[Job], held: Collection[int], step_tokens: int | None = None
) -> tuple[dict[WorkloadClass, int], dict[WorkloadClass, int], int, int]:
    """Running and waiting requests per class, the tokens of work left and the prompt tokens
    ahead of a REALTIME prompt, of the ``live`` requests, those with ids in ``held`` held back
    by vLLM (the rest run). Ahead: the REALTIME prompts vLLM is prefilling or holds at
    REALTIME's rank and the lower-class prefills it has begun, whole; of the latter at most
    the step under way (``step_tokens``) where a REALTIME prompt sends the rest back
    (:func:`pause_prefills`)."""
    running = dict.fromkeys(WorkloadClass, 0)
    waiting = dict.fromkeys(WorkloadClass, 0)
    queued = ahead = lower = 0
    for job in live:
        left = max(job.request.params.max_new_tokens - job.generated, 0)
        if id(job) in held:
            waiting[job.workload_class] += 1
            queued += prefill_tokens(job) + left
            ahead += prefill_tokens(job) if job.place.priority == _TOP else 0
        else:
            running[job.workload_class] += 1
            queued += left
            begun = 0 if job.started else prefill_tokens(job)
            ahead += begun if job.workload_class.is_top else 0
            lower += 0 if job.workload_class.is_top else begun
    return (
        running,
        waiting,
        queued,
        ahead + (lower if step_tokens is None else min(lower, step_tokens)),
    )


def begun_below(
    live: Sequence[Job],
    waiting: int,
    step: int,
    step_tokens: int,
    order: Callable[[Job], tuple[int, float]],
) -> list[Job]:
    """The lower-class prompts of ``live`` that vLLM may be prefilling beyond the step under
    way: longer than a step's ``step_tokens`` (a shorter one ends with that step, and would
    lose its whole prefill: prefix caching keeps full blocks only), sent to it, not at their
    first token, not sent back already since its last step's stats (``step``: the steps seen
    then), and either sent since those stats or not among the ``waiting`` it reported holding
    back (:func:`~.vllm_mapping.held_by_vllm` over those sent before). vLLM shows no
    request's progress: a held prompt taken for begun costs only its resend."""
    seen = sorted((j for j in live if not j.started and j.sent_step < step), key=order)
    held = {id(j) for j in held_by_vllm(seen, waiting)}
    lower = (
        j
        for j in live
        if not (j.started or j.preempted or j.workload_class.is_top or j.paused_at == step)
        and j.run is not None
        and prefill_tokens(j) > step_tokens
    )
    return sorted((j for j in lower if id(j) not in held), key=order)


def pause_prefills(
    jobs: Sequence[Job],
    by: Job,
    waiting: int,
    step: tuple[int, int],
    order: Callable[[Job], tuple[int, float]],
) -> None:
    """Send the prompts of ``jobs`` :func:`begun_below` names back to vLLM's queue at their
    own place, for the REALTIME prompt ``by`` at REALTIME's rank (under the engine's lock, on
    the engine thread): vLLM runs a begun prefill before any waiting prompt, whatever its
    priority. With prefix caching their prefill resumes after the blocks already computed.
    ``step``: vLLM steps seen, and its tokens per step."""
    live = [j for j in jobs if not j.cancelled and j is not by]
    for victim in begun_below(live, waiting, *step, order):
        if victim.run is not None and not victim.run.done():
            victim.preempted, victim.pausing, victim.paused_at = True, True, step[0]
            victim.run.cancel()
            rid = victim.request.request_id
            log.info("prefill_paused", request_id=rid, by=by.request.request_id)


MAX_RESTARTS = 3
"""Seat preemptions a request may take (each prefills its prompt and output again); pauses
(:func:`pause_prefills`) do not count."""


def seat(
    job: Job,
    order: tuple[int, float],
    now: float,
    rows: int,
    cost: StepCost | None,
    decode: Callable[[Sequence[int]], str],
) -> Seat:
    """``job`` as :func:`~.vllm_mapping.seat_preemptions` sees it, at ``order`` in vLLM's
    queue (under the engine's lock; ``rows``: vLLM's sequences). A lower-class stream whose
    last token ends within a character (its last ids ``decode`` to a trailing U+FFFD: vLLM
    holds those bytes back, and a restart would decode them anew with the prompt) keeps its
    seat, checked last: it decodes."""
    request = job.request
    movable = (
        job.started
        and not job.workload_class.is_top
        and job.restarts - job.pauses < MAX_RESTARTS
        and may_give_seat(
            request.params,
            request.time_left_s,
            now - job.submitted_at,
            (request.params.max_new_tokens - job.generated, prefill_tokens(job)),
            cost,
            rows,
        )
        and not decode(job.token_ids[-4:]).endswith("\ufffd")
    )
    return Seat(request.request_id, job.workload_class.rank, order, job.started, movable)


def validate(
    request: EngineRequest, lm: LanguageModel, kv_per_token: int, kv_budget: int
) -> WorkloadClass:
    """Every rule ``request`` breaks (:class:`InvalidRequestError`,
    :func:`~.text.checked_request`; an adapter among them: vLLM serves none), then
    :class:`RequestTooLargeError` (beyond ``kv_budget`` bytes of KV cache at
    ``kv_per_token``); returns its class."""
    adapter = (
        [("adapter", f"{lm.name!r} runs on the vLLM engine, which serves no adapters")]
        if request.adapter
        else []
    )
    workload_class, total = checked_request(request, lm.vocab_size, lm.max_context_tokens, adapter)
    if total * kv_per_token > kv_budget:
        raise RequestTooLargeError(
            f"request needs {total * kv_per_token} bytes of KV cache, "
            f"more than the budget of {kv_budget} bytes"
        )
    return workload_class


def resumed_place(job: Job, jobs: Sequence[Job]) -> Placement:
    """Where a preempted ``job`` goes back among ``jobs`` (under the engine's lock): its place,
    but behind every REALTIME prompt placed among BATCH ones (each counted on the prompts
    ahead of it), before the next waiting prompt."""
    band, place = WorkloadClass.BATCH.rank, job.place
    waiting = [
        j for j in jobs if j.place.priority == band and not (j.started or j.cancelled or j is job)
    ]
    placed = [j.place.key for j in waiting if j.workload_class.is_top]
    if place.priority != band or not placed or max(placed) < place.key:
        return place
    after = min((j.place.key for j in waiting if j.place.key > max(placed)), default=None)
    key = max(placed) + KEY_GAP_S if after is None else (max(placed) + after) / 2
    return Placement(band, key)
