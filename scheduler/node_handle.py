"""One inference node as the scheduler sees it: its channel, breaker, health, load book and
measured rates (:class:`scheduler.nodes.NodeDirectory` keeps one per registered node)."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import grpc

from scheduler.admission import ThroughputMeter
from scheduler.prefill import PrefillGuard
from scheduler.routing import LoadBook
from sluice.contract import WorkloadClass
from sluice.runtime.breaker import CircuitBreaker
from sluice.v1 import common_pb2, node_pb2_grpc

POOL_FOR_CLASS: dict[WorkloadClass, str] = {
    WorkloadClass.REALTIME: "realtime",
    WorkloadClass.BATCH: "realtime",
    WorkloadClass.FINETUNE: "finetune",
}


def classes_of(report: common_pb2.LoadReport) -> dict[WorkloadClass, int]:
    """The sequences (running and waiting) of each class a load report shows; a class the
    contract does not know counts as the top one (it may not be preempted)."""
    out: dict[WorkloadClass, int] = {}
    for counts in report.classes:
        try:
            cls = WorkloadClass.from_wire(counts.workload_class)
        except ValueError:
            cls = WorkloadClass.REALTIME
        out[cls] = out.get(cls, 0) + counts.running + counts.waiting
    return out


def paces_prompts(info: common_pb2.NodeInfo) -> bool:
    """True when every model the node generates with is on an engine that paces its own
    lower-class prompts (a model on the built-in engine beside one on vLLM shares the node's
    prefill bucket, so the bucket keeps its rule)."""
    generators = [m for m in info.models if m.kind == common_pb2.MODEL_KIND_GENERATE]
    return bool(generators) and all(m.paces_prompts for m in generators)


@dataclass
class NodeHandle:
    """One node as this scheduler sees it."""

    info: common_pb2.NodeInfo
    channel: grpc.aio.Channel
    stub: node_pb2_grpc.NodeStub
    breaker: CircuitBreaker
    meter: ThroughputMeter
    healthy: bool = False
    load: common_pb2.LoadReport | None = None
    book: LoadBook = field(default_factory=LoadBook)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    last_report_at: float = field(default_factory=time.monotonic)
    """When the node last showed it is alive: a load report, or its addition (monotonic)."""
    busy_rate: float = 0.0
    """Weighted tokens per second the node's requests retired while it was busy (a moving
    average)."""
    retired: asyncio.Event | None = None
    """Set once a node taken out of rotation has no request of this scheduler left."""
    stream_token_at: float = 0.0
    """When :attr:`stream_token_s` last moved (the scheduler's clock)."""
    _gap_s: float = field(default=0.0, init=False, repr=False)
    """Seconds between the REALTIME chunks lately, each weighted by its age."""
    _gap_tokens: float = field(default=0.0, init=False, repr=False)
    """Tokens those chunks brought, weighted alike."""

    def __post_init__(self) -> None:
        self.take_info(self.info)

    def observe_token_gap(self, gap_s: float, tokens: int, now: float, tau_s: float = 2.0) -> None:
        """A REALTIME chunk of ``tokens`` came ``gap_s`` after the stream's previous one.
        :attr:`stream_token_s` is the time the chunks took over the tokens they brought, each
        weighted by ``exp(-age / tau_s)``: the streams' mean time per token over the last few
        seconds, as their SLO counts it (an average of the gaps in time weighs each by its
        length, so a prefill step of 0.65 s read as a slow stream though the streams kept
        their target). It starts afresh after ``2 tau_s`` without chunks."""
        if tokens <= 0 or gap_s < 0:
            return
        dt = now - self.stream_token_at
        if self._gap_tokens <= 0 or dt > 2 * tau_s:
            self._gap_s, self._gap_tokens = 0.0, 0.0
        elif dt > 0:
            decay = math.exp(-dt / tau_s)
            self._gap_s, self._gap_tokens = self._gap_s * decay, self._gap_tokens * decay
        self._gap_s += gap_s
        self._gap_tokens += tokens
        self.stream_token_at = max(now, self.stream_token_at)

    @property
    def stream_token_s(self) -> float:
        """Seconds per token its REALTIME streams got lately (:meth:`observe_token_gap`; 0:
        none yet): it moves as the batch grows, while the inter-token average of finished
        streams lags by their length."""
        return self._gap_s / self._gap_tokens if self._gap_tokens > 0 else 0.0

    def live_token_s(self, now: float, stale_s: float = 4.0) -> float:
        """:attr:`stream_token_s` while REALTIME chunks came within ``stale_s``, else 0 (no
        REALTIME stream runs there: the finished streams' average speaks for it)."""
        return self.stream_token_s if now - self.stream_token_at <= stale_s else 0.0

    @property
    def node_id(self) -> str:
        """The node's id."""
        return self.info.node_id

    @property
    def in_flight(self) -> int:
        """Requests this scheduler has in flight on the node."""
        return self.book.in_flight

    @property
    def draining(self) -> bool:
        """True when the registry or the node's last load report says it is draining."""
        return self.info.state != common_pb2.NODE_STATE_SERVING or (
            self.load is not None and self.load.state == common_pb2.NODE_STATE_DRAINING
        )

    def take_info(self, info: common_pb2.NodeInfo) -> None:
        """The node's registry entry, now or anew: its slots and whether it paces its own
        prompts go to the load book."""
        self.info = info
        self.book.max_sequences = info.capacity.max_sequences or self.book.max_sequences
        self.book.paces_prompts = paces_prompts(info)

    def service_rate(self, default: float) -> float:
        """Weighted tokens per second the node retires: measured, reported, else ``default``."""
        measured = max(self.meter.rate(), self.load.decode_tokens_per_s if self.load else 0.0)
        return measured if measured > 0 else default

    def capacity_rate(self, default: float) -> float:
        """Weighted tokens per second the node retires when busy (see
        :meth:`observe_capacity`), at least ``default`` (a node never busy has not shown its
        capacity)."""
        return max(self.busy_rate, default)

    def on_report(self, report: common_pb2.LoadReport, now: float, guard: PrefillGuard) -> None:
        """A load report came at ``now``: the load book takes it, after draining its prefill
        bucket at the share before it."""
        self.load, self.last_report_at = report, now
        self.observe_capacity(report)
        self.book.settle_prefill(guard, now, self.live_token_s(now))
        self.book.on_report(
            sum(c.running + c.waiting for c in report.classes),
            report.queued_tokens,
            report.kv_used_bytes,
            report.kv_budget_bytes,
            report.decode_tokens_per_s,
            by_class=classes_of(report),
            reserved=report.reserved_sequences,
            steps=report.step_costs,
            pinned=report.pinned_sequences,
            ahead=report.realtime_prefill_ahead_tokens,
            cached=report.prefix_cache_hit_ratio,
        )

    def observe_capacity(self, report: common_pb2.LoadReport) -> None:
        """At each load report showing the node busy (running at least three quarters of its
        sequences), fold the weighted tokens per second its requests retired (the throughput
        meter: requests as the gate costs them, prompt and generation) into
        :attr:`busy_rate`: a moving average, not a peak. (The node's own decode rate counts
        decode steps alone, several times what requests get end to end.)"""
        running = sum(c.running for c in report.classes)
        rate = self.meter.rate()
        if rate <= 0 or running < 0.75 * self.book.usable:
            return
        self.busy_rate = rate if self.busy_rate == 0 else 0.9 * self.busy_rate + 0.1 * rate

    def serves(self, model: str, workload_class: WorkloadClass) -> bool:
        """True when the node has ``model`` and a pool admitting ``workload_class``."""
        pool = POOL_FOR_CLASS.get(workload_class, "realtime")
        return pool in self.info.pools and any(m.name == model for m in self.info.models)

    def score(self) -> float:
        """Lower is better (see :meth:`scheduler.routing.LoadBook.score`)."""
        return self.book.score()
