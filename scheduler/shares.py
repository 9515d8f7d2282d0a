"""Tenant isolation on node slots: a tenant past its weighted share does not take the slots
the other active tenants are likely to need next.

Synchronous and I/O-free, with an injected clock; the gate feeds it dispatches and ends. The
rule (:meth:`SlotShares.may_start`), per (model, class), work-conserving and without preemption
(a borrowed slot comes back when its request ends, as in YARN's capacity scheduler or Kueue's
cohorts):

- a tenant below its share (slots x its weight / the active tenants' weights, rounded up) may
  always take a slot, except one held as another light tenant's burst headroom;
- past its share it may take one only if enough stay free for every other active tenant's
  *reserve*: its recent peak plus one, capped at its share, less what it holds; whole slots
  for a tenant with requests queued; nothing for a tenant that has been borrowing (5-s average
  of slots held above its share);
- a *light* tenant (demand at least ``burst_margin`` below its share, not borrowing) that holds
  its whole share keeps one more slot as burst headroom, and its queued burst takes every slot
  that frees past heavier tenants' reserves, never another light tenant's share or headroom.

A tenant's demand (:class:`DemandMeter`) is the tokens its requests ask to generate over the
last ``DEMAND_WINDOW_S``, in slots by Little's law; without an inter-token time measured yet,
its 5-s average of slots held stands in. Bounds: a light tenant takes, over those windows, no
more than the share it leaves unused; a new flood reads light for its first seconds. Decision
records (docs/decisions/): scheduler-slot-shares.md, scheduler-whole-slot-reserves.md,
scheduler-borrower-reserves-nothing.md, scheduler-burst-headroom.md,
scheduler-demand-lightness.md, scheduler-queued-burst-headroom.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from scheduler.admission import RateMeter
from scheduler.queues import Clock, QueuedRequest
from sluice.contract import WorkloadClass

DEMAND_WINDOW_S = 20.0
"""How far back :class:`DemandMeter` looks at what a tenant asks for."""


@dataclass
class _Holding:
    running: int = 0
    peak: int = 0
    peak_at: float = 0.0
    average: float = 0.0
    """Slots held, exponentially averaged over the window (as of ``average_at``)."""
    average_at: float = 0.0

    def averaged(self, now: float, window: float) -> float:
        """The average brought up to ``now`` (``running`` held since ``average_at``)."""
        keep = math.exp(-max(0.0, now - self.average_at) / window)
        return self.average * keep + self.running * (1.0 - keep)


class SlotShares:
    """Slots each tenant holds per (model, class) on this replica, and the sharing rule."""

    def __init__(
        self,
        clock: Clock,
        weight: Callable[[str], float],
        peak_window_s: float = 5.0,
        burst_margin: float = 0.5,
    ) -> None:
        self._clock = clock
        self._weight = weight
        self._window = peak_window_s
        self.burst_margin = burst_margin
        """A tenant whose demand (else its average use) stays this far below its share gets
        burst headroom."""
        self._held: dict[tuple[str, WorkloadClass], dict[str, _Holding]] = {}

    def started(self, model: str, workload_class: WorkloadClass, tenant: str) -> None:
        """``tenant`` took a slot."""
        h = self._held.setdefault((model, workload_class), {}).setdefault(tenant, _Holding())
        now = self._clock()
        h.average, h.average_at = h.averaged(now, self._window), now
        h.running += 1
        if h.running >= h.peak or now - h.peak_at > self._window:
            h.peak, h.peak_at = h.running, now

    def ended(self, model: str, workload_class: WorkloadClass, tenant: str) -> None:
        """``tenant`` gave a slot back."""
        h = self._held.get((model, workload_class), {}).get(tenant)
        if h is not None and h.running > 0:
            now = self._clock()
            h.average, h.average_at = h.averaged(now, self._window), now
            h.running -= 1

    def running(self, model: str, workload_class: WorkloadClass, tenant: str) -> int:
        """Slots ``tenant`` holds now."""
        h = self._held.get((model, workload_class), {}).get(tenant)
        return h.running if h is not None else 0

    def may_start(
        self,
        model: str,
        workload_class: WorkloadClass,
        tenant: str,
        slots: int,
        free: int,
        active: Collection[str],
        *,
        queued: Collection[str] = (),
        demand: Mapping[str, float] | None = None,
        waiting: Mapping[str, int] | None = None,
    ) -> bool:
        """True when ``tenant`` may take one more of the ``slots`` the model has for the class,
        ``free`` of them free now (every class and replica counted), with ``active`` the
        tenants active in the class (others than ``tenant`` count), ``queued`` those of
        them with requests waiting (they reserve whole slots only), ``demand`` the slots
        each asks for (:meth:`DemandMeter.slots`; a tenant missing from it is judged on its
        average use) and ``waiting`` how many requests each has queued (with it, a light
        tenant's burst headroom covers its whole queued burst, not one slot)."""
        others = [t for t in active if t != tenant]
        if not others or slots <= 0:
            return True
        held = self._held.get((model, workload_class), {})
        total = sum(max(self._weight(t), 1e-6) for t in (*others, tenant))
        now = self._clock()

        def share(t: str) -> float:
            return slots * max(self._weight(t), 1e-6) / total

        def wanted(t: str, h: _Holding, pending: int) -> tuple[float, int, int, bool]:
            """Slots ``t`` is likely to need next (held ones included); of them, its slot of
            burst headroom past its share and the further slots its queued burst needs
            (``pending``: its requests waiting for one); and whether it is light (asks for
            less than its share by the margin and has not been borrowing)."""
            cap = math.ceil(share(t))
            average = h.averaged(now, self._window)
            borrowing = average > share(t)
            asks = demand.get(t, average) if demand is not None else average
            light = not borrowing and asks + self.burst_margin <= share(t)
            if h.running + 1 > cap and light:
                # Burst headroom, paid for by the share it leaves unused: one slot for its
                # next arrival, and as many more as its queued burst needs.
                headroom = max(0, cap + 1 - max(h.running, cap))
                need = max(cap + 1, h.running + pending)
                return need, headroom, need - max(h.running, cap) - headroom, True
            if borrowing:
                return h.running, 0, 0, False  # it has no slots to claim back
            peak = h.peak if now - h.peak_at <= self._window else h.running
            return min(share(t), peak + 1), 0, 0, light

        def pending(t: str) -> int:
            return max(0, waiting.get(t, 0)) if waiting is not None else 0

        mine = held.get(tenant, _Holding())
        # Its own request counts as waiting even when it is not queued (the gate's fast path).
        _, own_headroom, own_extra, own_light = wanted(tenant, mine, pending(tenant) or 1)
        claims = {t: wanted(t, held.get(t, _Holding()), pending(t)) for t in others}
        if mine.running + 1 <= math.ceil(share(tenant)):
            # Within its share: always, except into another light tenant's burst headroom,
            # and (for a tenant that is not light itself) into a light tenant's queued burst.
            bursts = sum(headroom for _, headroom, _, _ in claims.values())
            if not own_light:
                bursts += sum(extra for _, _, extra, _ in claims.values())
            return bursts == 0 or free - 1 >= bursts
        if own_headroom > 0:
            return free >= 1  # its own slot of burst headroom: kept for it
        # A light tenant's queued burst passes the reserves of heavier tenants.
        own_burst = waiting is not None and own_extra > 0
        reserve = 0.0
        for t, (want, _, _, light) in claims.items():
            if own_burst and not light:
                continue
            whole = math.floor(want) if t in queued else want
            reserve += max(0.0, whole - held.get(t, _Holding()).running)
        return free - 1 >= reserve


class DemandMeter:
    """Tokens each tenant asks a (model, class) to generate per second over the last
    ``window_s``: the requests that reached admission (admitted or refused by it; not quota or
    validation refusals, nor cache hits), each as ``max_new_tokens`` times the fraction the
    tenant's finished requests used (exponentially averaged; 1 until one finished). Prompts are
    left out. One :class:`~scheduler.admission.RateMeter` per (model, class, tenant), started as
    if after a quiet window; emptied meters are swept every ``SWEEP_EVERY`` arrivals.

    Limits: a new tenant reads low for up to a window, and this replica's view is set against
    every replica's slots, so a tenant spread over replicas reads lighter than it is
    (docs/decisions/scheduler-demand-lightness.md).
    """

    SWEEP_EVERY = 4096

    def __init__(self, clock: Clock, window_s: float = DEMAND_WINDOW_S) -> None:
        self._clock = clock
        self.window_s = window_s
        self._meters: dict[tuple[str, WorkloadClass, str], RateMeter] = {}
        self._used_fraction: dict[tuple[str, WorkloadClass, str], float] = {}
        self._arrivals = 0

    def arrived(self, item: QueuedRequest) -> None:
        """``item`` came in (before admission decides)."""
        key = (item.model, item.workload_class, item.tenant)
        meter = self._meters.get(key)
        if meter is None:
            quiet_since = self._clock() - self.window_s
            meter = self._meters[key] = RateMeter(self._clock, self.window_s, quiet_since)
        meter.record(item.max_new_tokens * self._used_fraction.get(key, 1.0))
        self._arrivals += 1
        if self._arrivals % self.SWEEP_EVERY == 0:
            for k in [k for k, m in self._meters.items() if m.rate() == 0.0]:
                del self._meters[k]

    def finished(self, item: QueuedRequest, generated: int) -> None:
        """``item`` ran to its end having generated ``generated`` tokens."""
        if item.max_new_tokens <= 0:
            return
        key = (item.model, item.workload_class, item.tenant)
        fraction = min(1.0, generated / item.max_new_tokens)
        self._used_fraction[key] = 0.8 * self._used_fraction.get(key, 1.0) + 0.2 * fraction

    def expected_tokens(self, item: QueuedRequest) -> float:
        """Tokens ``item`` is expected to generate: its ``max_new_tokens`` times the fraction
        its tenant's finished requests of the class used (a tenant with none yet: the mean
        of the other tenants' of the model and class, 1 without any)."""
        key = (item.model, item.workload_class, item.tenant)
        fraction = self._used_fraction.get(key)
        if fraction is None:
            known = [
                f for (m, c, _t), f in self._used_fraction.items()
                if m == item.model and c == item.workload_class
            ]  # fmt: skip
            fraction = sum(known) / len(known) if known else 1.0
        return item.max_new_tokens * fraction

    def rate(self, model: str, workload_class: WorkloadClass, tenant: str) -> float:
        """Tokens per second ``tenant`` has asked for over the window (0 when none)."""
        meter = self._meters.get((model, workload_class, tenant))
        return meter.rate() if meter is not None else 0.0

    def slots(
        self, model: str, workload_class: WorkloadClass, tenants: Collection[str], token_s: float
    ) -> dict[str, float] | None:
        """Slots each of ``tenants`` asks for, by Little's law (tokens per second times
        ``token_s``, the seconds per generated token); None while ``token_s`` is unknown."""
        if token_s <= 0:
            return None
        return {t: self.rate(model, workload_class, t) * token_s for t in tenants}
