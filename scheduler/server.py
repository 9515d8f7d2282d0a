"""Servicers of the scheduler's public services: Inference, Admin and (not yet) Jobs.

They translate protobuf to calls on the scheduler's parts. The generation path: validate →
cache (deterministic requests) → global quota (Redis) → admission, queue and dispatch
(:class:`~scheduler.gate.DispatchGate`) → forward with the caller's deadline, retrying before
the first token → stream back, charging generated tokens to the tenant's fair share → settle
the quota with the tokens really used → store in the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import grpc
import structlog

from scheduler.config import ModelSpec, SchedulerSettings
from scheduler.dispatch import Dispatcher, StreamStats
from scheduler.gate import DispatchGate, affinity_key
from scheduler.metrics import SchedulerMetrics
from scheduler.nodes import NodeDirectory, NodeHandle
from scheduler.queues import CLASSES, QueuedRequest, class_name
from scheduler.quotas import Lease, QuotaCheck, QuotaGate
from scheduler.tenants import Tenant, TenantDirectory
from scheduler.usage import TenantCounters, UsageBook
from scheduler.validation import validate_embed, validate_generate
from sluice.runtime import context
from sluice.runtime.cache_keys import is_cacheable
from sluice.runtime.errors import (
    NotFound,
    PermissionDenied,
    SluiceError,
    Unauthenticated,
    Unimplemented,
)
from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2_grpc,
)

log = structlog.get_logger(__name__)


class ModelCatalog:
    """Configured model limits, plus default limits for models that nodes advertise."""

    def __init__(self, specs: list[ModelSpec], nodes: NodeDirectory) -> None:
        self._specs = {s.name: s for s in specs}
        self._nodes = nodes

    def __call__(self, name: str) -> ModelSpec | None:
        spec = self._specs.get(name)
        if spec is not None:
            return spec
        advertised = self._nodes.models().get(name)
        if advertised is None:
            return None
        kind = "embed" if advertised.kind == common_pb2.MODEL_KIND_EMBED else "generate"
        limit = (
            max(1, advertised.max_context_tokens // 2) if advertised.max_context_tokens else 1024
        )
        return ModelSpec(name=name, kind=kind, max_new_tokens=limit)


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


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """``sluice.v1.Inference``: Generate and Embed."""

    def __init__(
        self,
        settings: SchedulerSettings,
        tenants: TenantDirectory,
        catalog: ModelCatalog,
        dispatcher: Dispatcher,
        cache: cache_pb2_grpc.CacheStub | None,
        metrics: SchedulerMetrics,
        usage: UsageBook,
        gate: DispatchGate,
        quotas: QuotaGate,
    ) -> None:
        self._settings = settings
        self._tenants = tenants
        self._catalog = catalog
        self._dispatcher = dispatcher
        self._cache = cache
        self._metrics = metrics
        self._usage = usage
        self._gate = gate
        self._quotas = quotas
        self._background: set[asyncio.Task[None]] = set()

    def _tenant(self) -> Tenant:
        tenant = self._tenants.get(context.tenant.get())
        if tenant is None:
            raise Unauthenticated("API key not valid")
        return tenant

    def _deadline(self, ctx: grpc.aio.ServicerContext, tenant: Tenant, cls: int) -> float:
        """The caller's deadline, else the tenant's default for the class, else the global."""
        remaining = ctx.time_remaining()
        if remaining is None:
            return time.monotonic() + tenant.deadline_for(
                cls, self._settings.default_deadline_seconds
            )
        return time.monotonic() + float(remaining)

    def _queued(
        self, req: inference_pb2.GenerateRequest, tenant: str, deadline: float
    ) -> QueuedRequest:
        chars = len(req.prompt) + sum(len(m.content) + 16 for m in req.messages)
        return QueuedRequest(
            request_id=uuid.uuid4().hex,
            tenant=tenant,
            workload_class=req.workload_class,
            model=req.model,
            prompt_tokens=max(1, math.ceil(chars / self._settings.chars_per_token)),
            max_new_tokens=req.options.max_new_tokens,
            deadline=deadline,
            affinity=affinity_key(req),
        )

    async def Generate(
        self, request: inference_pb2.GenerateRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        started = time.perf_counter()
        tenant = self._tenant()
        counters = self._usage.of(tenant.name)
        req = self._validated(request, tenant, counters)
        cls = class_name(req.workload_class)
        structlog.contextvars.bind_contextvars(workload_class=cls, model=req.model)
        deadline = self._deadline(ctx, tenant, req.workload_class)
        counters.in_flight += 1
        outcome = "failed"
        quota: QuotaCheck | None = None
        booked = False
        stats = StreamStats()
        item = self._queued(req, tenant.name, deadline)
        try:
            cached = await self._lookup(tenant.name, req)
            if cached is not None:
                outcome = "cached"
                yield self._served_from_cache(cached, counters, cls, started)
                return
            outcome = "refused"  # until admitted
            quota = await self._check_quota(tenant, item, counters)
            node = await self._book(item, counters)
            booked = True
            outcome = "failed"  # until it completes
            out = _Collected()
            first = True
            stream = self._dispatcher.generate(
                req,
                tenant.name,
                deadline,
                node,
                cost=self._gate.cost(item),
                affinity=item.affinity,
                on_tokens=lambda n: self._gate.charge(item, n),
                stats=stats,
            )
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    if first:
                        outcome = "refused"  # until the quota answer (overlapped) is in
                        outcome = await self._granted(quota, counters)
                        self._metrics.ttft.labels(cls).observe(time.perf_counter() - started)
                        first = False
                    out.add(chunk)
                    yield chunk
            if first:
                outcome = "refused"
                outcome = await self._granted(quota, counters)
            outcome = "ok"
            if out.last is not None:
                self._completed(tenant.name, req, counters, out)
        finally:
            counters.in_flight -= 1
            self._metrics.requests.labels("generate", cls, outcome).inc()
            if booked:  # admitted and handed a node
                self._gate.release(item, stats.generated if outcome == "ok" else None)
            if quota is not None:
                self._settle(item, stats, quota)

    def _served_from_cache(
        self,
        cached: cache_pb2.CachedResponse,
        counters: TenantCounters,
        cls: str,
        started: float,
    ) -> inference_pb2.GenerateChunk:
        counters.requests += 1
        counters.cache_hits += 1
        self._metrics.ttft.labels(cls).observe(time.perf_counter() - started)
        return _cached_chunk(cached)

    def _completed(
        self,
        tenant: str,
        req: inference_pb2.GenerateRequest,
        counters: TenantCounters,
        out: _Collected,
    ) -> None:
        """A generation streamed to its end: count its tokens and cache it."""
        last = out.last
        assert last is not None
        counters.prompt_tokens += last.usage.prompt_tokens
        counters.completion_tokens += last.usage.completion_tokens
        self._store_later(tenant, req, "".join(out.text), out.token_ids, last)

    def _validated(
        self, request: inference_pb2.GenerateRequest, tenant: Tenant, counters: TenantCounters
    ) -> inference_pb2.GenerateRequest:
        try:
            return validate_generate(request, tenant, self._catalog)
        except SluiceError as exc:
            counters.refuse(exc.reason)
            self._metrics.requests.labels(
                "generate", class_name(request.workload_class or 1), "refused"
            ).inc()
            raise

    async def _check_quota(
        self, tenant: Tenant, item: QueuedRequest, counters: TenantCounters
    ) -> QuotaCheck:
        """The tenant's quotas: answered, or (overlapped) still on the way; refusals counted."""
        q = tenant.quotas
        overlap = self._settings.quota_overlap and (
            not q.max_concurrent or counters.in_flight <= q.max_concurrent
        )
        try:
            return await self._quotas.check(
                tenant,
                item.prompt_tokens + item.max_new_tokens,
                item.request_id,
                item.deadline - time.monotonic(),
                overlap=overlap,
            )
        except SluiceError as exc:
            counters.refuse(exc.reason)
            raise

    async def _granted(self, quota: QuotaCheck, counters: TenantCounters) -> str:
        """Wait for an overlapped quota check before the first token reaches the client."""
        try:
            await quota.granted()
        except SluiceError as exc:
            counters.refuse(exc.reason)
            raise
        counters.requests += 1
        return "failed"  # admitted; "ok" once the stream completes

    async def _book(self, item: QueuedRequest, counters: TenantCounters) -> NodeHandle:
        """Admission and a booked node; a refusal is counted and raised."""
        try:
            return await self._gate.acquire(item)
        except SluiceError as exc:
            counters.refuse(exc.reason)
            raise

    def _settle(self, item: QueuedRequest, stats: StreamStats, quota: QuotaCheck) -> None:
        """After a generation: correct the fair-share charge and the quota with real counts.

        The quota is settled once its answer is in: it may still be on its way from Redis when
        admission refused or the node failed first. A refused check holds nothing."""
        if stats.prompt_tokens:  # VTC: settle the prompt estimate with the true count
            weight = self._settings.prompt_token_weight
            self._gate.charge(item, (stats.prompt_tokens - item.prompt_tokens) * weight)
        prompt = stats.prompt_tokens or (item.prompt_tokens if stats.dispatched else 0)
        used = prompt + stats.generated
        quota.when_granted(lambda lease: self._background_task(self._quotas.release(lease, used)))

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lookup(
        self, tenant: str, req: inference_pb2.GenerateRequest
    ) -> cache_pb2.CachedResponse | None:
        if self._cache is None or not is_cacheable(req):
            self._metrics.cache.labels("skipped").inc()
            return None
        try:
            reply = await self._cache.Lookup(
                cache_pb2.LookupRequest(tenant=tenant, request=req),
                timeout=self._settings.cache_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            self._metrics.cache.labels("error").inc()
            log.warning("cache_lookup_failed", code=exc.code().name)
            return None
        self._metrics.cache.labels("hit" if reply.hit else "miss").inc()
        return reply.response if reply.hit else None

    def _store_later(
        self,
        tenant: str,
        req: inference_pb2.GenerateRequest,
        text: str,
        token_ids: list[int],
        last: inference_pb2.GenerateChunk,
    ) -> None:
        cache = self._cache
        if cache is None or not is_cacheable(req):
            return
        if last.finish_reason in (
            common_pb2.FINISH_REASON_UNSPECIFIED,
            common_pb2.FINISH_REASON_CANCELLED,
        ):
            return
        entry = cache_pb2.CachedResponse(
            text=text,
            token_ids=token_ids,
            finish_reason=last.finish_reason,
            usage=last.usage,
            node_id=last.node_id,
        )

        async def store() -> None:
            try:
                await cache.Store(
                    cache_pb2.StoreRequest(tenant=tenant, request=req, response=entry), timeout=1.0
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("cache_store_failed", code=exc.code().name)

        self._background_task(store())

    async def Embed(
        self, request: inference_pb2.EmbedRequest, ctx: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        tenant = self._tenant()
        counters = self._usage.of(tenant.name)
        try:
            req = validate_embed(request, tenant, self._catalog)
        except SluiceError as exc:
            counters.refuse(exc.reason)
            raise
        cls = class_name(req.workload_class)
        deadline = self._deadline(ctx, tenant, req.workload_class)
        chars = sum(len(t) for t in req.inputs)
        tokens = max(1, math.ceil(chars / self._settings.chars_per_token))
        counters.in_flight += 1
        outcome = "failed"
        lease: Lease | None = None
        used = 0
        try:
            try:
                lease = await self._quotas.acquire(
                    tenant, tokens, uuid.uuid4().hex, deadline - time.monotonic()
                )
            except SluiceError as exc:
                outcome = "refused"
                counters.refuse(exc.reason)
                raise
            counters.requests += 1
            reply = await self._dispatcher.embed(req, tenant.name, deadline)
            used = reply.usage.prompt_tokens
            counters.prompt_tokens += used
            outcome = "ok"
            return reply
        finally:
            counters.in_flight -= 1
            self._metrics.requests.labels("embed", cls, outcome).inc()
            if lease is not None:
                self._background_task(self._quotas.release(lease, used))


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """``sluice.v1.Admin``: the fleet and tenant usage as this replica sees them."""

    def __init__(
        self,
        nodes: NodeDirectory,
        usage: UsageBook,
        tenants: TenantDirectory,
        gate: DispatchGate,
        scheduler_id: str,
        default_tokens_per_s: float,
    ) -> None:
        self._nodes = nodes
        self._usage = usage
        self._tenants = tenants
        self._gate = gate
        self._scheduler_id = scheduler_id
        self._default_rate = default_tokens_per_s

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, ctx: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        circuit = {
            "closed": admin_pb2.CIRCUIT_STATE_CLOSED,
            "open": admin_pb2.CIRCUIT_STATE_OPEN,
            "half_open": admin_pb2.CIRCUIT_STATE_HALF_OPEN,
        }
        outliers = self._nodes.outliers
        return admin_pb2.ListNodesResponse(
            nodes=[
                admin_pb2.NodeStatus(
                    info=n.info,
                    healthy=n.healthy,
                    circuit=circuit[n.breaker.state.value],
                    load=n.load,
                    in_flight=n.in_flight,
                    ejected=outliers.ejected(n.node_id),
                    load_score=n.score(),
                    estimated_sequences=n.book.sequences(),
                    ttft_seconds=outliers.latency(n.node_id, "ttft"),
                    inter_token_seconds=outliers.latency(n.node_id, "itl"),
                    service_tokens_per_second=n.service_rate(self._default_rate),
                )
                for n in self._nodes.nodes()
            ]
        )

    async def GetTenantUsage(
        self, request: admin_pb2.GetTenantUsageRequest, ctx: grpc.aio.ServicerContext
    ) -> admin_pb2.TenantUsage:
        own = self._tenants.get(context.tenant.get())
        if own is None:
            raise Unauthenticated("API key not valid")
        name = request.tenant or own.name
        if name != own.name and not own.admin:
            raise PermissionDenied("a tenant may only read its own usage")
        tenant = self._tenants.get(name)
        if tenant is None:
            raise NotFound(f"no tenant {name!r}")
        usage = self._usage.of(name).to_proto(name)
        usage.queued = sum(self._gate.queues.depth(c, name) for c in CLASSES)
        usage.weight = tenant.weight
        q = tenant.quotas
        usage.quotas.CopyFrom(
            admin_pb2.TenantQuotas(
                requests_per_second=q.requests_per_second,
                burst=q.bucket_size if q.requests_per_second else 0,
                tokens_per_minute=q.tokens_per_minute,
                max_concurrent=q.max_concurrent,
            )
        )
        usage.scheduler_id = self._scheduler_id
        return usage


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    """``sluice.v1.Jobs``: defined in the contract; answers UNIMPLEMENTED until jobs land."""

    async def _unimplemented(self, *_: object) -> None:
        raise Unimplemented("jobs are not implemented yet in this release")

    SubmitJob = GetJob = CancelJob = ListJobs = _unimplemented

    async def WatchJob(self, *_: object) -> AsyncIterator[object]:
        raise Unimplemented("jobs are not implemented yet in this release")
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are
