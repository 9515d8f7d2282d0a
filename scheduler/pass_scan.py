"""One dispatch pass's view of the nodes and shares (:class:`PassScan`), and what a pass
found holding each request it could not place (``HOLD_*``, with the queues'
:data:`~scheduler.queues.HOLD_PROMOTED`; the request's log line counts the time per hold,
:meth:`~scheduler.queues.QueuedRequest.hold`)."""

from __future__ import annotations

import math
from collections.abc import Callable

from scheduler.admission import Admission
from scheduler.node_handle import POOL_FOR_CLASS, NodeHandle
from scheduler.nodes import NodeDirectory, SlotView
from scheduler.queues import FairQueues, QueuedRequest
from scheduler.shares import SlotShares
from sluice.contract import WorkloadClass

__all__ = ["HOLD_HIGHER", "HOLD_PREFILL", "HOLD_SHARE", "HOLD_SLOTS", "Key", "PassScan"]

Key = tuple[str, WorkloadClass]
"""(model, class): what slots, shares and queues are counted per."""
HOLD_SLOTS = "slots"
"""No candidate node has a slot the class may take (the inter-token guard's, or its seats), or
no node can take the model at all."""
HOLD_PREFILL = "prefill"
"""A node has a slot, but none takes the prompt now: its prefill bucket
(:mod:`scheduler.prefill`) holds it (or its breaker, half open, has its probe out)."""
HOLD_HIGHER = "higher_class_prompt"
"""A higher class's prompt waits for the same nodes' buckets and goes first."""
HOLD_SHARE = "tenant_share"
"""The tenant has its slot share; the rest is kept for the other tenants queued."""


class PassScan:
    """What one dispatch pass has read, per (model, class), while the queues look at many
    items: the candidates' slots, the tenants active and queued, their demand, and which keys
    and tenants can start nothing more in this pass (:meth:`took` drops what a booking moves)."""

    def __init__(
        self,
        nodes: NodeDirectory,
        admission: Admission,
        queues: FairQueues,
        shares: SlotShares,
        demand: Callable[[Key, set[str]], dict[str, float] | None],
        now: float,
    ) -> None:
        self._now = now
        self._nodes = nodes
        self._admission = admission
        self._queues = queues
        self._shares = shares
        self._demand = demand
        self._chosen: dict[str, NodeHandle] = {}
        # Promoted lower-class items may use REALTIME's headroom (NodeDirectory.has_room), so
        # room is read per (model, class, promoted).
        self._promoted = {i.request_id for i in queues.promoted()}
        # No room now, nor in this pass: the hold found.
        self._full: dict[tuple[str, WorkloadClass, bool], str] = {}
        self._held_back: set[tuple[str, WorkloadClass, str]] = set()  # past its share
        self._views: dict[tuple[str, WorkloadClass, bool], SlotView] = {}
        self._sharing: dict[Key, tuple[set[str], dict[str, int]]] = {}
        self._demands: dict[Key, dict[str, float] | None] = {}  # unchanged in a pass
        self._prompt_held: dict[tuple[str, str], int] = {}  # (model, pool): best rank held

    def placeable(self, item: QueuedRequest) -> bool:
        """True when ``item`` can start now; the node chosen for it is kept for :meth:`took`.
        Otherwise what held it is noted on it (:meth:`QueuedRequest.hold`)."""
        hold = self._hold(item)
        if hold:
            item.hold(hold, self._now)
        return not hold

    def _hold(self, item: QueuedRequest) -> str:
        """What holds ``item`` now (empty: nothing, its node chosen)."""
        key = (item.model, item.workload_class)
        promoted = item.request_id in self._promoted
        room_key = (*key, promoted)
        if room_key in self._full:
            return self._full[room_key]
        if (*key, item.tenant) in self._held_back:
            return HOLD_SHARE
        held = self._prompt_held.get((item.model, POOL_FOR_CLASS[item.workload_class]), math.inf)
        if item.workload_class.rank > held:
            return HOLD_HIGHER  # a higher class's prompt waits for these nodes' buckets
        view = self._views.get(room_key)
        if view is None:
            view = self._views[room_key] = self._nodes.capacity(*key, promoted=promoted)
        if not view.room:  # the common case under load: a pass woken by a report
            self._full[room_key] = HOLD_SLOTS
            return HOLD_SLOTS
        if key not in self._sharing:
            self._sharing[key] = (
                self._admission.active(*key),
                self._queues.waiting(item.workload_class, item.model),
            )
        active, waiting = self._sharing[key]
        if key not in self._demands:
            self._demands[key] = self._demand(key, active)
        demand = self._demands[key]
        if not self._shares.may_start(
            *key,
            item.tenant,
            view.slots,
            view.free,
            active,
            queued=waiting,
            demand=demand,
            waiting=waiting,
        ):
            self._held_back.add((*key, item.tenant))  # the rest is kept for the others
            return HOLD_SHARE
        node = self._nodes.pick(
            *key,
            affinity=item.affinity,
            need_room=True,
            among=view.candidates,
            prompt=item.prompt_tokens,
            promoted=promoted,
        )
        if node is None:  # its prompt waits for a prefill bucket: so do those behind it
            self._full[room_key] = HOLD_PREFILL
            pool, rank = (item.model, POOL_FOR_CLASS[item.workload_class]), item.workload_class.rank
            self._prompt_held[pool] = min(rank, self._prompt_held.get(pool, rank))
            return HOLD_PREFILL
        self._chosen[item.request_id] = node
        return ""

    def took(self, item: QueuedRequest) -> NodeHandle:
        """``item`` was popped: its (model, class) has one slot fewer and maybe other tenants
        queued, so what was read for it is read again. Returns the node chosen for it."""
        key = (item.model, item.workload_class)
        self._views.pop((*key, False), None)
        self._views.pop((*key, True), None)
        self._sharing.pop(key, None)
        self._held_back.difference_update({k for k in self._held_back if k[:2] == key})
        return self._chosen[item.request_id]
