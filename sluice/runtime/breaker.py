"""A small circuit breaker (closed → open → half-open), driven by an injected clock.

Defaults follow the project's requirements: open after 5 consecutive failures (or, with
``failure_rate`` set, when at least that share of the calls in the last ``window_s`` failed,
over at least ``min_calls`` calls), allow a half-open probe after 5 s, and never stay open
longer than 30 s per round (the open time doubles on each failed probe, capped at
``max_open_s``).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class BreakerState(enum.Enum):
    """Breaker states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    """When a breaker opens and how long it stays open."""

    failure_threshold: int = 5
    """Consecutive failures that open the breaker."""
    open_s: float = 5.0
    """Time open before a half-open probe is allowed."""
    max_open_s: float = 30.0
    """Longest open period of one round (after repeated failed probes)."""
    close_after_successes: int = 1
    """Successful probes needed to close again."""
    failure_rate: float = 0.0
    """Share of failed calls within ``window_s`` that opens the breaker; 0 disables."""
    window_s: float = 10.0
    """Window of the failure rate."""
    min_calls: int = 20
    """Calls the window needs before its failure rate counts."""


class CircuitBreaker:
    """Tracks one dependency's health. Not thread-safe; use from one event loop."""

    def __init__(
        self, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._open_for = self.config.open_s
        self._probe_out = False
        self._calls: deque[tuple[float, bool]] = deque()
        self._failed_in_window = 0

    def _window_tripped(self, ok: bool) -> bool:
        """Record a call in the rate window; True when the failure rate opens the breaker."""
        if self.config.failure_rate <= 0:
            return False
        now = self._clock()
        self._calls.append((now, ok))
        self._failed_in_window += not ok
        while self._calls and now - self._calls[0][0] > self.config.window_s:
            _, good = self._calls.popleft()
            self._failed_in_window -= not good
        if len(self._calls) < self.config.min_calls:
            return False
        return self._failed_in_window / len(self._calls) >= self.config.failure_rate

    @property
    def state(self) -> BreakerState:
        """The current state (OPEN turns HALF_OPEN once its open period has passed)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._open_for:
            self._state = BreakerState.HALF_OPEN
            self._probe_out = False
        return self._state

    def allow(self) -> bool:
        """May a call go through now? In HALF_OPEN, only one probe at a time."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return True
        return False

    def record_success(self) -> None:
        """A call succeeded."""
        if self.state is BreakerState.HALF_OPEN:
            self._successes += 1
            self._probe_out = False
            if self._successes >= self.config.close_after_successes:
                self._state = BreakerState.CLOSED
                self._open_for = self.config.open_s
        elif self._state is BreakerState.CLOSED:
            self._window_tripped(True)
        self._failures = 0

    def record_failure(self) -> None:
        """A call failed."""
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._open_for = min(self._open_for * 2, self.config.max_open_s)
            self._trip()
            return
        self._failures += 1
        if state is not BreakerState.CLOSED:
            return
        by_rate = self._window_tripped(False)
        if by_rate or self._failures >= self.config.failure_threshold:
            self._trip()

    def _trip(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._failures = 0
        self._successes = 0
        self._probe_out = False
        self._calls.clear()
        self._failed_in_window = 0
