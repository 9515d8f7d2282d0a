"""What can become of one attempt of a job line, and the measures the worker keeps.

- :class:`Deferred`: refused for overload, try again after RetryInfo;
- :class:`Failed`: failed, for good when the request is at fault (:data:`PERMANENT`);
- :func:`persist`: a store write retried while Redis is unreachable;
- :class:`JobRate`: the rate completed lines get, cluster-wide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from redis.exceptions import RedisError

from sluice.runtime.errors import SluiceError
from sluice.v1 import jobs_pb2

T = TypeVar("T")

PERMANENT = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Codes that mean the line itself is at fault: retrying cannot help."""


class Deferred(Exception):
    """A line refused for overload: try again after ``retry_after_s``."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"deferred {retry_after_s:.2f}s")
        self.retry_after_s = retry_after_s


class Failed(Exception):
    """A line attempt failed; ``permanent`` when the request is at fault."""

    def __init__(self, error: jobs_pb2.LineError, *, permanent: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.permanent = permanent


class JobRate:
    """Weighted tokens per second the jobs of the whole cluster get: an exponential moving
    average of the settled lines' estimated work, sampled while jobs run."""

    def __init__(self, half_life_s: float = 30.0, memory_s: float = 120.0) -> None:
        self.value = 0.0
        self._half_life = half_life_s
        self._memory = memory_s
        self._last: tuple[float, float] | None = None
        self._observed_at = float("-inf")

    def observe(self, settled_tokens: float, now: float, *, running: bool) -> None:
        """One sample of the cluster's settled-work counter."""
        last, self._last = self._last, (now, settled_tokens)
        if last is None or not running or now <= last[0] or settled_tokens < last[1]:
            return
        dt = now - last[0]
        sample = (settled_tokens - last[1]) / dt
        alpha = 1 - 0.5 ** (dt / self._half_life)
        self.value = sample if self.value == 0 else self.value + alpha * (sample - self.value)
        self._observed_at = now

    def rate(self, capacity: float, now: float) -> float:
        """The measured rate when jobs ran recently, else ``capacity``."""
        if self.value > 0 and now - self._observed_at < self._memory:
            return self.value
        return capacity


async def persist(write: Callable[[], Awaitable[T]], attempts: int = 30) -> T:
    """Run a store write, trying again while Redis is unreachable (up to ~30 s): a computed
    result is kept through a Redis restart rather than computed again after a reclaim.
    Scripts are idempotent (a result is stored once by custom_id)."""
    for attempt in range(attempts):
        try:
            return await write()
        except RedisError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(min(1.0, 0.1 * 2**attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def line_error(exc: BaseException, number: int) -> jobs_pb2.LineError:
    if isinstance(exc, SluiceError):
        return jobs_pb2.LineError(
            code=exc.code.value[0], reason=exc.reason, message=f"line {number}: {exc.message}"
        )
    return jobs_pb2.LineError(
        code=grpc.StatusCode.INTERNAL.value[0], reason="INTERNAL", message=f"line {number}"
    )
