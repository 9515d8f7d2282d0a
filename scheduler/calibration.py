"""How much longer than predicted REALTIME waits and first tokens turned out lately: the pad
admission adds to its predictions (split conformal prediction on a sliding window); how long
``Embed`` calls took lately (:class:`EmbedTimes`), what admission counts for the next one.

Figures: docs/decisions/scheduler-wait-calibration.md, scheduler-first-token-calibration.md.
Failure mode: a pad learned in one overload outlives it for at most ``stale_s``; in that
time a REALTIME request that would queue may be refused where it would have waited in time.
"""

from __future__ import annotations

import math
from collections import deque

from scheduler.queues import Clock
from sluice.contract import WorkloadClass

FIRST_TOKEN_CALIBRATED_FROM = 0.5
"""Share of the TTFT target from which first-token predictions are calibrated and padded:
near the target, where admission decides (everywhere, a first burst's overruns refused a
third of a probe's requests: ``docs/decisions/scheduler-first-token-calibration.md``)."""
STALE_WAIT_S = 300.0
"""How old REALTIME wait samples may be to pad the first seconds of the next overload."""


class WaitCalibration:
    """How much longer than predicted the queue kept REALTIME requests of a model lately (or
    their first token took after dispatch: ``Admission.first_token_calibration``):
    the ``quantile`` of (waited - predicted) over the last ``window`` such requests within
    ``max_age_s``. A prediction counts only the work it can see; promotions, slot shares and
    streams ending together move real waits off it, by 2-6x at the tail (bench-slo overload
    4x), and the margin pads the wait the TTFT target and the queue bound judge by what the
    queue did, whatever the cause. While fewer than ``min_samples`` are that recent, the
    newest ``min_samples`` within ``stale_s`` stand in (0: none): the last overload's queue
    guesses best for the next one's first seconds. A sample comes only from a request that
    queued and started, so a pad that refuses every queued request is never replaced; the
    bound ends it."""

    def __init__(
        self,
        clock: Clock,
        window: int = 64,
        max_age_s: float = 60.0,
        quantile: float = 0.9,
        min_samples: int = 8,
        stale_s: float = 0.0,
    ) -> None:
        self._clock = clock
        self._window = window
        self._max_age = max_age_s
        self._quantile = quantile
        self._min_samples = min_samples
        self._stale = max(max_age_s, stale_s)
        self._samples: dict[str, deque[tuple[float, float]]] = {}

    def record(self, model: str, predicted_s: float, waited_s: float) -> None:
        """A request predicted to wait ``predicted_s`` (before calibration) waited
        ``waited_s``."""
        samples = self._samples.setdefault(model, deque(maxlen=self._window))
        samples.append((self._clock(), waited_s - predicted_s))

    def margin(self, model: str) -> float:
        """Seconds to add to a predicted wait (0 until ``min_samples`` are recent, or within
        ``stale_s``)."""
        samples = self._samples.get(model)
        if not samples:
            return 0.0
        now = self._clock()
        while samples and samples[0][0] < now - self._stale:
            samples.popleft()
        recent = [r for at, r in samples if at >= now - self._max_age]
        if len(recent) < self._min_samples:
            recent = [r for _, r in samples][-self._min_samples :]
        if len(recent) < self._min_samples:
            return 0.0
        residuals = sorted(recent)
        rank = min(len(residuals) - 1, math.ceil(self._quantile * len(residuals)) - 1)
        return max(0.0, residuals[rank])


EMBED_SMOOTHING = 0.2
"""Weight of each new ``Embed`` call's seconds in its moving average."""
EMBED_WINDOW = 32
"""Calls whose fastest is an ``Embed``'s unloaded time."""


class EmbedTimes:
    """Per embedding model and class, how long its node calls took (the call as the scheduler
    waits for it: the node's embedding queue and its forward): the moving average, and the
    fastest of the last :data:`EMBED_WINDOW`, what one takes with nothing ahead of it."""

    def __init__(self) -> None:
        self._average: dict[tuple[str, WorkloadClass], float] = {}
        self._recent: dict[tuple[str, WorkloadClass], deque[float]] = {}

    def record(self, model: str, workload_class: WorkloadClass, seconds: float) -> None:
        """A node answered an ``Embed`` of ``model`` and ``workload_class`` in ``seconds``."""
        key = (model, workload_class)
        old = self._average.get(key)
        self._average[key] = seconds if old is None else old + EMBED_SMOOTHING * (seconds - old)
        self._recent.setdefault(key, deque(maxlen=EMBED_WINDOW)).append(seconds)

    def seconds(self, model: str, workload_class: WorkloadClass) -> float:
        """The calls' moving average (0 before the first)."""
        return self._average.get((model, workload_class), 0.0)

    def fastest(self, model: str, workload_class: WorkloadClass) -> float:
        """The fastest of the last calls (0 before the first)."""
        return min(self._recent.get((model, workload_class), ()), default=0.0)
