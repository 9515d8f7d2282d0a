"""The loop around the scheduling core: admission, queues, and handing nodes to requests.

:class:`DispatchGate` owns a :class:`~scheduler.queues.FairQueues` and an
:class:`~scheduler.admission.Admission` (both synchronous, I/O-free) and does the asyncio
part: each admitted request waits on a future. Whenever capacity may have changed (a request
ended, a load report or health change arrived, a node joined or left) the dispatch pass
(:meth:`DispatchGate.place`) pops what can start, books it on the chosen node and returns the
:class:`Placement` list; :meth:`DispatchGate._dispatch` then resolves those futures. A
periodic tick re-predicts the queue and sheds what can no longer start before its deadline.

A request whose client goes away is cancelled by gRPC: it leaves the queue at once (or, if
a node had just been booked for it, gives the node back).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from dataclasses import dataclass

import structlog

from scheduler.admission import NO_CAPACITY, Admission, AdmissionConfig, Shed, Verdict
from scheduler.metrics import SchedulerMetrics
from scheduler.node_handle import POOL_FOR_CLASS, NodeHandle
from scheduler.nodes import NodeDirectory, SlotView
from scheduler.pass_scan import Key, PassScan
from scheduler.queues import Clock, FairQueues, QueueConfig, QueuedRequest, QueueFull
from scheduler.running import RunningBook
from scheduler.shares import DemandMeter, SlotShares
from scheduler.tenants import TenantDirectory
from sluice.runtime.errors import DeadlineExceeded, ResourceExhausted, SluiceError, Unavailable
from sluice.v1 import inference_pb2

log = structlog.get_logger(__name__)

NO_NODE_RETRY_S = 1.0
AFFINITY_PREFIX_CHARS = 256


def affinity_key(req: inference_pb2.GenerateRequest) -> str:
    """The session id, else a digest of the model and the prompt's first characters (requests
    sharing a prefix land where its KV may still be cached)."""
    if req.session_id:
        return "s:" + req.session_id[:128]
    text = req.prompt or "\x1e".join(f"{m.role}\x1f{m.content}" for m in req.messages)
    digest = hashlib.blake2b(
        f"{req.model}\x00{text[:AFFINITY_PREFIX_CHARS]}".encode(), digest_size=12
    )
    return "p:" + digest.hexdigest()


@dataclass(frozen=True)
class Placement:
    """A queued request the dispatch pass started, and the node booked for it."""

    item: QueuedRequest
    node: NodeHandle


NO_CAPACITY_WAIT_S = 1e6
"""The predicted wait recorded for a request no node could ever take (admission says inf)."""


class DispatchGate:
    """Admits, queues and dispatches requests, generations and embeddings (one per replica).
    An embedding is an item like any other: it holds a node slot for its call and its
    tenant's slot share, at the cost of its estimated tokens at the prompt weight."""

    def __init__(
        self,
        nodes: NodeDirectory,
        tenants: TenantDirectory,
        metrics: SchedulerMetrics,
        *,
        queue_config: QueueConfig | None = None,
        admission_config: AdmissionConfig | None = None,
        clock: Clock = time.monotonic,
        tick_s: float = 0.1,
    ) -> None:
        self._nodes = nodes
        self._tenants = tenants
        self._metrics = metrics
        self._clock = clock
        self._tick_s = tick_s
        self.queues = FairQueues(clock, self._weight, queue_config)
        self.admission = Admission(self.queues, clock, self._weight, admission_config)
        self.shares = SlotShares(clock, self._weight)
        self.demand = DemandMeter(clock)
        full = nodes.full_token_seconds
        self.running = RunningBook(clock, self.demand.expected_tokens, POOL_FOR_CLASS, full)
        self._waiters: dict[str, asyncio.Future[NodeHandle]] = {}
        self._kick_pending = False
        self._avg_cost = 0.0
        self._task: asyncio.Task[None] | None = None
        nodes.on_change(self.kick)

    def _weight(self, tenant: str) -> float:
        t = self._tenants.get(tenant)
        return t.weight if t is not None else 1.0

    def cost(self, item: QueuedRequest) -> float:
        """The request's cost in weighted tokens."""
        return item.cost(self.queues.config.prompt_token_weight)

    async def start(self) -> None:
        """Start the periodic shed-and-dispatch tick."""
        self._task = asyncio.create_task(self._ticker(), name="dispatch gate")

    async def stop(self) -> None:
        """Stop ticking and refuse what is still queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self.queues.items():
            self.queues.cancel(item.request_id)
            self._fail(item, Unavailable("scheduler shutting down", retry_after_s=NO_NODE_RETRY_S))

    # -- the request side --------------------------------------------------------------

    async def acquire(self, item: QueuedRequest) -> NodeHandle:
        """Admit ``item`` and wait for a node booked for it; raises the refusal otherwise."""
        cls = item.workload_class.label
        self.demand.arrived(item)
        view = self._nodes.capacity(item.model, item.workload_class, item.prompt_tokens)
        share_ok = view.slot_room and self._share_allows(item, view)
        startable = share_ok and view.room
        verdict = self._decide(item, view, startable, prompt_held=share_ok and not view.room)
        # No capacity at all predicts an infinite wait: counted past the largest bucket.
        wait = min(verdict.predicted_wait_s, NO_CAPACITY_WAIT_S)
        self._metrics.predicted_wait.labels(cls).observe(wait)
        structlog.contextvars.bind_contextvars(predicted_wait_ms=round(wait * 1000, 1))
        if not verdict.admitted:
            raise self._refusal(item, verdict)
        if not self.queues and startable:
            # Nothing waits on this replica: the request goes straight to a node, with the
            # counters a queue pass would have updated.
            node = self._start_now(item, view)
            if node is not None:
                self._metrics.admission.labels(cls, "admitted", "").inc()
                self.admission.record_admitted(item)
                return node
        try:
            self.queues.push(item)
        except QueueFull as exc:
            self._metrics.admission.labels(cls, "refused", "QUEUE_FULL").inc()
            raise ResourceExhausted(
                f"{exc.scope} queue for {cls} is full ({exc.limit} waiting)",
                retry_after_s=verdict.retry_after(self.admission.config),
                reason="QUEUE_FULL",
            ) from exc
        self._metrics.admission.labels(cls, "admitted", "").inc()
        self.admission.record_admitted(item)
        future: asyncio.Future[NodeHandle] = asyncio.get_running_loop().create_future()
        self._waiters[item.request_id] = future
        self._dispatch()
        if future.done():  # the common case when there is room: no extra loop iteration
            self._waiters.pop(item.request_id, None)
            return future.result()
        return await self._queued(item, future)

    async def _queued(self, item: QueuedRequest, future: asyncio.Future[NodeHandle]) -> NodeHandle:
        """Wait in the queue for the node booked for ``item`` until its deadline."""
        cls = item.workload_class.label
        try:
            left = item.deadline - self._clock()
            async with asyncio.timeout(max(left, 0.0)):  # not wait_for: sluice/runtime/waits.py
                return await future
        except TimeoutError:
            if self.queues.cancel(item.request_id) is None and self._booked(future):
                # Booked in the same loop pass as the timeout fired.
                self._nodes.finished(future.result(), 0, item.workload_class)
                self.release(item)
            self._metrics.admission.labels(cls, "shed", "DEADLINE").inc()
            raise DeadlineExceeded("deadline passed while queued") from None
        except asyncio.CancelledError:
            if self.queues.cancel(item.request_id) is not None:
                self._metrics.admission.labels(cls, "cancelled", "CLIENT_GONE").inc()
                log.info("request_left_queue", reason="client_gone")
            elif self._booked(future):
                # Booked as it was cancelled.
                self._nodes.finished(future.result(), 0, item.workload_class)
                self.release(item)
            raise
        finally:
            self._waiters.pop(item.request_id, None)
            item.hold("", self._clock())  # booked, shed, timed out or cancelled: holds end

    def _decide(
        self, item: QueuedRequest, view: SlotView, startable: bool, prompt_held: bool = False
    ) -> Verdict:
        """Admission's verdict on ``item``: ``startable`` when a node has room and its
        tenant's slot share lets it start now (held back, it waits for a request to end, as
        without room: the share rule may keep the slot for another tenant's burst, or the
        tenant may be over its share). Without room, the wait is at least the time until a
        prefill bucket takes its prompt and those queued before it (:mod:`scheduler.prefill`)
        and until a slot is left for it (:mod:`scheduler.running`); ``prompt_held``: a slot is
        free and only the bucket holds it. Below REALTIME, decode is priced at the slowest of
        the nodes' time per token, the class's own pace lately and a full node's step. An
        Embed's call is priced at its model's and class's calls lately, in place of a prompt."""
        model, cls, prompt = item.model, item.workload_class, item.prompt_tokens
        nodes, pool = self._nodes, POOL_FOR_CLASS[cls]
        token_s = nodes.token_seconds(model)
        room_in_s = 0.0
        if not startable:
            before = [  # queued before it: they take the bucket and the next slots first
                i
                for i in self.queues.items()
                if i.model == model and i.workload_class.rank <= cls.rank
                if POOL_FOR_CLASS[i.workload_class] == pool
            ]
            ahead = sum(i.prompt_tokens for i in before)
            room_in_s = nodes.prefill_wait(model, cls, prompt, ahead)
            if not prompt_held:
                room_in_s = max(room_in_s, self.running.end_wait(model, cls, before, token_s))
        if item.embed:  # its answer comes with the node's call, as its class's came lately
            first = nodes.embed_times.seconds(model, cls)
            # Alone, as fast as the fastest lately; one that can start now is not refused for
            # the target (no call would come sooner, and its call keeps the average current).
            idle = first if startable else nodes.embed_times.fastest(model, cls)
        else:
            loaded, told = nodes.loaded_first_token_seconds(model, prompt)
            first = loaded if told else max(loaded, nodes.first_token_seconds(model))
            idle = nodes.prefill_seconds(model, prompt)
        structlog.contextvars.bind_contextvars(predicted_first_token_ms=round(first * 1000, 1))
        return self.admission.decide(
            item,
            nodes.service_rate(item.model),
            startable,
            busy_cost=0.0 if prompt_held else self._avg_cost or self.cost(item),
            token_s=token_s if cls.is_top else self.running.lower_token_s(model, cls, token_s),
            busy=view.busy,
            prefill_s=first,
            room_in_s=room_in_s,
            idle_prefill_s=idle,
        )

    @staticmethod
    def _booked(future: asyncio.Future[NodeHandle]) -> bool:
        return future.done() and not future.cancelled() and future.exception() is None

    def _refusal(self, item: QueuedRequest, verdict: Verdict) -> SluiceError:
        cls = item.workload_class.label
        self._metrics.admission.labels(cls, "refused", verdict.reason).inc()
        if verdict.reason == NO_CAPACITY:
            return Unavailable(
                f"no healthy node serves model {item.model!r} now",
                retry_after_s=NO_NODE_RETRY_S,
                reason="NO_NODE",
            )
        retry = verdict.retry_after(self.admission.config)
        left = max(0.0, item.deadline - self._clock())
        why = verdict.detail or f"predicted wait {verdict.predicted_wait_s:.3f}s"
        then = "cannot finish in the" if verdict.past_deadline else "with"
        return ResourceExhausted(
            f"overloaded: {why}; {then} {left:.3f}s left before the deadline",
            retry_after_s=retry,
            reason=verdict.reason,
            metadata={"predicted_wait_ms": str(math.ceil(retry * 1000)), "workload_class": cls},
        )

    def release(self, item: QueuedRequest, generated: int | None = None) -> None:
        """``item``, handed a node by :meth:`acquire`, has ended: its tenant's slot is free.
        ``generated``: the tokens it made, when it ran to its end (what its tenant's requests
        are expected to use, for the demand meter)."""
        self.shares.ended(item.model, item.workload_class, item.tenant)
        self.running.ended(item, generated)
        if generated is not None:
            self.demand.finished(item, generated)
        self.kick()

    def streamed(self, item: QueuedRequest, tokens: int) -> None:
        """``item`` streamed ``tokens`` generated tokens (charged; its predicted end nears)."""
        self.running.streamed(item, tokens)
        self.charge(item, tokens)

    def charge(self, item: QueuedRequest, tokens: float) -> None:
        """Charge ``tokens`` (generated, or a prompt correction) to the request's tenant."""
        self.queues.charge(item.tenant, item.workload_class, tokens)
        self.admission.touch(item)

    # -- the loop side -----------------------------------------------------------------

    def kick(self) -> None:
        """Capacity may have changed: dispatch soon (coalesces bursts of events)."""
        if self._kick_pending or not self.queues:
            return
        self._kick_pending = True
        with contextlib.suppress(RuntimeError):  # no running loop (shutdown)
            asyncio.get_running_loop().call_soon(self._kicked)

    def _kicked(self) -> None:
        self._kick_pending = False
        self._dispatch()

    def place(self) -> list[Placement]:
        """The dispatch pass: pop every queued request that can start now, book each on the
        node chosen for it and on its tenant's slot share, and return them in the order placed.
        A request whose waiter is gone (timed out or cancelled as it was popped) is popped but
        neither booked nor returned. Resolving the waiters is :meth:`_dispatch`'s."""
        scan = PassScan(
            self._nodes, self.admission, self.queues, self.shares, self._demand, self._clock()
        )
        placed: list[Placement] = []
        while self.queues:
            item = self.queues.pop(scan.placeable)
            if item is None:
                break
            node = scan.took(item)
            if not self._awaited(item):
                continue
            self._book(item, node)
            placed.append(Placement(item, node))
        return placed

    def _dispatch(self) -> None:
        """Run the dispatch pass and hand every placed request its booked node."""
        for placement in self.place():
            self._waiters[placement.item.request_id].set_result(placement.node)

    def _awaited(self, item: QueuedRequest) -> bool:
        future = self._waiters.get(item.request_id)
        return future is not None and not future.done()

    def _book(self, item: QueuedRequest, node: NodeHandle) -> None:
        """``item`` leaves for ``node``: book it there and on its tenant's slot share."""
        cost, cls = self.cost(item), item.workload_class
        self._avg_cost = cost if not self._avg_cost else 0.9 * self._avg_cost + 0.1 * cost
        self._nodes.dispatched(node, cost, item.affinity, cls, item.model, item.prompt_tokens)
        now = self._clock()
        item.hold("", now)
        waited = now - item.enqueued_at
        self._metrics.queue_wait.labels(cls.label, item.tenant).observe(waited)
        self.admission.started(item)
        self.shares.started(item.model, cls, item.tenant)
        self.running.started(item)

    def _share_allows(self, item: QueuedRequest, view: SlotView) -> bool:
        """Whether the slot-share rule lets ``item``'s tenant take one of ``view``'s free
        slots now (nothing of the class queued on this replica)."""
        key = (item.model, item.workload_class)
        active = self.admission.active(*key)
        demand = self._demand(key, active | {item.tenant}) if active - {item.tenant} else None
        return self.shares.may_start(
            *key, item.tenant, view.slots, view.free, active, demand=demand, waiting={}
        )

    def _start_now(self, item: QueuedRequest, view: SlotView) -> NodeHandle | None:
        """The node ``item`` starts on without queuing (its share allows it), or None."""
        key = (item.model, item.workload_class)
        node = self._nodes.pick(
            *key,
            affinity=item.affinity,
            need_room=True,
            among=view.candidates,
            prompt=item.prompt_tokens,
        )
        if node is None:
            return None
        self.queues.start_now(item)
        self._book(item, node)
        return node

    def _demand(self, key: Key, tenants: set[str]) -> dict[str, float] | None:
        """Slots each tenant asks of (model, class), for the slot shares' burst headroom."""
        return self.demand.slots(*key, tenants, self._nodes.token_seconds(key[0]))

    def _fail(self, item: QueuedRequest, error: SluiceError) -> None:
        future = self._waiters.get(item.request_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def shed(self) -> list[Shed]:
        """Drop what can no longer start in time; fail each with its refusal."""
        dropped = self.admission.shed(self._nodes.service_rate, self._nodes.token_seconds)
        for shed in dropped:
            cls = shed.item.workload_class.label
            self._metrics.admission.labels(cls, "shed", shed.reason).inc()
            log.info(
                "request_shed",
                workload_class=cls,
                tenant=shed.item.tenant,
                reason=shed.reason,
                predicted_wait_s=round(shed.predicted_wait_s, 3),
            )
            self._fail(shed.item, self._refusal_for_shed(shed))
        return dropped

    def _refusal_for_shed(self, shed: Shed) -> SluiceError:
        if shed.reason == NO_CAPACITY:
            return Unavailable(
                f"no healthy node serves model {shed.item.model!r} now",
                retry_after_s=NO_NODE_RETRY_S,
                reason="NO_NODE",
            )
        verdict = Verdict(False, shed.predicted_wait_s, shed.reason)
        retry = verdict.retry_after(self.admission.config)
        return ResourceExhausted(
            f"shed: capacity shrank, predicted wait {shed.predicted_wait_s:.3f}s is past the "
            "deadline",
            retry_after_s=retry,
            reason=shed.reason,
            metadata={"predicted_wait_ms": str(math.ceil(retry * 1000))},
        )

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            if self.queues:
                try:
                    self.shed()
                    self._dispatch()
                except Exception as exc:  # keep the loop alive; this is a bug if it happens
                    log.error("dispatch_tick_failed", error=repr(exc), exc_info=exc)

    def queue_depths(self) -> dict[tuple[str, str], int]:
        """Queued requests by (class name, tenant), for the metrics."""
        return {(c.label, t): n for (c, t), n in self.queues.depths().items()}
