"""The life of one Generate request, without gRPC, and the parts an Embed shares with it
(:mod:`scheduler.embed_flow`): the servicers hand over the tenant the interceptor verified, the
request, the caller's metadata and deadline, and relay what comes back.

Generate (:class:`GenerateFlow`): authorize → validate → cache lookup → quota (Redis; by
default overlapped with what follows) → admit, queue and book a node (:class:`DispatchGate`)
→ forward and stream (retried on another node before the first token, by the
:class:`Dispatcher`; the first chunk waits for the quota answer) → settle (slot, fair-share
charge and quota, with the real token counts) → store in the cache.

Invariant: a request's :class:`Outcome` is set once, by the step that ends it, and never
changes after; ``sluice_scheduler_requests_total``'s ``outcome`` label is
:attr:`Outcome.label`.
"""

from __future__ import annotations

import contextlib
import enum
import math
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import structlog

from scheduler.adapters import SEPARATOR as ADAPTER_SEPARATOR
from scheduler.adapters import AdapterDirectory
from scheduler.background import BackgroundTasks
from scheduler.config import SchedulerSettings
from scheduler.dispatch import Dispatcher, StreamStats
from scheduler.gate import DispatchGate, affinity_key
from scheduler.metrics import SchedulerMetrics
from scheduler.node_handle import NodeHandle
from scheduler.queues import QueuedRequest
from scheduler.quotas import QuotaCheck, QuotaGate
from scheduler.response_cache import ResponseCache
from scheduler.tenants import Tenant, TenantDirectory
from scheduler.usage import TenantCounters, UsageBook
from scheduler.validation import Catalog, Metadata, class_label, validate_generate
from sluice.contract import WorkloadClass
from sluice.runtime.errors import ResourceExhausted, SluiceError, Unauthenticated
from sluice.v1 import cache_pb2, inference_pb2


class Outcome(enum.Enum):
    """How a request ended."""

    SERVED = "served"
    """Streamed (or embedded) to its end."""
    CACHED = "cached"
    """Answered from the response cache."""
    INVALID = "invalid"
    """Refused by validation or access rules."""
    REFUSED_QUOTA = "refused_quota"
    """Refused by the tenant's quotas (or their store being down, where they fail closed)."""
    REFUSED_ADMISSION = "refused_admission"
    """Refused by admission or dropped from the queue: overloaded, queue full, no node,
    deadline passed while queued, scheduler shutting down."""
    ABANDONED = "abandoned"
    """The client left while the request waited for its quota answer or a node."""
    CANCELLED = "cancelled"
    """The client left during the cache lookup or the stream."""
    FAILED = "failed"
    """An error after admission: the node failed, the deadline passed while it worked."""

    @property
    def label(self) -> str:
        """The ``outcome`` label of ``sluice_scheduler_requests_total``."""
        return _LABELS[self]


_LABELS = {
    Outcome.SERVED: "ok",
    Outcome.CACHED: "cached",
    Outcome.INVALID: "refused",
    Outcome.REFUSED_QUOTA: "refused",
    Outcome.REFUSED_ADMISSION: "refused",
    Outcome.ABANDONED: "refused",  # the metric has always counted a wait given up as refused
    Outcome.CANCELLED: "failed",
    Outcome.FAILED: "failed",
}


class Step(enum.Enum):
    """The step a request is in (how it ends if it ends there: :data:`ENDED_IN`)."""

    LOOKUP = enum.auto()
    QUOTA = enum.auto()
    ADMIT = enum.auto()
    STREAM = enum.auto()


ENDED_IN: dict[Step, tuple[Outcome, Outcome]] = {
    # How a request that ends in a step ends: (on an error, when the client leaves).
    Step.LOOKUP: (Outcome.FAILED, Outcome.CANCELLED),
    Step.QUOTA: (Outcome.REFUSED_QUOTA, Outcome.ABANDONED),
    Step.ADMIT: (Outcome.REFUSED_ADMISSION, Outcome.ABANDONED),
    Step.STREAM: (Outcome.FAILED, Outcome.CANCELLED),
}


