"""What can become of one attempt of a job line, and the measures the worker keeps.

- :class:`Deferred`: refused for overload, try again after RetryInfo;
- :class:`Failed`: failed, for good when the request is at fault (:data:`PERMANENT`);
- :func:`persist`: a store write retried while Redis is unreachable;
- :class:`JobRate`: the rate lines get when jobs keep the nodes busy, cluster-wide;
- :class:`Saturation`: whether they did, between two samples.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from redis.exceptions import RedisError

from scheduler.jobs.store import Delivery, now_ms
from sluice.runtime.errors import SluiceError
from sluice.v1 import inference_pb2, jobs_pb2

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
    """Weighted tokens per second jobs get when they keep the nodes busy, cluster-wide: an
    exponential moving average of the settled-work counter, sampled only over intervals in
    which jobs had more lines ready than could start (``saturated``). A one-line job and the
    tail of a job say what those lines needed, not what the nodes can give, so they are not
    sampled. A measured rate stands for ``memory_s`` after its last sample (jobs come and
    go); then, or before any, the caller's capacity estimate stands in (so a rate measured in
    a bad moment cannot refuse jobs forever)."""

    def __init__(self, half_life_s: float = 10.0, memory_s: float = 600.0) -> None:
        self.value = 0.0
        self._half_life = half_life_s
        self._memory = memory_s
        self._last: tuple[float, float] | None = None
        self._sampled_at = float("-inf")

    def observe(self, settled_tokens: float, now: float, *, saturated: bool) -> None:
        """One sample of the cluster's settled-work counter; ``saturated``: jobs had lines
        waiting for room over the whole interval since the last sample."""
        last, self._last = self._last, (now, settled_tokens)
        if last is None or not saturated or now <= last[0] or settled_tokens < last[1]:
            return
        dt = now - last[0]
        sample = (settled_tokens - last[1]) / dt
        alpha = 1 - 0.5 ** (dt / self._half_life)
        fresh = now - self._sampled_at > self._memory
        self.value = sample if fresh else self.value + alpha * (sample - self.value)
        self._sampled_at = now

    def rate(self, capacity: float, now: float) -> float:
        """The measured rate while recent, else ``capacity``."""
        if self.value > 0 and now - self._sampled_at <= self._memory:
            return self.value
        return capacity


class Saturation:
    """Whether jobs had lines ready (more than this replica could start: it takes them as
    the nodes' room allows), tick by tick between two samples: saturated when at least
    ``share`` of the ticks had. A job's tail (every line taken) and the time between jobs
    are not."""

    def __init__(self, share: float = 0.8) -> None:
        self._share = share
        self._ticks = 0
        self._full = 0

    def tick(self, full: bool) -> None:
        """One look at the worker: ``full`` when some job had lines not yet taken."""
        self._ticks += 1
        self._full += full

    def take(self) -> bool:
        """Saturated since the last call; starts a new interval."""
        saturated = self._ticks > 0 and self._full >= self._share * self._ticks
        self._ticks = self._full = 0
        return saturated


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


def classify(exc: SluiceError, admitted: bool, number: int) -> Deferred | Failed:
    """What a refusal or failure of line ``number`` means: overload (RESOURCE_EXHAUSTED, or
    UNAVAILABLE before a node started it) defers it; the rest fail it, for good when the
    request is at fault."""
    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED or (
        exc.code == grpc.StatusCode.UNAVAILABLE and not admitted
    ):
        return Deferred(exc.retry_after() or 1.0)
    return Failed(line_error(exc, number), permanent=exc.code in PERMANENT)


def line_result(
    line: jobs_pb2.JobLine,
    delivery: Delivery,
    *,
    generate: jobs_pb2.GenerateResult | None = None,
    embed: inference_pb2.EmbedResponse | None = None,
) -> jobs_pb2.JobResult:
    """The result of a line that got its answer."""
    result = jobs_pb2.JobResult(
        custom_id=line.custom_id,
        deliveries=delivery.deliveries,
        line_number=delivery.line_number,
        finished_at_unix_ms=now_ms(),
    )
    if generate is not None:
        result.generate.CopyFrom(generate)
    elif embed is not None:
        result.embed.CopyFrom(embed)
    return result


def line_error(exc: BaseException, number: int) -> jobs_pb2.LineError:
    if isinstance(exc, SluiceError):
        return jobs_pb2.LineError(
            code=exc.code.value[0], reason=exc.reason, message=f"line {number}: {exc.message}"
        )
    return jobs_pb2.LineError(
        code=grpc.StatusCode.INTERNAL.value[0], reason="INTERNAL", message=f"line {number}"
    )
