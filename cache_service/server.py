"""gRPC servicer of the ``Cache`` service: translates between protobuf and
:mod:`cache_service.cache`."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from cache_service.cache import ResponseCache
from cache_service.store import StoreUnavailable
from sluice.runtime.errors import InvalidArgument, Unavailable
from sluice.v1 import cache_pb2, cache_pb2_grpc, inference_pb2


class CacheMetrics:
    """Cache metrics, registered in an injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "sluice_cache_lookups",
            "Cache lookups by result (hit, miss, uncacheable).",
            ["result"],
            registry=registry,
        )
        self.stores = Counter(
            "sluice_cache_stores",
            "Cache store attempts by result (stored or the reason it was not).",
            ["result"],
            registry=registry,
        )
        self.redis_available = Gauge(
            "sluice_cache_redis_available",
            "1 while Redis answers, 0 while the Redis breaker is open.",
            registry=registry,
        )


def _check(tenant: str, request: inference_pb2.GenerateRequest) -> None:
    violations = []
    if not tenant:
        violations.append(("tenant", "required"))
    if not request.model:
        violations.append(("request.model", "required"))
    if violations:
        raise InvalidArgument(violations)


class CacheServicer(cache_pb2_grpc.CacheServicer):
    """Serves lookups, stores, invalidations and stats over a :class:`ResponseCache`."""

    def __init__(self, cache: ResponseCache, metrics: CacheMetrics) -> None:
        self._cache = cache
        self._metrics = metrics

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        _check(request.tenant, request.request)
        result = await self._cache.lookup(request.tenant, request.request)
        outcome = "uncacheable" if not result.cacheable else "hit" if result.response else "miss"
        self._metrics.lookups.labels(outcome).inc()
        self._metrics.redis_available.set(1 if self._cache.available() else 0)
        return cache_pb2.LookupResponse(
            hit=result.response is not None,
            response=result.response,
            key=result.key,
            cacheable=result.cacheable,
        )

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        _check(request.tenant, request.request)
        result = await self._cache.store(
            request.tenant, request.request, request.response, request.ttl_seconds
        )
        self._metrics.stores.labels("stored" if result.stored else result.reason).inc()
        return cache_pb2.StoreResponse(stored=result.stored, reason=result.reason, key=result.key)

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.InvalidateResponse:
        if not request.tenant:
            raise InvalidArgument([("tenant", "required")])
        try:
            deleted = await self._cache.invalidate(request.tenant, request.model)
        except StoreUnavailable as exc:
            raise Unavailable(f"redis unavailable: {exc}", retry_after_s=1.0) from exc
        return cache_pb2.InvalidateResponse(deleted=deleted)

    async def Stats(
        self, request: cache_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StatsResponse:
        c = self._cache.counters
        return cache_pb2.StatsResponse(
            hits=c.hits,
            misses=c.misses,
            stores=c.stores,
            errors=c.errors,
            redis_available=self._cache.available(),
        )