@dataclass(frozen=True)
class RequestPath:
    """The scheduler's parts a request passes through, built once and shared."""

    settings: SchedulerSettings
    tenants: TenantDirectory
    catalog: Catalog
    cache: ResponseCache
    quotas: QuotaGate
    gate: DispatchGate
    dispatcher: Dispatcher
    usage: UsageBook
    metrics: SchedulerMetrics
    background: BackgroundTasks
    adapters: AdapterDirectory | None = None
    """Fine-tuned adapters (``"base:adapter"`` model names); None serves base models only."""


def authorize(tenants: TenantDirectory, name: str) -> Tenant:
    """The tenant named by the verified API key, or ``Unauthenticated``."""
    tenant = tenants.get(name)
    if tenant is None:
        raise Unauthenticated("API key not valid")
    return tenant


def request_deadline(
    caller: float | None, tenant: Tenant, cls: WorkloadClass, default: float
) -> float:
    """The caller's deadline, else the tenant's default for the class, else the global one."""
    if caller is not None:
        return caller
    return time.monotonic() + tenant.deadline_for(cls, default)


def estimated_tokens(chars: int, chars_per_token: float) -> int:
    """Tokens estimated from characters (the scheduler does not tokenize)."""
    return max(1, math.ceil(chars / chars_per_token))


def _cached_chunk(cached: cache_pb2.CachedResponse) -> inference_pb2.GenerateChunk:
    return inference_pb2.GenerateChunk(
        text=cached.text,
        token_ids=cached.token_ids,
        finish_reason=cached.finish_reason,
        usage=cached.usage,
        cached=True,
        node_id=cached.node_id,
    )


class _Collected:
    """What a generation streamed so far: its text, token ids and last chunk (for the cache)."""

    __slots__ = ("last", "text", "token_ids")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.last: inference_pb2.GenerateChunk | None = None

    def add(self, chunk: inference_pb2.GenerateChunk) -> None:
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.last = chunk


