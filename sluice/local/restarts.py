"""When `sluice up` restarts a crashed child: exponential backoff and giving up, as a synchronous,
I/O-free object that takes a clock (tested with a fake one). The supervisor's loop owns the
processes and asks this object what to do each time one of them crashes."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartRules:
    """How a crashing child is restarted (docs/decisions/local-supervisor-restarts.md)."""

    first_delay_s: float = 0.5
    """Wait before the first restart: long enough not to spin on a fault that repeats at once,
    short next to a node's start (seconds), so a one-off crash costs little."""
    factor: float = 2.0
    """Each crash in a row multiplies the wait by this."""
    max_delay_s: float = 30.0
    """The wait never grows past this: a child that keeps failing slowly is tried twice a minute."""
    stable_after_s: float = 60.0
    """A child that stayed up this long before crashing starts the backoff afresh."""
    max_crashes: int = 5
    """This many crashes within ``window_s`` and the child is given up (not restarted)."""
    window_s: float = 60.0
    """The window ``max_crashes`` is counted in."""


@dataclass(frozen=True)
class Verdict:
    """What to do about one crash."""

    restart: bool
    """False: give the child up."""
    delay_s: float
    """Wait this long before restarting (0 when giving up)."""
    crashes: int
    """Crashes within the window, this one included."""
    restarts: int
    """Restarts so far, the one decided here included."""
    uptime_s: float
    """How long the child ran before this crash."""


class RestartPolicy:
    """Backoff for one child.

    Algorithm: the n-th crash in a row waits ``first_delay_s * factor**(n-1)``, capped at
    ``max_delay_s``; a crash after the child stayed up ``stable_after_s`` counts as the first in
    a row again. The ``max_crashes``-th crash within ``window_s`` gives the child up.

    Guarantees: a child that crashes soon after each start (by default: within about 13 s, so
    that five crashes and 0.5 + 1 + 2 + 4 s of waiting fit in 60 s) is restarted
    ``max_crashes - 1`` times, then given up; one that crashes now and then (after a stable
    run) is restarted every time, after ``first_delay_s``. Failure mode: a child that crashes
    less often than ``max_crashes`` per window but never stays up ``stable_after_s`` is never
    given up; it is restarted every ``max_delay_s``.
    """

    def __init__(
        self,
        rules: RestartRules | None = None,
        clock: Callable[[], float] = time.monotonic,
        started_at: float | None = None,
    ) -> None:
        self.rules = rules or RestartRules()
        self._clock = clock
        self._started_at = clock() if started_at is None else started_at
        self._in_a_row = 0
        self._crashes: deque[float] = deque()
        self.restarts = 0
        """Restarts so far."""

    def started(self) -> None:
        """The child was (re)started now."""
        self._started_at = self._clock()

    def uptime_s(self) -> float:
        """Seconds since the child was last (re)started."""
        return self._clock() - self._started_at

    def crashed(self) -> Verdict:
        """The child crashed now: restart it (after a delay) or give it up."""
        rules = self.rules
        now = self._clock()
        uptime = now - self._started_at
        if uptime >= rules.stable_after_s:
            self._in_a_row = 0
        self._crashes.append(now)
        while self._crashes[0] <= now - rules.window_s:
            self._crashes.popleft()
        crashes = len(self._crashes)
        if crashes >= rules.max_crashes:
            return Verdict(False, 0.0, crashes, self.restarts, uptime)
        delay = min(rules.max_delay_s, rules.first_delay_s * rules.factor**self._in_a_row)
        self._in_a_row += 1
        self.restarts += 1
        return Verdict(True, delay, crashes, self.restarts, uptime)
