"""The Redis side of the cache, behind a small protocol so the core never sees Redis.

Redis clients here fail fast: connect and socket timeouts of ``timeout_s`` (0.25 s by default)
and one retry without backoff (docs/decisions/runtime-redis-fail-fast.md). A breaker stops
hammering a Redis that is down; while it is open every call fails at once with
:class:`StoreUnavailable`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import redis.asyncio as redis
import structlog
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from sluice.runtime.breaker import BreakerConfig, BreakerState, CircuitBreaker

log = structlog.get_logger(__name__)
R = TypeVar("R")


class StoreUnavailable(Exception):
    """The store could not be reached (or its breaker is open)."""


class KeyValueStore(Protocol):
    """What the cache needs from a store."""

    async def get(self, key: str) -> bytes | None:
        """The value at ``key``, or None."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        """Write ``value`` at ``key`` with a TTL."""
        ...

    async def delete_matching(self, pattern: str) -> int:
        """Delete every key matching a glob pattern; returns how many."""
        ...

    def available(self) -> bool:
        """False while the store is known to be down."""
        ...


def fail_fast_redis(url: str, timeout_s: float = 0.25) -> redis.Redis:
    """A redis-py asyncio client that fails in ~``timeout_s`` instead of seconds."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )


class RedisStore:
    """:class:`KeyValueStore` over Redis, guarded by a circuit breaker."""

    def __init__(self, client: redis.Redis, breaker: CircuitBreaker | None = None) -> None:
        self._client = client
        self.breaker = breaker or CircuitBreaker(BreakerConfig(failure_threshold=3, open_s=2.0))
        self.errors = 0

    def available(self) -> bool:
        return self.breaker.state is not BreakerState.OPEN

    async def _call(self, op: str, coro_factory: Callable[[], Awaitable[R]]) -> R:
        if not self.breaker.allow():
            raise StoreUnavailable("redis breaker open")
        try:
            result = await coro_factory()
        except (RedisError, OSError) as exc:
            self.errors += 1
            self.breaker.record_failure()
            log.warning(
                "redis_command_failed", op=op, error=repr(exc), breaker=self.breaker.state.value
            )
            raise StoreUnavailable(str(exc)) from exc
        self.breaker.record_success()
        return result

    async def get(self, key: str) -> bytes | None:
        value = await self._call("get", lambda: self._client.get(key))
        return value if value is None or isinstance(value, bytes) else value.encode()

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        await self._call("set", lambda: self._client.set(key, value, ex=ttl_s))

    async def delete_matching(self, pattern: str) -> int:
        async def run() -> int:
            deleted = 0
            batch: list[bytes] = []
            async for key in self._client.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await self._client.unlink(*batch)
                    batch.clear()
            if batch:
                deleted += await self._client.unlink(*batch)
            return deleted

        return await self._call("delete_matching", run)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
