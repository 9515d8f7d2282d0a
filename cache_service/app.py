"""Assembly of the cache service: used by ``__main__`` and by the tests (in-process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from cache_service.cache import ResponseCache
from cache_service.config import CacheSettings
from cache_service.server import CacheMetrics, CacheServicer
from cache_service.store import RedisStore, fail_fast_redis
from sluice.runtime.server import GrpcServer
from sluice.v1 import cache_pb2, cache_pb2_grpc


class CacheService:
    """The cache service's parts, with an explicit start/stop lifecycle."""

    def __init__(self, settings: CacheSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.store = RedisStore(fail_fast_redis(settings.redis_url, settings.redis_timeout_seconds))
        self.cache = ResponseCache(
            self.store,
            default_ttl_s=settings.default_ttl_seconds,
            max_entry_bytes=settings.max_entry_bytes,
        )
        self.server = GrpcServer("cache", settings.server_options(), registry)
        self.server.add(
            cache_pb2_grpc.add_CacheServicer_to_server,
            CacheServicer(self.cache, CacheMetrics(registry)),
            cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name,
        )

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC server."""
        return self.server.address

    async def start(self) -> None:
        """Start serving."""
        await self.server.start()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving, then close the Redis pool."""
        await self.server.stop(grace_s)
        await self.store.close()
