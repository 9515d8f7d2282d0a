"""When the SDK retries a call, and after how long: :class:`RetryPolicy` and the per-call
book-keeping both clients share (:class:`CallAttempts`). No I/O here; the clients sleep.

Rules:

- ``RESOURCE_EXHAUSTED``: retried after the server's ``RetryInfo.retry_delay`` (never earlier;
  jitter only adds), else after an exponential backoff.
- ``UNAVAILABLE``: retried only while nothing of the response has arrived. A transport failure
  (no status details: the scheduler was not reached) marks the endpoint as failed and is retried
  at once on another endpoint when there is one; a refusal from the scheduler (e.g. no node can
  serve, with ``RetryInfo``) is retried after its delay like ``RESOURCE_EXHAUSTED``. A failed
  TLS handshake (untrusted certificate, wrong name, plaintext server) is retried only on another
  endpoint: waiting does not change a certificate.
- Nothing else is retried, and nothing at all once a chunk of a stream has been delivered,
  unless the stream can be resumed (``WatchJob``, ``GetJobResults``): then it is re-opened where
  it left off, and each failure after progress starts a fresh budget (:meth:`CallAttempts.renew`).
- A retry is made only while attempts remain (``max_attempts``), its start is within
  ``total_timeout_s`` of the first attempt, and the call's own deadline leaves time for it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from sluice.sdk.endpoints import EndpointPool
from sluice.sdk.errors import SluiceRpcError

RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
MIN_ATTEMPT_S = 0.05
"""A retry is pointless when less than this is left of the call's deadline."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries refused and unreachable calls. ``retry=None`` turns retries off.

    ```python
    from sluice import Client, RetryPolicy

    client = Client("127.0.0.1:50051", retry=RetryPolicy(max_attempts=3, total_timeout_s=10))
    ```
    """

    max_attempts: int = 5
    """Most attempts per call, the first included (1: never retry)."""
    total_timeout_s: float = 30.0
    """No retry starts later than this many seconds after the first attempt began."""
    initial_backoff_s: float = 0.2
    """Delay before the first retry when the server gave no ``RetryInfo``."""
    max_backoff_s: float = 5.0
    """Longest backoff delay (a server's ``RetryInfo`` delay is not capped by it)."""
    backoff_multiplier: float = 2.0
    """Each further backoff is this many times the previous one."""
    jitter: float = 0.2
    """Random spread, as a fraction: a server's delay ``d`` becomes ``d × U(1, 1 + jitter)``
    (never earlier than asked), a backoff ``b`` becomes ``b × U(1 - jitter, 1 + jitter)``."""
    retry_resource_exhausted: bool = True
    """Retry ``RESOURCE_EXHAUSTED`` (over quota, overloaded)."""
    retry_unavailable: bool = True
    """Retry ``UNAVAILABLE`` before any part of the response arrived."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """The jittered exponential delay before retry number ``retry`` (1 for the first)."""
        base = min(
            self.max_backoff_s, self.initial_backoff_s * self.backoff_multiplier ** (retry - 1)
        )
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)

    def server_delay_s(self, delay_s: float, rng: random.Random) -> float:
        """The server's ``RetryInfo`` delay, jittered upwards only."""
        return delay_s * rng.uniform(1.0, 1.0 + self.jitter)

    def delay_s(
        self, error: SluiceRpcError, retry: int, rng: random.Random, *, other_endpoint: bool
    ) -> float | None:
        """How long to wait before retry number ``retry`` after ``error``; None: do not retry
        this kind of error. Attempt and time bounds are :class:`CallAttempts`' business."""
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_resource_exhausted:
            pass
        elif error.code == grpc.StatusCode.UNAVAILABLE and self.retry_unavailable:
            if is_transport_failure(error) and other_endpoint:
                return 0.0
            if is_tls_failure(error):
                return None
        else:
            return None
        server = error.retry_after_s
        if server is not None:
            return self.server_delay_s(server, rng)
        return self.backoff_s(retry, rng)


def is_transport_failure(error: SluiceRpcError) -> bool:
    """True for an ``UNAVAILABLE`` the scheduler did not send (it always attaches details)."""
    return error.code == grpc.StatusCode.UNAVAILABLE and not error.details


TLS_FAILURE_MARKS = ("handshake failed", "verification check failed", "security handshaker")
"""How gRPC core words a failed TLS handshake in the status message (it has no code of its own):
``Tls handshake failed (TSI_PROTOCOL_FAILURE): ... CERTIFICATE_VERIFY_FAILED``, ``Custom
verification check failed with error: ... Hostname Verification Check failed``, ``Failed to
create security handshaker`` (unusable credentials)."""


def is_tls_failure(error: SluiceRpcError) -> bool:
    """True for a transport failure in the TLS handshake."""
    message = error.message.lower()
    return is_transport_failure(error) and any(mark in message for mark in TLS_FAILURE_MARKS)


class CallAttempts:
    """One logical call's attempts: which endpoint to try next and whether to retry a failure.

    Both clients drive it the same way::

        attempts = CallAttempts(policy, pool, timeout_s)
        while True:
            endpoint = attempts.next_endpoint()
            try: return call(endpoint, timeout=attempts.remaining_s())
            except RpcError as exc:
                delay = attempts.failed(endpoint, error := typed(exc), received=False)
                if delay is None: raise error
                sleep(delay)
    """

    def __init__(
        self,
        policy: RetryPolicy | None,
        pool: EndpointPool,
        timeout_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._policy = policy
        self._pool = pool
        self._clock = clock
        self._rng = rng or random.Random()
        self.started = clock()
        self.deadline = self.started + timeout_s
        self.count = 0
        """Attempts started so far."""
        self._tried: set[str] = set()

    def next_endpoint(self) -> str:
        """The endpoint for the next attempt (counts it): round robin over the usable ones,
        preferring endpoints this call has not tried yet."""
        self.count += 1
        endpoint = self._pool.pick(avoid=self._tried)
        self._tried.add(endpoint)
        return endpoint

    def renew(self, endpoint: str) -> None:
        """Give a resumable stream that made progress a fresh budget: the attempt that just
        failed on ``endpoint`` becomes the first of a new call (``max_attempts`` and
        ``total_timeout_s`` count from now); the call's deadline stays."""
        self.count = 1
        self.started = self._clock()
        self._tried = {endpoint}

    def remaining_s(self) -> float:
        """Seconds left of the call's deadline (the timeout of the next attempt)."""
        return max(0.0, self.deadline - self._clock())

    def failed(self, endpoint: str, error: SluiceRpcError, *, received: bool) -> float | None:
        """Record a failed attempt; returns the delay before the next one, or None to give up.

        ``received``: whether any part of the response already reached the caller.
        """
        error.attempts = self.count
        if is_transport_failure(error):
            self._pool.mark_failed(endpoint)
        policy = self._policy
        if policy is None or received or self.count >= policy.max_attempts:
            return None
        other = self._pool.has_usable(avoid=self._tried)
        delay = policy.delay_s(error, self.count, self._rng, other_endpoint=other)
        if delay is None:
            return None
        now = self._clock()
        if now + delay - self.started > policy.total_timeout_s:
            return None
        if self.deadline - (now + delay) < MIN_ATTEMPT_S:
            return None
        if not other:
            self._tried.clear()  # every endpoint was tried: round robin starts over
        return delay


__all__ = ["CallAttempts", "RetryPolicy", "is_tls_failure", "is_transport_failure"]
