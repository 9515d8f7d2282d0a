"""The response cache core: cacheability, keys, TTL, size cap, and graceful degradation.

No gRPC here. A store outage never becomes an error: lookups miss and stores are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from cache_service.store import KeyValueStore, StoreUnavailable
from sluice.runtime.cache_keys import cache_key, invalidation_pattern, is_cacheable
from sluice.v1 import cache_pb2, inference_pb2

log = structlog.get_logger(__name__)


@dataclass
class CacheCounters:
    """What this replica has done since it started."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    errors: int = 0


@dataclass(frozen=True)
class LookupResult:
    """The answer to a lookup."""

    key: str
    cacheable: bool
    response: cache_pb2.CachedResponse | None


@dataclass(frozen=True)
class StoreResult:
    """The answer to a store."""

    key: str
    stored: bool
    reason: str = ""


class ResponseCache:
    """Exact-match cache of complete generations, scoped by tenant."""

    def __init__(
        self, store: KeyValueStore, *, default_ttl_s: int = 300, max_entry_bytes: int = 1 << 20
    ) -> None:
        self._store = store
        self.default_ttl_s = default_ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.counters = CacheCounters()

    def available(self) -> bool:
        """False while the store is known to be down."""
        return self._store.available()

    async def lookup(self, tenant: str, request: inference_pb2.GenerateRequest) -> LookupResult:
        """Find the cached response to ``request`` for ``tenant``."""
        if not is_cacheable(request):
            self.counters.misses += 1
            return LookupResult(key="", cacheable=False, response=None)
        key = cache_key(tenant, request)
        try:
            raw = await self._store.get(key)
        except StoreUnavailable:
            self.counters.errors += 1
            raw = None
        if raw is None:
            self.counters.misses += 1
            return LookupResult(key=key, cacheable=True, response=None)
        response = cache_pb2.CachedResponse()
        try:
            response.ParseFromString(raw)
        except Exception:
            log.warning("cache_entry_corrupt", key=key)
            self.counters.misses += 1
            return LookupResult(key=key, cacheable=True, response=None)
        self.counters.hits += 1
        return LookupResult(key=key, cacheable=True, response=response)

    async def store(
        self,
        tenant: str,
        request: inference_pb2.GenerateRequest,
        response: cache_pb2.CachedResponse,
        ttl_s: int = 0,
    ) -> StoreResult:
        """Remember ``response``; refuses non-deterministic requests and oversized entries."""
        if not is_cacheable(request):
            return StoreResult(key="", stored=False, reason="not_cacheable")
        key = cache_key(tenant, request)
        entry = cache_pb2.CachedResponse()
        entry.CopyFrom(response)
        entry.stored_at_unix_ms = int(time.time() * 1000)
        blob = entry.SerializeToString()
        if len(blob) > self.max_entry_bytes:
            return StoreResult(key=key, stored=False, reason="too_large")
        try:
            await self._store.set(key, blob, ttl_s if ttl_s > 0 else self.default_ttl_s)
        except StoreUnavailable:
            self.counters.errors += 1
            return StoreResult(key=key, stored=False, reason="redis_unavailable")
        self.counters.stores += 1
        return StoreResult(key=key, stored=True)

    async def invalidate(self, tenant: str, model: str = "") -> int:
        """Delete a tenant's entries (one model, or all); raises StoreUnavailable."""
        deleted = await self._store.delete_matching(invalidation_pattern(tenant, model))
        log.info("cache_invalidated", tenant=tenant, model=model or "*", deleted=deleted)
        return deleted
