"""The scheduler's live view of inference nodes and the choice of one for a request.

Nodes come from the etcd registry (:class:`sluice.registry.PrefixView`). For each node the
directory keeps a gRPC channel, follows its ``grpc.health.v1`` status and its load stream, and
counts the requests this scheduler has in flight there. A node is a candidate when it is
registered, ``SERVING`` in the registry and in its health check, its circuit is closed (or
half-open and probing), its pools admit the class, and it has the model loaded.

Choice: power of two choices (Mitzenmacher) on a load score: two random candidates, the less
loaded wins. It keeps the herd off the single least-loaded node that every replica would pick
from the same stale report, at the cost of sometimes not picking the very best node.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.breaker import BreakerConfig, BreakerState, CircuitBreaker
from sluice.registry import PrefixView
from sluice.v1 import common_pb2, node_pb2, node_pb2_grpc

log = structlog.get_logger(__name__)

POOL_FOR_CLASS: dict[int, str] = {
    common_pb2.WORKLOAD_CLASS_REALTIME: "realtime",
    common_pb2.WORKLOAD_CLASS_BATCH: "realtime",
    common_pb2.WORKLOAD_CLASS_FINETUNE: "finetune",
}


@dataclass
class NodeHandle:
    """One node as this scheduler sees it."""

    info: common_pb2.NodeInfo
    channel: grpc.aio.Channel
    stub: node_pb2_grpc.NodeStub
    breaker: CircuitBreaker
    healthy: bool = False
    in_flight: int = 0
    load: common_pb2.LoadReport | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        """The node's id."""
        return self.info.node_id

    def serves(self, model: str, workload_class: int) -> bool:
        """True when the node has ``model`` and a pool admitting ``workload_class``."""
        pool = POOL_FOR_CLASS.get(workload_class, "realtime")
        return pool in self.info.pools and any(m.name == model for m in self.info.models)

    def score(self) -> float:
        """Lower is better: our own in-flight count plus the node's reported sequences."""
        reported = 0
        if self.load is not None:
            reported = sum(c.running + c.waiting for c in self.load.classes)
        return self.in_flight + 0.5 * reported


class NodeDirectory:
    """Live nodes with channels, health and load; picks one per request."""

    def __init__(
        self,
        view: PrefixView[common_pb2.NodeInfo],
        *,
        breaker_config: BreakerConfig | None = None,
        rng: random.Random | None = None,
        channel_factory: Callable[[str], grpc.aio.Channel] | None = None,
    ) -> None:
        self._view = view
        self._breaker_config = breaker_config or BreakerConfig()
        self._rng = rng or random.Random()
        self._channel_factory = channel_factory or _default_channel
        self._nodes: dict[str, NodeHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Follow the registry view (call after the view has synced)."""
        self._view.subscribe(self._on_change)
        for name, info in self._view.items().items():
            self._on_change(name, info)

    def nodes(self) -> list[NodeHandle]:
        """Every known node, sorted by id."""
        return [self._nodes[k] for k in sorted(self._nodes)]

    def get(self, node_id: str) -> NodeHandle | None:
        """The node with ``node_id``."""
        return self._nodes.get(node_id)

    def models(self) -> dict[str, common_pb2.ModelInfo]:
        """Every model some registered node advertises."""
        return {m.name: m for n in self._nodes.values() for m in n.info.models}

    def candidates(self, model: str, workload_class: int) -> list[NodeHandle]:
        """Nodes that may take this request now."""
        return [
            n
            for n in self._nodes.values()
            if n.info.state == common_pb2.NODE_STATE_SERVING
            and n.healthy
            and n.breaker.state is not BreakerState.OPEN
            and n.serves(model, workload_class)
        ]

    def pick(
        self, model: str, workload_class: int, exclude: frozenset[str] = frozenset()
    ) -> NodeHandle | None:
        """Power of two choices among the candidates not in ``exclude``."""
        pool = [n for n in self.candidates(model, workload_class) if n.node_id not in exclude]
        while pool:
            if len(pool) == 1:
                chosen = pool[0]
            else:
                a, b = self._rng.sample(pool, 2)
                chosen = a if a.score() <= b.score() else b
            if chosen.breaker.allow():
                return chosen
            pool.remove(chosen)  # half-open with its probe already out
        return None

    async def close(self) -> None:
        """Stop following nodes and close every channel."""
        for name in list(self._nodes):
            self._remove(name)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _on_change(self, name: str, info: common_pb2.NodeInfo | None) -> None:
        current = self._nodes.get(name)
        if info is None:
            if current is not None:
                self._remove(name)
                log.info("node_removed", node_id=name)
            return
        if current is not None and current.info.address == info.address:
            current.info = info
            return
        if current is not None:
            self._remove(name)
        channel = self._channel_factory(info.address)
        handle = NodeHandle(
            info=info,
            channel=channel,
            stub=node_pb2_grpc.NodeStub(channel),
            breaker=CircuitBreaker(self._breaker_config),
        )
        handle.tasks = [
            asyncio.create_task(self._follow_health(handle), name=f"health {name}"),
            asyncio.create_task(self._follow_load(handle), name=f"load {name}"),
        ]
        self._nodes[name] = handle
        log.info("node_added", node_id=name, address=info.address)

    def _remove(self, name: str) -> None:
        handle = self._nodes.pop(name)
        for task in handle.tasks:
            task.cancel()

        async def close_later() -> None:
            for task in handle.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await handle.channel.close(grace=None)

        task = asyncio.create_task(close_later())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _follow_health(self, handle: NodeHandle) -> None:
        stub = health_pb2_grpc.HealthStub(handle.channel)
        backoff = 0.1
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
                    if healthy != handle.healthy:
                        log.info("node_health", node_id=handle.node_id, healthy=healthy)
                    handle.healthy = healthy
                    backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                if handle.healthy:
                    log.info(
                        "node_health", node_id=handle.node_id, healthy=False, code=exc.code().name
                    )
                handle.healthy = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _follow_load(self, handle: NodeHandle) -> None:
        backoff = 0.2
        while True:
            try:
                async for report in handle.stub.StreamLoad(node_pb2.StreamLoadRequest()):
                    handle.load = report
                    backoff = 0.2
            except grpc.aio.AioRpcError:
                handle.load = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def _default_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.enable_http_proxy", 0),
        ],
    )
