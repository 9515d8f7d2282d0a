"""Per-class request queues: strict priority with aging and promotion between classes,
token-weighted fair queuing (VTC) inside a class.

Synchronous and I/O-free: the dispatch loop (:mod:`scheduler.gate`) calls in with an injected
clock. Invariants:

- Between classes, a class's effective rank is :attr:`WorkloadClass.rank` minus its oldest
  item's wait over ``aging_s``: nothing admitted starves, priority inversion is bounded by
  ``aging_s``.
- A lower-class item whose ``start_by`` (the start admission promised) is within
  ``promote_lead_s`` goes before every other item, earliest ``start_by`` first (EDF), and holds
  its model until it starts, for ``promoted_hold_s`` at most
  (docs/decisions/scheduler-lower-class-promise.md).
- Inside a class, the Virtual Token Counter of Sheng et al., OSDI 2024 (arXiv:2401.00588): the
  backlogged tenant with the least service (weighted tokens / weight) goes next; prompts are
  charged at dispatch (``prompt_token_weight`` per token), generated tokens as the node makes
  them (:meth:`FairQueues.charge`). A tenant that becomes backlogged is lifted to the smallest
  backlogged counter less ``lift_credit`` (docs/decisions/scheduler-vtc-lift-credit.md), so two
  backlogged tenants' weighted service differs by a bounded amount.
- At most ``max_per_class`` items per class and ``max_per_tenant`` per tenant and class
  (:class:`QueueFull`); :meth:`FairQueues.cancel` removes an item at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sluice.contract import WorkloadClass

Clock = Callable[[], float]
"""Seconds from a monotonic origin."""
HOLD_PROMOTED = "promoted_lower_class"
"""A promoted lower-class request waits for the model and holds it (:meth:`FairQueues.pop`)."""


@dataclass(frozen=True)
class QueueConfig:
    """Bounds, aging and token weights of the queues."""

    max_per_class: int = 1000
    """Most items queued in one class (over every tenant)."""
    max_per_tenant: int = 200
    """Most items one tenant may have queued in one class."""
    aging_s: float = 10.0
    """Extra wait that lifts a lower class one rank (0 disables aging: pure strict priority)."""
    prompt_token_weight: float = 0.5
    """Cost of a prompt token relative to a generated one (VTC's w_p / w_q)."""
    scan_depth: int = 4
    """Items of one tenant looked at per pick when the first cannot be placed (other model)."""
    promote_lead_s: float = 1.0
    """A lower-class item is served first once its ``start_by`` is this close (time for
    a few slots to free under load)."""
    promoted_hold_s: float = 1.0
    """Longest a promoted item that cannot be placed holds its model (0: no bound): past it,
    requests it would keep waiting may pass it while it still cannot start (it stays first
    whenever it can). Unbounded, REALTIME waited 1.7-6.6 s behind BATCH kept out by
    REALTIME's own batch limit (bench-vllm, overload 4x, 2026-12-06)."""
    lift_credit: float = 256.0
    """How far below the backlogged tenants' smallest counter a tenant that becomes backlogged
    is lifted to (weighted tokens per unit of weight): a bounded credit, so a light tenant's
    new request goes ahead of a heavy tenant's queue instead of losing the tie to its older
    head, while idle time still banks no more than this."""


@dataclass(eq=False)
class QueuedRequest:
    """A request waiting for a node. Costs are in tokens; times from the queue's clock."""

    request_id: str
    tenant: str
    workload_class: WorkloadClass
    model: str
    prompt_tokens: int
    """Estimated prompt tokens (the scheduler does not tokenize; see :meth:`FairQueues.charge`)."""
    max_new_tokens: int
    deadline: float
    """When the caller gives up: the request must have finished by then."""
    start_by: float = math.inf
    """The start admission promised a lower-class request, early enough to finish before
    the deadline (infinite: no promise); it is promoted as that nears."""
    embed: bool = False
    """An ``Embed`` call (held to its class's embed target, not its TTFT target)."""
    affinity: str = ""
    """Session id or prompt-prefix digest: routing prefers the node that served it last."""
    decode_s: float = 0.0
    """The decode time admission counted for it (0: none measured then)."""
    predicted_wait_s: float | None = None
    """The queue wait admission's model predicted for it before calibration (None: admitted
    to start at once); with the wait it had, it calibrates later predictions."""
    predicted_first_token_s: float | None = None
    """Its time from dispatch to first token admission predicted before calibration (a
    REALTIME request held to a TTFT target; None: none, or already counted); with the time
    its first token took, it calibrates later predictions."""
    enqueued_at: float = 0.0
    dispatched_at: float | None = None
    """When it left the queue for a node (None: not yet)."""
    seq: int = 0
    holding_since: float | None = None
    """When it first held its model, promoted and not placeable (None: it has not)."""
    held_s: dict[str, float] = field(default_factory=dict)
    """Seconds it queued, per hold that kept it (:meth:`hold`): the request's log line says
    why it waited."""
    _hold: str | None = field(default=None, init=False, repr=False)
    """The hold the last pass found (None: not looked at yet; empty: it left the queue)."""
    _hold_at: float = field(default=0.0, init=False, repr=False)

    def hold(self, reason: str, now: float) -> None:
        """A dispatch pass found ``reason`` holding it (empty: it left the queue). The time
        since the pass before counts for the hold found then; time before any pass looked at
        it (behind its tenant's earlier items, past the scan depth) counts as ``behind``."""
        if self._hold is None:
            last, since = "behind", self.enqueued_at
        else:
            last, since = self._hold, self._hold_at
        if last and now > since:
            self.held_s[last] = self.held_s.get(last, 0.0) + now - since
        self._hold, self._hold_at = reason, max(now, since)

    def cost(self, prompt_weight: float) -> float:
        """Work the request asks for, in weighted tokens (prompt, plus every token it may make)."""
        return prompt_weight * self.prompt_tokens + self.max_new_tokens


class QueueFull(Exception):
    """A queue bound was reached; ``scope`` is ``class`` or ``tenant``."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} queue full ({limit} waiting)")
        self.scope = scope
        self.limit = limit


@dataclass
class _ClassQueue:
    """One class: a FIFO per tenant and the tenants' virtual token counters."""

    by_tenant: dict[str, deque[QueuedRequest]] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    size: int = 0
    last_left_counter: float = 0.0

    def backlogged(self) -> Iterator[str]:
        return (t for t, q in self.by_tenant.items() if q)


class FairQueues:
    """Queues of every class; see the module docstring for the algorithm."""

    def __init__(
        self,
        clock: Clock,
        weight: Callable[[str], float],
        config: QueueConfig | None = None,
    ) -> None:
        self.config = config or QueueConfig()
        self._clock = clock
        self._weight = weight
        self._classes = {cls: _ClassQueue() for cls in WorkloadClass}
        self._by_id: dict[str, QueuedRequest] = {}
        self._seq = itertools.count()
        # Queued cost by (class, model) and by (class, model, tenant), for admission.
        self._cost: dict[tuple[int, str], float] = {}
        self._tenant_cost: dict[tuple[int, str, str], float] = {}
        self._tenant_count: dict[tuple[int, str, str], int] = {}
        # Lower-class items with a finite start_by, earliest first; entries of items that
        # left the queue are dropped when they reach the top.
        self._promised: list[tuple[float, int, QueuedRequest]] = []

    # -- adding and removing -------------------------------------------------------------

    def push(self, item: QueuedRequest) -> None:
        """Queue ``item`` (stamps ``enqueued_at``); raises :class:`QueueFull` at a bound."""
        cq = self._classes[item.workload_class]
        if cq.size >= self.config.max_per_class:
            raise QueueFull("class", self.config.max_per_class)
        fifo = cq.by_tenant.setdefault(item.tenant, deque())
        if len(fifo) >= self.config.max_per_tenant:
            raise QueueFull("tenant", self.config.max_per_tenant)
        if not fifo:
            self._lift(cq, item.tenant)
        item.enqueued_at = self._clock()
        item.seq = next(self._seq)
        fifo.append(item)
        cq.size += 1
        self._by_id[item.request_id] = item
        self._account(item, +1)
        if not item.workload_class.is_top and math.isfinite(item.start_by):
            if len(self._promised) > 2 * len(self._by_id) + 64:  # drop entries that left
                self._promised = [e for e in self._promised if self._queued(e[2])]
                heapq.heapify(self._promised)
            heapq.heappush(self._promised, (item.start_by, item.seq, item))

    def start_now(self, item: QueuedRequest) -> None:
        """Account for ``item`` starting without being queued (its class has nothing queued):
        exactly what a push and the pop right after it would do to the counters."""
        cq = self._classes[item.workload_class]
        if not cq.by_tenant.get(item.tenant):
            self._lift(cq, item.tenant)
        item.enqueued_at = self._clock()
        cq.last_left_counter = cq.counters.get(item.tenant, 0.0)
        self.charge(
            item.tenant, item.workload_class, item.prompt_tokens * self.config.prompt_token_weight
        )

    def _lift(self, cq: _ClassQueue, tenant: str) -> None:
        """VTC counter lift for a tenant that becomes backlogged: idle time banks no more than
        ``lift_credit``."""
        others = [cq.counters.get(t, 0.0) for t in cq.backlogged() if t != tenant]
        floor = min(others) - self.config.lift_credit if others else cq.last_left_counter
        cq.counters[tenant] = max(cq.counters.get(tenant, 0.0), floor)

    def cancel(self, request_id: str) -> QueuedRequest | None:
        """Remove a queued request now (client gone, shed); None when it is not queued."""
        item = self._by_id.get(request_id)
        if item is None:
            return None
        self._remove(item)
        return item

    def _remove(self, item: QueuedRequest) -> None:
        cq = self._classes[item.workload_class]
        fifo = cq.by_tenant[item.tenant]
        fifo.remove(item)
        cq.size -= 1
        del self._by_id[item.request_id]
        self._account(item, -1)
        if not fifo:
            cq.last_left_counter = cq.counters.get(item.tenant, 0.0)

    def _account(self, item: QueuedRequest, sign: int) -> None:
        cost = sign * item.cost(self.config.prompt_token_weight)
        key = (item.workload_class, item.model)
        self._cost[key] = self._cost.get(key, 0.0) + cost
        tkey = (item.workload_class, item.model, item.tenant)
        self._tenant_cost[tkey] = self._tenant_cost.get(tkey, 0.0) + cost
        if sign < 0 and self._tenant_cost[tkey] <= 1e-9:
            del self._tenant_cost[tkey]
        count = self._tenant_count.get(tkey, 0) + sign
        if count > 0:
            self._tenant_count[tkey] = count
        else:
            self._tenant_count.pop(tkey, None)

    # -- choosing ------------------------------------------------------------------------

    def class_order(self) -> list[WorkloadClass]:
        """Non-empty classes in the order they are served now (rank minus aging)."""
        now = self._clock()
        ranked: list[tuple[float, int, WorkloadClass]] = []
        for cls, cq in self._classes.items():
            if cq.size == 0:
                continue
            oldest = min(q[0].enqueued_at for q in cq.by_tenant.values() if q)
            aging = (now - oldest) / self.config.aging_s if self.config.aging_s > 0 else 0.0
            ranked.append((cls.rank - aging, cls.rank, cls))
        return [cls for *_, cls in sorted(ranked)]

    def tenant_order(self, workload_class: WorkloadClass) -> list[str]:
        """Backlogged tenants of a class, smallest virtual counter first (ties: oldest head)."""
        cq = self._classes[workload_class]
        return sorted(
            cq.backlogged(), key=lambda t: (cq.counters.get(t, 0.0), cq.by_tenant[t][0].seq)
        )

    def _queued(self, item: QueuedRequest) -> bool:
        return self._by_id.get(item.request_id) is item

    def promoted(self) -> list[QueuedRequest]:
        """Lower-class items whose ``start_by`` is within ``promote_lead_s``, earliest first."""
        heap = self._promised
        while heap and not self._queued(heap[0][2]):
            heapq.heappop(heap)
        horizon = self._clock() + self.config.promote_lead_s
        if not heap or heap[0][0] > horizon:
            return []
        return [e[2] for e in sorted(e for e in heap if e[0] <= horizon and self._queued(e[2]))]

    def promised_cost(self, model: str, before: float) -> float:
        """Weighted tokens of lower-class items for ``model`` promoted before time ``before``
        (they will go ahead of anything queued now)."""
        horizon, now = before + self.config.promote_lead_s, self._clock()
        weight = self.config.prompt_token_weight
        return sum(
            item.cost(weight)
            for start_by, _, item in self._promised
            if start_by <= horizon and item.model == model and self._queued(item)
            if not self._hold_over(item, now)
        )

    def _hold_over(self, item: QueuedRequest, now: float) -> bool:
        """Whether ``item`` held its model for ``promoted_hold_s`` already (it holds no more)."""
        bound, since = self.config.promoted_hold_s, item.holding_since
        return bound > 0 and since is not None and now - since >= bound

    def _stuck(self, item: QueuedRequest, now: float) -> bool:
        """Promoted ``item`` cannot start now: whether it still holds its model (from the first
        pass that found it stuck, for ``promoted_hold_s``)."""
        if item.holding_since is None:
            item.holding_since = now
        return not self._hold_over(item, now)

    def pop(self, placeable: Callable[[QueuedRequest], bool]) -> QueuedRequest | None:
        """Take the next request that ``placeable`` accepts and charge its prompt (VTC).

        Promoted items first (:meth:`promoted`): one that cannot be placed holds its model,
        so nothing else for that model starts before it (a slot that frees while a lower class
        lacks room, or is held back by its slot share, would otherwise go to the next REALTIME
        request, again and again), for ``promoted_hold_s`` at most. Then classes in
        :meth:`class_order`, tenants in :meth:`tenant_order`; each tenant's queue is FIFO, but
        up to ``scan_depth`` of its items are tried so one model without room does not block
        the tenant's requests for another. Returns None when nothing can be placed.
        """
        held: set[str] = set()  # models a promoted item is waiting for
        promoted, now = self.promoted(), self._clock()
        for item in promoted:
            if item.model in held:
                item.hold(HOLD_PROMOTED, now)  # behind an earlier promoted one
                self._stuck(item, now)  # its time behind it counts against its own hold
            elif placeable(item):
                return self._take(item)
            elif self._stuck(item, now):
                held.add(item.model)
        looked = {i.request_id for i in promoted} if promoted else set()
        for cls in self.class_order():
            for tenant in self.tenant_order(cls):
                fifo = self._classes[cls].by_tenant[tenant]
                for item in itertools.islice(fifo, self.config.scan_depth):
                    if item.request_id in looked:
                        continue
                    if item.model in held:
                        item.hold(HOLD_PROMOTED, now)
                    elif placeable(item):
                        return self._take(item)
        return None

    def _take(self, item: QueuedRequest) -> QueuedRequest:
        self._remove(item)
        self.charge(
            item.tenant, item.workload_class, item.prompt_tokens * self.config.prompt_token_weight
        )
        return item

    def charge(self, tenant: str, workload_class: WorkloadClass, tokens: float) -> None:
        """Add service to a tenant's counter: generated tokens as they are produced, or a
        correction once the node reports the true prompt length (may be negative)."""
        cq = self._classes[workload_class]
        weight = max(self._weight(tenant), 1e-6)
        cq.counters[tenant] = cq.counters.get(tenant, 0.0) + tokens / weight

    # -- looking -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def items(self) -> list[QueuedRequest]:
        """Every queued request, in no particular order."""
        return list(self._by_id.values())

    def depth(self, workload_class: WorkloadClass, tenant: str | None = None) -> int:
        """Items queued in a class (for one tenant, when given)."""
        cq = self._classes[workload_class]
        if tenant is None:
            return cq.size
        fifo = cq.by_tenant.get(tenant)
        return len(fifo) if fifo else 0

    def depths(self) -> dict[tuple[WorkloadClass, str], int]:
        """Queued items by (class, tenant), for tenants with items queued."""
        return {
            (cls, t): len(q) for cls, cq in self._classes.items() for t, q in cq.by_tenant.items()
        }

    def counter(self, workload_class: WorkloadClass, tenant: str) -> float:
        """A tenant's virtual token counter in a class."""
        return self._classes[workload_class].counters.get(tenant, 0.0)

    def queued_cost(
        self, workload_class: WorkloadClass, model: str, tenant: str | None = None
    ) -> float:
        """Weighted tokens queued in a class for a model (of one tenant, when given)."""
        if tenant is None:
            return max(0.0, self._cost.get((workload_class, model), 0.0))
        return max(0.0, self._tenant_cost.get((workload_class, model, tenant), 0.0))

    def waiting(self, workload_class: WorkloadClass, model: str) -> dict[str, int]:
        """Requests queued per tenant in a class for a model (tenants with none left out)."""
        return {
            t: n
            for (cls, m, t), n in self._tenant_count.items()
            if cls == workload_class and m == model
        }

    def tenants_with_cost(self, workload_class: WorkloadClass, model: str) -> dict[str, float]:
        """Queued weighted tokens per tenant in a class for a model."""
        return {
            t: c
            for (cls, m, t), c in self._tenant_cost.items()
            if cls == workload_class and m == model and c > 0
        }
