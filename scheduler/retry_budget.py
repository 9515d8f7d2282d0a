"""The retry budget: retries add at most a fixed share of load over a sliding window."""

from __future__ import annotations

import math

from scheduler.queues import Clock


class RetryBudget:
    """Retries may add at most ``ratio`` extra load over a sliding window.

    Every first attempt deposits ``ratio`` of a retry; a retry spends one. ``min_retries`` per
    window (1/s by default, as Finagle's floor) are always allowed so a lightly used scheduler
    can still retry a dead node's requests. Without a budget, retries multiply load exactly
    when the fleet is failing.

    Attempts are counted, not stored: ``buckets`` ring slots of ``window_s / buckets`` seconds
    each (Finagle's windowed adder), so memory is the same at one request a minute or a million
    a second. The window slides a slot at a time: an attempt counts for between
    ``window_s - window_s / buckets`` and ``window_s`` after it was made, and over any
    ``buckets`` consecutive slots retries stay within ``max(min_retries, ratio × requests)``.
    """

    def __init__(
        self,
        clock: Clock,
        ratio: float = 0.2,
        window_s: float = 10.0,
        min_retries: int = 10,
        buckets: int = 10,
    ) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError("window_s must be positive and buckets at least 1")
        self._clock = clock
        self._ratio = ratio
        self._min = min_retries
        self._slot_s = window_s / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._request_sum = 0
        self._retry_sum = 0
        self._slot = self._slot_at(clock())

    @property
    def buckets(self) -> int:
        """Slots the counts live in (fixed at construction)."""
        return len(self._requests)

    def _slot_at(self, now: float) -> int:
        return math.floor(now / self._slot_s)

    def _advance(self) -> int:
        """Clear the slots the window has left since the last call; the current slot's index.
        A clock that goes back keeps the current slot."""
        slot = self._slot_at(self._clock())
        n = len(self._requests)
        if slot > self._slot:
            for s in range(self._slot + 1, min(slot, self._slot + n) + 1):
                i = s % n
                self._request_sum -= self._requests[i]
                self._retry_sum -= self._retries[i]
                self._requests[i] = self._retries[i] = 0
            self._slot = slot
        return self._slot % n

    def record_request(self) -> None:
        """A first attempt was made."""
        self._requests[self._advance()] += 1
        self._request_sum += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        i = self._advance()
        allowed = max(self._min, math.floor(self._ratio * self._request_sum))
        if self._retry_sum >= allowed:
            return False
        self._retries[i] += 1
        self._retry_sum += 1
        return True
