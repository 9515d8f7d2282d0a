"""The size of the embedding thread's forwards, from the latency curve the node measures as it
runs (:class:`BatchSizer`, used by :mod:`inference_node.embed_batcher`), and the pace in
seconds per character that bounds the lower-class texts one forward takes."""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_PACE_CHARS = 200
"""Forwards of fewer characters leave the measured pace alone: their fixed cost dominates."""


@dataclass
class _Curve:
    """Moving averages of one size class's batches: texts and seconds; the batch count at
    its last update."""

    texts: float
    seconds: float
    updated: int

    @property
    def throughput(self) -> float:
        """Texts per second."""
        return self.texts / max(self.seconds, 1e-9)


class BatchSizer:
    """The most texts one forward may take, from the latency curve measured as the node runs.

    Algorithm: each forward is filed under its size class (the power of two at or below its
    text count) as moving averages of texts and seconds. The limit is the largest class
    reached by walking up from 1 while each class's latency stays within
    ``latency_bound_s`` and its throughput is no worse than ``1 - tolerance`` of the best
    below it; a class not measured yet stops the walk and becomes the limit (a batch may grow
    into it, which measures it). A class that stopped the walk is tried again once
    ``retry_after`` forwards have passed without it (the machine's load may have changed),
    its old average replaced by the new forward. A forward that failed (:meth:`failed`)
    counts its class as over the bound. All classes within bounds: ``max_size``.
    Guarantees: 1 ≤ limit ≤ ``max_size``; ``max_size`` 1 runs every request alone. Failure
    mode: a curve measured while other work took the CPUs misleads it until the retry; the
    latency bound keeps a wrong guess from growing forwards without limit.
    """

    def __init__(
        self,
        *,
        max_size: int,
        latency_bound_s: float,
        tolerance: float = 0.1,
        retry_after: int = 64,
        smoothing: float = 0.3,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.latency_bound_s = latency_bound_s
        self.tolerance = tolerance
        self.retry_after = retry_after
        self.smoothing = smoothing
        self.limit = 1
        self.seconds_per_char: float | None = None
        """Moving average of a forward's seconds per character of its texts, over forwards of
        :data:`MIN_PACE_CHARS` or more (None before one): what lower-class texts cost."""
        self._curves: dict[int, _Curve] = {}
        self._batches = 0

    @staticmethod
    def size_class(texts: int) -> int:
        """The power of two at or below ``texts`` (≥ 1)."""
        return 1 << (max(texts, 1).bit_length() - 1)

    def curve(self) -> dict[int, tuple[float, float]]:
        """Size class → (average latency in seconds, texts per second), as measured."""
        return {k: (c.seconds, c.throughput) for k, c in sorted(self._curves.items())}

    def record(self, texts: int, seconds: float, chars: int = 0) -> None:
        """One forward of ``texts`` texts (``chars`` characters) took ``seconds``; moves the
        limit and the pace."""
        if chars >= MIN_PACE_CHARS and math.isfinite(seconds):
            pace, self.seconds_per_char = self.seconds_per_char, seconds / chars
            if pace is not None:
                self.seconds_per_char = pace + self.smoothing * (seconds / chars - pace)
        self._batches += 1
        key = self.size_class(texts)
        curve = self._curves.get(key)
        if curve is None or self._stale(curve):
            self._curves[key] = _Curve(texts, seconds, self._batches)
        else:
            a = self.smoothing
            curve.texts += a * (texts - curve.texts)
            curve.seconds += a * (seconds - curve.seconds)
            curve.updated = self._batches
        self.limit = self._choose()

    def chars_within(self, seconds: float | None) -> float:
        """Characters of texts one forward takes in ``seconds`` at the measured pace (no bound
        without a pace or ``seconds``)."""
        pace = self.seconds_per_char
        return math.inf if seconds is None or not pace else seconds / pace

    def failed(self, texts: int) -> None:
        """A forward of ``texts`` texts failed (out of memory, say): its size class counts as
        over the latency bound, so the limit falls below it until the class is retried
        (``retry_after`` forwards later)."""
        self._batches += 1
        self._curves[self.size_class(texts)] = _Curve(texts, math.inf, self._batches)
        self.limit = self._choose()

    def _stale(self, curve: _Curve) -> bool:
        return self._batches - curve.updated > self.retry_after

    def _choose(self) -> int:
        best = 0.0
        size = 1
        while size <= self.max_size:
            curve = self._curves.get(size)
            if curve is None:
                return size
            worse = curve.throughput < best * (1 - self.tolerance)
            if curve.seconds > self.latency_bound_s or worse:
                return size if self._stale(curve) else max(1, size // 2)
            best = max(best, curve.throughput)
            size *= 2
        return self.max_size
