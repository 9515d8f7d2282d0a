"""Servicers of the scheduler's public services: Inference, Admin and (not yet) Jobs.

They translate protobuf to calls on the scheduler's parts: tenants, validation, cache,
node directory. The request path: validate → cache (deterministic requests) → pick a node →
forward with the caller's deadline → stream back → store in the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from scheduler.config import ModelSpec, SchedulerSettings
from scheduler.dispatch import Dispatcher
from scheduler.metrics import SchedulerMetrics
from scheduler.nodes import NodeDirectory
from scheduler.tenants import Tenant, TenantDirectory
from scheduler.usage import UsageBook
from scheduler.validation import validate_embed, validate_generate
from sluice import context
from sluice.cache_keys import is_cacheable
from sluice.errors import PermissionDenied, SluiceError, Unauthenticated, Unimplemented
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


def _class_name(workload_class: int) -> str:
    return common_pb2.WorkloadClass.Name(workload_class).removeprefix("WORKLOAD_CLASS_").lower()


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
    ) -> None:
        self._settings = settings
        self._tenants = tenants
        self._catalog = catalog
        self._dispatcher = dispatcher
        self._cache = cache
        self._metrics = metrics
        self._usage = usage
        self._background: set[asyncio.Task[None]] = set()

    def _tenant(self) -> Tenant:
        tenant = self._tenants.get(context.tenant.get())
        if tenant is None:
            raise Unauthenticated("API key not valid")
        return tenant

    def _deadline(self, ctx: grpc.aio.ServicerContext) -> float:
        remaining = ctx.time_remaining()
        budget = self._settings.default_deadline_seconds if remaining is None else remaining
        return time.monotonic() + budget

    async def Generate(
        self, request: inference_pb2.GenerateRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        started = time.perf_counter()
        tenant = self._tenant()
        counters = self._usage.of(tenant.name)
        try:
            req = validate_generate(request, tenant, self._catalog)
        except SluiceError:
            counters.refused += 1
            self._metrics.requests.labels(
                "generate", _class_name(request.workload_class or 1), "refused"
            ).inc()
            raise
        cls = _class_name(req.workload_class)
        structlog.contextvars.bind_contextvars(workload_class=cls, model=req.model)
        counters.requests += 1
        counters.in_flight += 1
        outcome = "failed"
        try:
            cached = await self._lookup(tenant.name, req)
            if cached is not None:
                outcome = "cached"
                counters.cache_hits += 1
                self._metrics.ttft.labels(cls).observe(time.perf_counter() - started)
                yield inference_pb2.GenerateChunk(
                    text=cached.text,
                    token_ids=cached.token_ids,
                    finish_reason=cached.finish_reason,
                    usage=cached.usage,
                    cached=True,
                    node_id=cached.node_id,
                )
                return
            text: list[str] = []
            token_ids: list[int] = []
            last: inference_pb2.GenerateChunk | None = None
            first = True
            async for chunk in self._dispatcher.generate(req, tenant.name, self._deadline(ctx)):
                if first:
                    self._metrics.ttft.labels(cls).observe(time.perf_counter() - started)
                    first = False
                text.append(chunk.text)
                token_ids.extend(chunk.token_ids)
                last = chunk
                yield chunk
            outcome = "ok"
            if last is not None:
                counters.prompt_tokens += last.usage.prompt_tokens
                counters.completion_tokens += last.usage.completion_tokens
                self._store_later(tenant.name, req, "".join(text), token_ids, last)
        finally:
            counters.in_flight -= 1
            self._metrics.requests.labels("generate", cls, outcome).inc()

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

        task = asyncio.create_task(store())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, ctx: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        tenant = self._tenant()
        counters = self._usage.of(tenant.name)
        try:
            req = validate_embed(request, tenant, self._catalog)
        except SluiceError:
            counters.refused += 1
            raise
        cls = _class_name(req.workload_class)
        counters.requests += 1
        counters.in_flight += 1
        outcome = "failed"
        try:
            reply = await self._dispatcher.embed(req, tenant.name, self._deadline(ctx))
            counters.prompt_tokens += reply.usage.prompt_tokens
            outcome = "ok"
            return reply
        finally:
            counters.in_flight -= 1
            self._metrics.requests.labels("embed", cls, outcome).inc()


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """``sluice.v1.Admin``: the fleet and tenant usage as this replica sees them."""

    def __init__(self, nodes: NodeDirectory, usage: UsageBook) -> None:
        self._nodes = nodes
        self._usage = usage

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, ctx: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        circuit = {
            "closed": admin_pb2.CIRCUIT_STATE_CLOSED,
            "open": admin_pb2.CIRCUIT_STATE_OPEN,
            "half_open": admin_pb2.CIRCUIT_STATE_HALF_OPEN,
        }
        return admin_pb2.ListNodesResponse(
            nodes=[
                admin_pb2.NodeStatus(
                    info=n.info,
                    healthy=n.healthy,
                    circuit=circuit[n.breaker.state.value],
                    load=n.load,
                    in_flight=n.in_flight,
                )
                for n in self._nodes.nodes()
            ]
        )

    async def GetTenantUsage(
        self, request: admin_pb2.GetTenantUsageRequest, ctx: grpc.aio.ServicerContext
    ) -> admin_pb2.TenantUsage:
        own = context.tenant.get()
        name = request.tenant or own
        if name != own:
            raise PermissionDenied("a tenant may only read its own usage")
        return self._usage.of(name).to_proto(name)


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    """``sluice.v1.Jobs``: defined in the contract; answers UNIMPLEMENTED until jobs land."""

    async def _unimplemented(self, *_: object) -> None:
        raise Unimplemented("jobs are not implemented yet in this release")

    SubmitJob = GetJob = CancelJob = ListJobs = _unimplemented

    async def WatchJob(self, *_: object) -> AsyncIterator[object]:
        raise Unimplemented("jobs are not implemented yet in this release")
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are