class GenerateFlow:
    """One Generate request. Construction authorizes and validates (raising the refusal);
    :meth:`run` takes the other steps, in order, and yields the chunks for the client:
    ``_lookup_cache``, ``_check_quota``, ``_admit``, ``_forward`` (``_quota_granted`` before
    the first chunk), ``_store``; and, however it ends, ``_settle``."""

    def __init__(
        self,
        path: RequestPath,
        request: inference_pb2.GenerateRequest,
        *,
        tenant: str,
        deadline: float | None,
        metadata: Metadata = (),
        detach_key: str = "",
        stream_interval_ms: int = 0,
    ) -> None:
        self._started = time.perf_counter()
        self._detach_key = detach_key
        """Set for a job line: the node finishes it even if this replica dies (see
        :meth:`scheduler.dispatch.Dispatcher.generate`)."""
        self._stream_interval_ms = stream_interval_ms
        self._path = path
        self.outcome: Outcome | None = None
        """Set once, by the step that ends the request."""
        self.tenant = authorize(path.tenants, tenant)
        self._counters = path.usage.of(self.tenant.name)
        self.adapter = ""
        """The node's reference to the adapter the model name resolved to (empty: base)."""
        self.request = self._validate(request, metadata)
        # The cache keys on the name the caller used: an adapter's answers are its own.
        self._cache_request = self.request
        if self.adapter:
            self._cache_request = inference_pb2.GenerateRequest()
            self._cache_request.CopyFrom(self.request)
            self._cache_request.model = request.model
        self.workload_class = WorkloadClass(self.request.workload_class)
        structlog.contextvars.bind_contextvars(
            workload_class=self.workload_class.label, model=self.request.model
        )
        self.deadline = request_deadline(
            deadline, self.tenant, self.workload_class, path.settings.default_deadline_seconds
        )
        self._step = Step.LOOKUP
        self._item = self._queued()
        self._quota: QuotaCheck | None = None
        self._booked = False
        self._stats = StreamStats()
        self._out = _Collected()

    def _validate(
        self, request: inference_pb2.GenerateRequest, metadata: Metadata
    ) -> inference_pb2.GenerateRequest:
        """The request with defaults applied, an adapter's name resolved to its base model; a
        refusal is counted as INVALID and raised."""
        try:
            adapters = self._path.adapters
            if adapters is not None and ADAPTER_SEPARATOR in request.model:
                resolved = adapters.resolve(self.tenant.name, request.model)
                if resolved.adapter is not None:
                    self.adapter = resolved.adapter.reference
                    base = inference_pb2.GenerateRequest()
                    base.CopyFrom(request)
                    base.model = resolved.base_model
                    request = base
            return validate_generate(request, self.tenant, self._path.catalog, metadata)
        except SluiceError as exc:
            self.outcome = Outcome.INVALID
            self._counters.refuse(exc.reason)
            # An undefined class (refused above) is labelled "unknown": bounded, never raising.
            label = class_label(request.workload_class)
            self._path.metrics.requests.labels("generate", label, self.outcome.label).inc()
            raise

    def _queued(self) -> QueuedRequest:
        req = self.request
        chars = len(req.prompt) + sum(len(m.content) + 16 for m in req.messages)
        return QueuedRequest(
            request_id=uuid.uuid4().hex,
            tenant=self.tenant.name,
            workload_class=self.workload_class,
            model=req.model,
            prompt_tokens=estimated_tokens(chars, self._path.settings.chars_per_token),
            max_new_tokens=req.options.max_new_tokens,
            deadline=self.deadline,
            affinity=affinity_key(req),
        )

    def _end(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome

    async def run(self) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        """Every step after validation, in order; yields the chunks for the client."""
        self._counters.in_flight += 1
        try:
            self._step = Step.LOOKUP
            cached = await self._lookup_cache()
            if cached is not None:
                self._end(Outcome.CACHED)
                yield self._served_from_cache(cached)
                return
            self._step = Step.QUOTA
            self._quota = await self._check_quota()
            self._step = Step.ADMIT
            node = await self._admit()
            self._step = Step.STREAM
            async with contextlib.aclosing(self._forward(node)) as chunks:
                async for chunk in chunks:
                    yield chunk
            self._end(Outcome.SERVED)
            self._store()
        except BaseException as exc:
            error, gone = ENDED_IN[self._step]
            self._end(error if isinstance(exc, Exception) else gone)
            raise
        finally:
            self._settle()

    async def _lookup_cache(self) -> cache_pb2.CachedResponse | None:
        """The cached answer (deterministic requests only); an error or timeout is a miss."""
        return await self._path.cache.lookup(self.tenant.name, self._cache_request)

    def _served_from_cache(self, cached: cache_pb2.CachedResponse) -> inference_pb2.GenerateChunk:
        self._counters.requests += 1
        self._counters.cache_hits += 1
        self._observe_ttft()
        return _cached_chunk(cached)

    def _observe_ttft(self) -> None:
        seconds = time.perf_counter() - self._started
        self._path.metrics.ttft.labels(self.workload_class.label).observe(seconds)
        structlog.contextvars.bind_contextvars(ttft_ms=round(seconds * 1000, 1))

    async def _check_quota(self) -> QuotaCheck:
        """The tenant's quotas: answered, or (overlapped) still on the way; refusals counted.
        Not overlapped while the tenant's requests here already fill its ``max_concurrent``."""
        q = self.tenant.quotas
        overlap = self._path.settings.quota_overlap and (
            not q.max_concurrent or self._counters.in_flight <= q.max_concurrent
        )
        item = self._item
        try:
            within_default_cap(self._path.settings, self.tenant, self._counters.in_flight)
            return await self._path.quotas.check(
                self.tenant,
                item.prompt_tokens + item.max_new_tokens,
                item.request_id,
                item.deadline - time.monotonic(),
                overlap=overlap,
            )
        except SluiceError as exc:
            self._counters.refuse(exc.reason)
            raise

    async def _admit(self) -> NodeHandle:
        """Admission, the queue and a node booked for the request; a refusal is counted."""
        node = await admit(self._path.gate, self._item, self._counters)
        self._booked = True
        return node

    async def _forward(self, node: NodeHandle) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        """Stream from ``node`` (the dispatcher retries elsewhere before the first chunk, and
        ends the stream with ``UNAVAILABLE`` if the node fails after it). Nothing reaches the
        client before the quota answer; generated tokens are charged to the fair share."""
        gate, item = self._path.gate, self._item
        stream = self._path.dispatcher.generate(
            self.request,
            self.tenant.name,
            self.deadline,
            node,
            cost=gate.cost(item),
            affinity=item.affinity,
            prompt_tokens=item.prompt_tokens,
            on_tokens=lambda n: gate.streamed(item, n),
            stats=self._stats,
            adapter=self.adapter,
            detach_key=self._detach_key,
            stream_interval_ms=self._stream_interval_ms,
            first_token_budget_s=gate.admission.first_token_budgets.budget(item),
        )
        first = True
        async with contextlib.aclosing(stream):
            async for chunk in stream:
                if first:
                    gate.admission.first_token(item, retried=self._stats.attempts > 1)
                    await self._quota_granted()
                    self._observe_ttft()
                    first = False
                self._out.add(chunk)
                yield chunk
        if first:
            await self._quota_granted()

    async def _quota_granted(self) -> None:
        """Wait for an overlapped quota answer; the request counts once it is granted."""
        assert self._quota is not None
        self._step = Step.QUOTA
        try:
            await self._quota.granted()
        except SluiceError as exc:
            self._counters.refuse(exc.reason)
            raise
        self._counters.requests += 1
        self._step = Step.STREAM

    def _store(self) -> None:
        """A generation streamed to its end: count its tokens and cache it."""
        last = self._out.last
        if last is None:
            return
        self._counters.prompt_tokens += last.usage.prompt_tokens
        self._counters.completion_tokens += last.usage.completion_tokens
        self._path.cache.store_later(
            self.tenant.name,
            self._cache_request,
            text="".join(self._out.text),
            token_ids=self._out.token_ids,
            last=last,
        )

    def _settle(self) -> None:
        """Give back what the request held: its node slot (with the tokens it made, when
        served), the fair-share charge and the quota, corrected with the real counts."""
        assert self.outcome is not None  # every way out of run() sets it
        path, item, stats = self._path, self._item, self._stats
        self._counters.in_flight -= 1
        path.metrics.requests.labels(
            "generate", self.workload_class.label, self.outcome.label
        ).inc()
        if self._booked:
            path.gate.release(item, stats.generated if self.outcome is Outcome.SERVED else None)
        if self._quota is None:
            return
        if stats.prompt_tokens:  # VTC: settle the prompt estimate with the true count
            weight = path.settings.prompt_token_weight
            path.gate.charge(item, (stats.prompt_tokens - item.prompt_tokens) * weight)
        prompt = stats.prompt_tokens or (item.prompt_tokens if stats.dispatched else 0)
        used = prompt + stats.generated
        # The answer may still be on its way from Redis (admission refused or the node failed
        # first): the lease is released once it is in. A refused check holds nothing.
        self._quota.when_granted(
            lambda lease: path.background.spawn(path.quotas.release(lease, used))
        )


async def admit(gate: DispatchGate, item: QueuedRequest, counters: TenantCounters) -> NodeHandle:
    """Admission, the queue and a node slot booked for ``item`` (give it back with
    ``gate.release``); a refusal is counted for the tenant and raised."""
    # A job line's later attempt runs in the same task: its log fields start afresh.
    structlog.contextvars.unbind_contextvars(
        "predicted_wait_ms", "predicted_first_token_ms", "queued_ms", "held_ms", "ttft_ms"
    )
    began = time.perf_counter()
    try:
        node = await gate.acquire(item)
    except SluiceError as exc:
        counters.refuse(exc.reason)
        raise
    finally:  # what kept it queued, per hold, dispatched or not
        held_ms = {hold: round(s * 1000) for hold, s in item.held_s.items() if s >= 0.001}
        if held_ms:
            structlog.contextvars.bind_contextvars(held_ms=held_ms)
    # The request's log line (rpc_finished) says how long it queued (the dispatcher names
    # the node of each attempt).
    queued_ms = round((time.perf_counter() - began) * 1000, 1)
    structlog.contextvars.bind_contextvars(queued_ms=queued_ms)
    return node


TENANT_CAP_RETRY_S = 1.0


def within_default_cap(settings: SchedulerSettings, tenant: Tenant, in_flight: int) -> None:
    """Refuse a request past ``tenant_max_in_flight`` for a tenant whose quotas set no
    ``max_concurrent`` (``in_flight`` counts this request): no tenant holds unbounded
    state here, quotas or not."""
    cap = settings.tenant_max_in_flight
    if cap and not tenant.quotas.max_concurrent and in_flight > cap:
        raise ResourceExhausted(
            f"tenant {tenant.name!r} has {cap} requests in flight on this scheduler",
            retry_after_s=TENANT_CAP_RETRY_S,
            reason="TENANT_CONCURRENCY",
            quota_violations=[("max_concurrent", f"at most {cap} requests in flight")],
        )
