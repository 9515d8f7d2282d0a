"""The response cache as the request path sees it: a lookup within a time budget (an error or
a slow answer is a miss), and stores in the background. Only deterministic requests
(:func:`sluice.runtime.cache_keys.is_cacheable`) are looked up or stored."""

from __future__ import annotations

import grpc
import structlog

from scheduler.background import BackgroundTasks
from scheduler.metrics import SchedulerMetrics
from sluice.runtime.cache_keys import is_cacheable
from sluice.v1 import cache_pb2, cache_pb2_grpc, common_pb2, inference_pb2

log = structlog.get_logger(__name__)

STORE_TIMEOUT_S = 1.0


class ResponseCache:
    """The cache service's client on the request path; ``stub`` None: caching is off."""

    def __init__(
        self,
        stub: cache_pb2_grpc.CacheStub | None,
        *,
        timeout_s: float,
        metrics: SchedulerMetrics,
        background: BackgroundTasks,
    ) -> None:
        self._stub = stub
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._background = background

    async def lookup(
        self, tenant: str, req: inference_pb2.GenerateRequest
    ) -> cache_pb2.CachedResponse | None:
        """The cached answer to ``req`` for ``tenant``, or None (skipped, miss or error)."""
        if self._stub is None or not is_cacheable(req):
            self._metrics.cache.labels("skipped").inc()
            return None
        try:
            reply = await self._stub.Lookup(
                cache_pb2.LookupRequest(tenant=tenant, request=req), timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            self._metrics.cache.labels("error").inc()
            log.warning("cache_lookup_failed", code=exc.code().name)
            return None
        self._metrics.cache.labels("hit" if reply.hit else "miss").inc()
        return reply.response if reply.hit else None

    def store_later(
        self,
        tenant: str,
        req: inference_pb2.GenerateRequest,
        *,
        text: str,
        token_ids: list[int],
        last: inference_pb2.GenerateChunk,
    ) -> None:
        """Store a finished generation in the background (not one cut short or cancelled)."""
        stub = self._stub
        if stub is None or not is_cacheable(req):
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
                await stub.Store(
                    cache_pb2.StoreRequest(tenant=tenant, request=req, response=entry),
                    timeout=STORE_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("cache_store_failed", code=exc.code().name)

        self._background.spawn(store())
