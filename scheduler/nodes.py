"""The scheduler's live view of inference nodes and the choice of one for a request.

Nodes come from the etcd registry (:class:`sluice.runtime.registry.PrefixView`). For each node the
directory keeps a gRPC channel, follows its ``grpc.health.v1`` status and its load stream, and
keeps a :class:`scheduler.routing.LoadBook` (last report + what this scheduler sent since). A
node is a candidate when it is registered, ``SERVING`` in the registry, its health check and
its last load report (not draining), its circuit is not open, it is not ejected as a latency
outlier, its pools admit the class and it has the model loaded. It can take a request when,
on top of that, the load book says it has room.

Choice: :func:`scheduler.routing.power_of_two` on the load score, preferring the node that last
served the same session or prompt prefix when scores tie.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler.admission import ThroughputMeter
from scheduler.calibration import EmbedTimes
from scheduler.node_handle import NodeHandle
from scheduler.prefill import PrefillGuard
from scheduler.routing import DEFAULT_STEP_TOKENS, AffinityTable, OutlierDetector, power_of_two
from sluice.contract import WorkloadClass
from sluice.runtime.breaker import BreakerConfig, BreakerState, CircuitBreaker
from sluice.runtime.registry import PrefixView
from sluice.runtime.tls import NAME_PATTERN, Mesh, node_identity
from sluice.v1 import common_pb2, node_pb2, node_pb2_grpc

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SlotView:
    """The candidates for a (model, class) and their sequence slots, looked at once."""

    candidates: list[NodeHandle]
    slots: int
    """Sequences the candidates offer the class together."""
    free: int
    """Of those, free now."""
    room: bool
    """Some candidate could take one more request of the class now (its prompt included)."""
    slot_room: bool = False
    """Some candidate has a slot for it (its prefill bucket aside)."""

    @property
    def busy(self) -> bool:
        """At least half of the slots are in use (admission's cue that the measured
        inter-token time describes a loaded node)."""
        return self.slots > 0 and 2 * (self.slots - self.free) >= self.slots


class NodeDirectory:
    """Live nodes with channels, health and load; picks one per request."""

    def __init__(
        self,
        view: PrefixView[common_pb2.NodeInfo],
        *,
        breaker_config: BreakerConfig | None = None,
        outliers: OutlierDetector | None = None,
        rng: random.Random | None = None,
        mesh: Mesh | None = None,
        clock: Callable[[], float] = time.monotonic,
        low_class_headroom: float = 0.125,
        default_tokens_per_s: float = 200.0,
        step_budgets: Mapping[WorkloadClass, float] | None = None,
        prefill_guard: PrefillGuard | None = None,
    ) -> None:
        self._view = view
        self._breaker_config = breaker_config or BreakerConfig()
        self.outliers = outliers or OutlierDetector(clock)
        self._rng = rng or random.Random()
        self._mesh = mesh or Mesh()
        self._clock = clock
        self._headroom = low_class_headroom
        self._default_rate = default_tokens_per_s
        self._budgets = dict(step_budgets or {})
        self.embed_times = EmbedTimes()
        self.prefill_guard = prefill_guard or PrefillGuard()
        self._nodes: dict[str, NodeHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._retiring: list[NodeHandle] = []
        """Nodes out of rotation whose channel waits for this scheduler's last request."""
        self._listeners: list[Callable[[], None]] = []
        self.affinity = AffinityTable()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever capacity may have changed (report, health, node)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

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

    def candidates(self, model: str, workload_class: WorkloadClass) -> list[NodeHandle]:
        """Nodes that may take this request now (room aside). Latency outliers are skipped
        while another node can serve; when every serving node is ejected they all count
        again (Envoy's panic mode): an ejection moves load away, it never takes the last
        capacity out (a node slowed by its peer's failure read as an outlier, and every
        request was refused NO_NODE until the peer came back)."""
        serving = [
            n
            for n in self._nodes.values()
            if not n.draining
            and n.healthy
            and n.breaker.state is not BreakerState.OPEN
            and n.serves(model, workload_class)
        ]
        return [n for n in serving if not self.outliers.ejected(n.node_id)] or serving

    def step_budget(self, workload_class: WorkloadClass) -> float:
        """The longest decode step ``workload_class``'s inter-token target allows (0: none),
        sent with each of its requests (:mod:`sluice.itl`)."""
        return self._budgets.get(workload_class, 0.0)

    def _reserve(self, promoted: bool) -> float:
        """Share of a node's sequences lower classes leave to REALTIME (none for a promoted
        request: holding its model, it would otherwise keep REALTIME waiting behind it while
        those slots sit idle; docs/decisions/scheduler-lower-class-promise.md)."""
        return 0.0 if promoted else self._headroom

    def has_room(
        self,
        node: NodeHandle,
        workload_class: WorkloadClass,
        model: str = "",
        prompt: int = 0,
        *,
        promoted: bool = False,
    ) -> bool:
        """True when ``node`` can take one more request of ``workload_class``: a slot, its
        inter-token target kept (:meth:`scheduler.routing.LoadBook.capacity`), and room in
        its prefill bucket for a ``prompt`` of that many tokens of ``model``. A ``promoted``
        lower-class request (its promised start is due) may use the slots lower classes
        otherwise leave to REALTIME: it goes before REALTIME anyway."""
        book, budgets = node.book, self._budgets_for(node, model)
        if not book.has_room(workload_class, self._reserve(promoted), budgets=budgets):
            return False
        return prompt <= 0 or self._prefill_wait(node, model, workload_class, prompt) <= 0

    def _budgets_for(self, node: NodeHandle, model: str) -> Mapping[WorkloadClass, float] | None:
        """The step budgets held to ``model``'s requests on ``node``: none where it is an
        embedding model (its calls hold a slot but never join a generation batch)."""
        embeds = any(
            m.name == model and m.kind == common_pb2.MODEL_KIND_EMBED for m in node.info.models
        )
        return None if embeds else self._budgets

    def _prefill_wait(
        self,
        node: NodeHandle,
        model: str,
        workload_class: WorkloadClass,
        prompt: int,
        ahead: float = 0.0,
    ) -> float:
        book, now = node.book, self._clock()
        return book.prefill_wait(
            workload_class,
            book.prefill_cost(model, prompt),
            self.prefill_guard,
            now,
            node.live_token_s(now),
            ahead_s=book.prefill_cost(model, ahead),
        )

    def prefill_wait(
        self, model: str, workload_class: WorkloadClass, prompt: int, ahead: int = 0
    ) -> float:
        """Seconds until the first candidate's prefill bucket takes a ``prompt`` of that many
        tokens of ``model``, the ``ahead`` prompt tokens queued before it spread over the
        candidates (0: now or no candidate)."""
        cands = self.candidates(model, workload_class)
        share = ahead / max(1, len(cands))
        waits = [self._prefill_wait(n, model, workload_class, prompt, share) for n in cands]
        return min(waits, default=0.0)

    def capacity(
        self, model: str, workload_class: WorkloadClass, prompt: int = 0, *, promoted: bool = False
    ) -> SlotView:
        """One look at the candidates for a request (of ``prompt`` tokens): the sequences they
        offer the class together, how many are free now (every class and replica counted: the
        nodes' reports plus this replica's own bookings) and whether one has room; one walk of
        the node list for admission, slot shares and the pick (``promoted``: see
        :meth:`has_room`)."""
        cands = self.candidates(model, workload_class)
        slots = free = 0
        room = slot_room = False
        reserve = self._reserve(promoted)
        for n in cands:
            budgets = self._budgets_for(n, model)
            cap = n.book.capacity(workload_class, reserve, budgets)
            slots += cap
            free += max(0, cap - n.book.sequences(workload_class))
            if n.book.has_room(workload_class, reserve, budgets=budgets):
                slot_room = True
                prompt_waits = prompt > 0 and self._prefill_wait(n, model, workload_class, prompt)
                room = room or not prompt_waits
        return SlotView(cands, slots, free, room, slot_room)

    def token_seconds(self, model: str) -> float:
        """Seconds per generated token on the fastest node serving ``model``: the lowest
        among them of the larger of the inter-token moving average of finished streams and
        the REALTIME streams' mean time per token lately (:meth:`NodeHandle.live_token_s`;
        0 while none is measured yet)."""
        now = self._clock()
        measured = [
            latency
            for n in self._nodes.values()
            if any(m.name == model for m in n.info.models)
            and (latency := max(self.outliers.latency(n.node_id, "itl"), n.live_token_s(now))) > 0
        ]
        return min(measured, default=0.0)

    def full_token_seconds(self, model: str) -> float:
        """Seconds per generated token on the fastest healthy node serving ``model`` once its
        batch is full (:meth:`LoadBook.full_step_s` at REALTIME's step budget, which the node
        holds while REALTIME runs there); 0 while none has a fit. A lower-class stream may be
        joined by a REALTIME burst right after it starts: its decode is priced at this."""
        budget = self._budgets.get(WorkloadClass.REALTIME, 0.0)
        steps = [
            n.book.full_step_s(model, budget)
            for n in self._nodes.values()
            if n.healthy and not n.draining and any(m.name == model for m in n.info.models)
        ]
        return min((s for s in steps if s > 0), default=0.0)

    def prefill_seconds(self, model: str, prompt_tokens: int) -> float:
        """Seconds the fastest healthy node serving ``model`` is predicted to take prefilling
        ``prompt_tokens`` (``model``'s cost per prompt token there as first tokens are timed,
        :attr:`LoadBook.timings`: a lower bound, each chunk's fixed cost and the decode rows
        beside it left out); 0 while none has a fit (an embedder has none)."""
        fits = [
            n.book.timings.get(model) for n in self._nodes.values() if n.healthy and not n.draining
        ]
        costs = [f.per_prefill_token_s for f in fits if f is not None and f.per_prefill_token_s > 0]
        return min(costs, default=0.0) * max(0, prompt_tokens)

    def loaded_first_token_seconds(self, model: str, prompt_tokens: int) -> tuple[float, bool]:
        """Seconds from dispatch to first token of a prompt of ``prompt_tokens`` on the
        healthy node serving ``model`` where it comes soonest, under its load now
        (:meth:`LoadBook.first_token_s`; 0 while none has a fit), and whether that node tells
        the prompts ahead (:meth:`LoadBook.tells_ahead`)."""
        now, times = self._clock(), []
        for n in self._nodes.values():
            if n.healthy and not n.draining and any(m.name == model for m in n.info.models):
                book, step = n.book, n.info.capacity.max_batched_tokens or DEFAULT_STEP_TOKENS
                book.settle_prefill(self.prefill_guard, now, n.live_token_s(now))
                t = book.first_token_s(model, prompt_tokens, step)
                times.append((t, book.tells_ahead(model)))
        return min((t for t in times if t[0] > 0), default=(0.0, False))

    def first_token_seconds(self, model: str) -> float:
        """Seconds from dispatch to first token lately (the moving average of the nodes'
        time to first token the outlier detector keeps) on the fastest healthy node serving
        ``model``; 0 while none is measured. Under load it is a step or two of the batch
        beside the prompt's prefill, several times the prefill alone."""
        measured = [
            self.outliers.latency(n.node_id, "ttft")
            for n in self._nodes.values()
            if n.healthy and not n.draining and any(m.name == model for m in n.info.models)
        ]
        return min((t for t in measured if t > 0), default=0.0)

    def capacity_rate(self, model: str) -> float:
        """Weighted tokens per second the serving nodes with ``model`` could retire together
        (:meth:`NodeHandle.capacity_rate`); 0 when none serves it."""
        return sum(
            n.capacity_rate(self._default_rate)
            for n in self._nodes.values()
            if not n.draining and n.healthy and any(m.name == model for m in n.info.models)
        )

    def service_rate(self, model: str) -> float:
        """Weighted tokens per second the nodes able to serve ``model`` (in any pool) retire
        together; 0 when none can (every one draining, unhealthy, open or ejected)."""
        return sum(
            n.service_rate(self._default_rate)
            for n in self._nodes.values()
            if not n.draining
            and n.healthy
            and n.breaker.state is not BreakerState.OPEN
            and not self.outliers.ejected(n.node_id)
            and any(m.name == model for m in n.info.models)
        )

    def pick(
        self,
        model: str,
        workload_class: WorkloadClass,
        exclude: frozenset[str] = frozenset(),
        *,
        affinity: str = "",
        need_room: bool = False,
        among: list[NodeHandle] | None = None,
        prompt: int = 0,
        promoted: bool = False,
    ) -> NodeHandle | None:
        """Power of two choices among the candidates (``among``, when already known) not in
        ``exclude`` (with room for a ``prompt`` of that many tokens, when ``need_room``; for a
        ``promoted`` request as :meth:`has_room` says), preferring the node that last served
        ``affinity`` on a tie."""
        cands = among if among is not None else self.candidates(model, workload_class)
        pool = [
            n
            for n in cands
            if n.node_id not in exclude
            and (
                not need_room or self.has_room(n, workload_class, model, prompt, promoted=promoted)
            )
        ]
        preferred = self._nodes.get(self.affinity.get(affinity) or "")
        while pool:
            chosen = power_of_two(pool, NodeHandle.score, self._rng, preferred)
            if chosen.breaker.allow():
                return chosen
            pool.remove(chosen)  # half-open with its probe already out
        return None

    def dispatched(
        self,
        node: NodeHandle,
        tokens: float,
        affinity: str = "",
        workload_class: WorkloadClass = WorkloadClass.REALTIME,
        model: str = "",
        prompt_tokens: int = 0,
    ) -> None:
        """Book a request of ``workload_class`` sent to ``node``, its prompt of
        ``prompt_tokens`` for ``model`` in the node's prefill bucket at its predicted prefill
        there."""
        now = self._clock()
        prefill_s = node.book.prefill_cost(model, prompt_tokens)
        node.book.on_prefill(prefill_s, self.prefill_guard, now, node.live_token_s(now))
        node.book.on_dispatch(tokens, workload_class, model, prompt_tokens)
        self.affinity.put(affinity, node.node_id)

    def finished(
        self,
        node: NodeHandle,
        cost: float,
        workload_class: WorkloadClass = WorkloadClass.REALTIME,
    ) -> None:
        """Book the end of a request of ``workload_class`` on ``node`` (``cost``: requested
        weighted tokens, for the throughput meter; 0 when it failed) and wake whoever waits
        for room."""
        now = self._clock()
        node.book.settle_prefill(self.prefill_guard, now, node.live_token_s(now))
        node.book.on_finish(workload_class)
        if node.retired is not None and node.in_flight <= 0:
            node.retired.set()
        if cost > 0:
            node.meter.record(cost)
        self._changed()

    async def close(self) -> None:
        """Stop following nodes and close every channel (streams in flight end)."""
        for name in list(self._nodes):
            self._remove(name, drain=False)
        for handle in self._retiring:
            if handle.retired is not None:
                handle.retired.set()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _on_change(self, name: str, info: common_pb2.NodeInfo | None) -> None:
        current = self._nodes.get(name)
        if info is not None and (info.node_id != name or not NAME_PATTERN.match(name)):
            # An entry whose key and content disagree, or whose id could not name a
            # certificate, is not a node we can hold to its id.
            log.warning("node_entry_rejected", key=name[:128], node_id=info.node_id[:128])
            info = None
        if info is None:
            if current is not None:
                self._remove(name)
                log.info("node_removed", node_id=name)
            return
        if current is not None and current.info.address == info.address:
            current.take_info(info)
            self._changed()
            return
        if current is not None:
            self._remove(name)
        # Secure, the channel verifies that the node's certificate names this node id: a node
        # registered under another node's id (or a stranger's entry) never gets a handshake.
        channel = self._mesh.channel(info.address, node_identity(name), NODE_CHANNEL_OPTIONS)
        handle = NodeHandle(
            info=info,
            channel=channel,
            stub=node_pb2_grpc.NodeStub(channel),
            breaker=CircuitBreaker(self._breaker_config, self._clock),
            meter=ThroughputMeter(self._clock),
            last_report_at=self._clock(),
        )
        handle.tasks = [
            asyncio.create_task(self._follow_health(handle), name=f"health {name}"),
            asyncio.create_task(self._follow_load(handle), name=f"load {name}"),
        ]
        self._nodes[name] = handle
        log.info("node_added", node_id=name, address=info.address)
        self._changed()

    def _remove(self, name: str, *, drain: bool = True) -> None:
        """Take the node out of rotation now. With ``drain`` its channel closes only once this
        scheduler's requests on it have ended: a registry change (a lapsed lease, a new address)
        never cuts a stream that still flows; a stream that stops flowing is the stall
        detector's to end (:mod:`scheduler.dispatch`)."""
        handle = self._nodes.pop(name)
        self.outliers.forget(name)
        if drain and handle.in_flight > 0:
            handle.retired = asyncio.Event()
            self._retiring.append(handle)
        self._changed()
        for task in handle.tasks:
            task.cancel()

        async def close_later() -> None:
            for task in handle.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if handle.retired is not None:
                await handle.retired.wait()
                self._retiring.remove(handle)
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
                        self._changed()
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
                    handle.on_report(report, self._clock(), self.prefill_guard)
                    backoff = 0.2
                    self._changed()
            except grpc.aio.AioRpcError:
                handle.load = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


NODE_CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)
