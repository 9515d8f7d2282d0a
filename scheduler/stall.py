"""Stall detection: end the streams of a node that stopped making progress.

A stream is stalled when neither it nor its node has shown life for longer than a bound: no
chunk on the stream and no load report from the node (reports come every ~200 ms while the
node's event loop runs). The bound is the stream's own inter-token time times
``itl_factor``, clamped to [``floor_s``, ``ceiling_s``], so a frozen, partitioned or
black-holed node's streams end within ``ceiling_s`` + ``check_s`` while a slow but live node
(a long prefill, a full batch) keeps reporting and is left alone.

Synchronous and I/O-free, with an injected clock: :class:`StallWatch` only decides and calls
each stalled stream's ``cancel``; the dispatcher sweeps it periodically and turns a cancelled
stream into a node failure (a retry elsewhere before the first chunk, ``UNAVAILABLE`` after).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StallPolicy:
    """When a stream counts as stalled, and how often to look."""

    floor_s: float = 1.5
    """Shortest bound: above any pause of a healthy stream (pacing, a prefill step)."""
    ceiling_s: float = 3.0
    """Longest bound: a stalled stream ends within this plus ``check_s``."""
    itl_factor: float = 20.0
    """The bound in inter-token times of the stream, between floor and ceiling."""
    check_s: float = 0.25
    """How often the dispatcher sweeps its streams."""

    def bound_s(self, itl_s: float | None) -> float:
        """How long a stream may go without a chunk while its node is silent too."""
        if itl_s is None:
            return self.ceiling_s
        return min(self.ceiling_s, max(self.floor_s, self.itl_factor * itl_s))


@dataclass(eq=False)
class WatchedStream:
    """One stream in flight on a node, as the dispatcher updates it."""

    node_id: str
    last_report_at: Callable[[], float]
    """When the node last reported its load (monotonic)."""
    cancel: Callable[[], object]
    started_at: float
    last_chunk_at: float = 0.0
    first_chunk_at: float = 0.0
    tokens: int = 0
    """Tokens received after the first chunk (for the inter-token time)."""
    stalled: bool = False

    def chunk(self, now: float, tokens: int) -> None:
        """Record a chunk of ``tokens`` tokens arriving at ``now``."""
        if not self.first_chunk_at:
            self.first_chunk_at = now
        else:
            self.tokens += tokens
        self.last_chunk_at = now

    @property
    def itl_s(self) -> float | None:
        """The stream's mean inter-token time so far, when it has one."""
        if self.tokens <= 0:
            return None
        return (self.last_chunk_at - self.first_chunk_at) / self.tokens


@dataclass
class StallWatch:
    """The streams being watched; :meth:`sweep` cancels the stalled ones."""

    clock: Callable[[], float]
    policy: StallPolicy = field(default_factory=StallPolicy)
    streams: set[WatchedStream] = field(default_factory=set)

    def watch(
        self, node_id: str, last_report_at: Callable[[], float], cancel: Callable[[], object]
    ) -> WatchedStream:
        """Start watching a stream (call :meth:`unwatch` when it ends, however it ends)."""
        stream = WatchedStream(node_id, last_report_at, cancel, started_at=self.clock())
        self.streams.add(stream)
        return stream

    def unwatch(self, stream: WatchedStream) -> None:
        self.streams.discard(stream)

    def sweep(self) -> list[WatchedStream]:
        """Mark and cancel every stalled stream; returns them."""
        now = self.clock()
        stalled = []
        for stream in list(self.streams):
            quiet_since = max(stream.last_chunk_at or stream.started_at, stream.last_report_at())
            if now - quiet_since > self.policy.bound_s(stream.itl_s):
                stream.stalled = True
                self.streams.discard(stream)
                stream.cancel()
                stalled.append(stream)
        return stalled
