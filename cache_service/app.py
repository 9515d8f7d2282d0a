"""Assembly of the cache service: used by ``__main__`` and by the tests (in-process).

Start-up never waits for Redis: the port opens at once. Health says ``NOT_SERVING`` (logged
with the reason) until Redis first answers a ``PING``, probed every ``REDIS_PROBE_S``; then
``SERVING``. A later Redis outage does not flip health: the cache then answers misses and
refuses stores per request (fails open), which is what its callers expect.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as redis
import structlog
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from cache_service.cache import ResponseCache
from cache_service.config import CacheSettings
from cache_service.server import CacheMetrics, CacheServicer
from cache_service.store import RedisStore, fail_fast_redis
from sluice.runtime.server import GrpcServer
from sluice.runtime.tls import CallerCheck, Role
from sluice.v1 import cache_pb2, cache_pb2_grpc

log = structlog.get_logger(__name__)

CACHE_SERVICE = cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name

REDIS_PROBE_S = 0.5
"""Interval of the start-up ``PING`` while Redis has not answered yet."""


class CacheService:
    """The cache service's parts, with an explicit start/stop lifecycle."""

    def __init__(self, settings: CacheSettings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self._redis = fail_fast_redis(settings.redis_url, settings.redis_timeout_seconds)
        self.store = RedisStore(self._redis)
        self.cache = ResponseCache(
            self.store,
            default_ttl_s=settings.default_ttl_seconds,
            max_entry_bytes=settings.max_entry_bytes,
        )
        self.server = GrpcServer(
            "cache",
            settings.server_options(),
            registry,
            callers=CallerCheck({CACHE_SERVICE: [Role.SCHEDULER]}),
        )
        self.server.add(
            cache_pb2_grpc.add_CacheServicer_to_server,
            CacheServicer(self.cache, CacheMetrics(registry)),
            CACHE_SERVICE,
        )
        self._probe: asyncio.Task[None] | None = None
        self._ping_s = 4 * settings.redis_timeout_seconds

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC server."""
        return self.server.address

    async def start(self) -> None:
        """Start serving: ``SERVING`` at once when Redis answers, else ``NOT_SERVING`` until it
        does (probed in the background)."""
        # Refused: at once; a silent Redis: the client's timeouts, bounded here again.
        error = await _ping(self._redis, self._ping_s)
        if error is None:
            await self.server.start()
            return
        await self.server.start(serving=False, reason="redis_unavailable")
        log.warning("cache_not_serving", reason="redis_unavailable", error=error)
        self._probe = asyncio.create_task(self._serve_once_redis_answers(), name="redis probe")

    async def _serve_once_redis_answers(self) -> None:
        while True:
            await asyncio.sleep(REDIS_PROBE_S)
            if await _ping(self._redis, self._ping_s) is None:
                break
        await self.server.set_serving(True, reason="redis_available")

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving, then close the Redis pool."""
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.server.stop(grace_s)
        await self.store.close()


async def _ping(client: redis.Redis, within_s: float) -> str | None:
    """None when Redis answers a ``PING`` within ``within_s``, else why not."""
    try:
        async with asyncio.timeout(within_s):
            await client.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        return repr(exc)
    return None
