"""Tenant isolation on node slots: a tenant past its weighted share does not take the slots
other active tenants are likely to need next.

Fair queuing (:mod:`scheduler.queues`) decides who is dispatched *next*, but it cannot help a
request that arrives when every sequence slot is held by someone else: without preemption the
newcomer waits for a running request to end (measured: a flood at 10x its share raised another
tenant's median time to first token from 8 ms to 69 ms through a fair queue alone). So slots are
shared too, work-conservingly:

- a tenant below its share of a model's slots in a class (slots x its weight / the weights of
  the tenants active in the class, rounded up) may always take one;
- past its share it may take one only if enough stay free for the *reserve* of every other
  active tenant (a light tenant's queued burst, below: of the other light ones only): what
  it has recently been seen to use at peak, plus one for its next arrival, capped at its own
  share, minus what it holds now. For a tenant with requests queued the
  reserve is rounded down to whole slots: it is in the same dispatch pass, so a slot reserved
  for it is taken by it at once (never left idle), while the fractional rest of its share is
  left to the fair queue, which orders the tenants by service received. Without the reserve a
  queued tenant would wait behind the flooder's next dispatch whenever their virtual counters
  tie (a newly backlogged tenant is lifted to the others' counter: measured, a victim's
  median time to first token went from 9 ms calm to 90 ms in a 10x flood);
- a tenant that has held more than its share on average over the window (slots held,
  exponentially averaged: it has been borrowing) reserves nothing, so a light tenant's burst
  past its own share may take the slots the borrower would otherwise keep. Without it a
  victim at half its share, confined to its share in a flood, queued behind its own bursts
  (Poisson arrivals: time to first token p99 1.4 s in the flood against 0.2 s calm).

- a *light* tenant, one that asks for its share less ``burst_margin`` (half a slot), that now
  holds its whole share keeps one more slot free for its next arrival (burst headroom, paid
  for by the share it leaves unused): tenants past their share may not take it, nor may
  tenants below their share, and its own burst takes it at once. With requests queued its
  headroom is its whole queued burst: every slot that frees goes to it until the burst has
  drained, the slots of a heavier tenant's share included, but not those another light
  tenant is owed (its share, its headroom, its own queued burst). Without it a light tenant's
  Poisson bursts past its share waited in a flood for one of its own requests to end: under
  ``make bench-scheduler``'s isolation load (the victim at half its share, a flood at 10x
  its share) the victim's time to first token p99 was 1.10 s in the flood (0.46 s calm);
  with the headroom, 0.11 s in the flood of the same load run alone (30 s phases). The price
  is at most one idle slot per light tenant, which the flood would otherwise have filled
  beyond its share.

  What a tenant asks for is its *demand* (:class:`DemandMeter`): the tokens its requests
  reaching admission (admitted or refused) ask to generate over the last ``DEMAND_WINDOW_S``
  (20 s), in slots by Little's law (tokens per second times seconds per token), as the gate
  passes it in. Not the slots it has held: a burst raises those at once, so a light tenant
  judged on its 5-s average lost its headroom in the very bursts it was for; and a flooder
  judged on a longer average of slots held still looked light for the first seconds of its
  flood. Offered load sees both right: the victim's bursts move its 20-s demand little, a
  flood moves the flooder's at once. (On a discrete-event model of the isolation load with
  the real queues and shares, ``python -m bench.isolation_model``, over 30 seeded 300-s
  phases: the victim's p99 ratio flood/calm went from 0.69 / 0.82 / 1.06 to 0.66 / 0.81 /
  0.95 at p10 / p50 / p90, and from 0.79 to 0.75 over 3000-s phases, the flooder's
  throughput unchanged. How often the victim waits for a slot barely moves: what goes are
  the long waits of a burst without its headroom.)
  Without a demand figure (no inter-token time measured yet) the 5-s average stands in.

  One slot of headroom was not enough for a burst of many requests: under ``make
  bench-scheduler``'s isolation load a victim burst of ten requests in three seconds held its
  three slots while the flood kept its share of two, and waited for its own requests to end
  (1.3-2.2 s to the first token in the flood against 0.3-0.8 s for the same arrivals in the
  calm phase, which read the victim's p99 ratio 2.57). So a light tenant's queued requests
  count as headroom too (``waiting``), and a burst takes every slot that frees, the flood's
  included, until it has drained. The flood gives up slots it would have held for the
  burst's length only. The bounds: a tenant stays light while its 20-s demand reads below its
  share by the margin and its 5-s average of slots held stays within its share, so over those
  windows, not at every moment, it takes no more than the share it left unused. A tenant that
  starts to flood reads light for its first seconds (about 1.5 s at ten times its share):
  meanwhile its queued burst passes the reserves of heavier tenants only, never a light
  tenant's share or headroom. (On the model, 30 seeds of 300-s
  phases: p10 / p50 / p90 0.66 / 0.81 / 0.95 to 0.58 / 0.70 / 0.83, the flooder's
  throughput unchanged.)

A tenant that stays idle reserves nothing once it drops out of the active set, and a tenant that
only ever uses one slot reserves two, not its whole share, so capacity left idle by the others
is still used: only the headroom they are likely to need right away is kept for them. This is
the guaranteed share plus borrowing of YARN's capacity scheduler or Kueue's cohorts, on sequence
slots and without their preemption: a borrowed slot comes back when its request ends.

Synchronous and I/O-free, with an injected clock; the gate feeds it dispatches and ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from scheduler.admission import RateMeter
from scheduler.queues import Clock, QueuedRequest

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
        self._held: dict[tuple[str, int], dict[str, _Holding]] = {}

    def started(self, model: str, workload_class: int, tenant: str) -> None:
        """``tenant`` took a slot."""
        h = self._held.setdefault((model, workload_class), {}).setdefault(tenant, _Holding())
        now = self._clock()
        h.average, h.average_at = h.averaged(now, self._window), now
        h.running += 1
        if h.running >= h.peak or now - h.peak_at > self._window:
            h.peak, h.peak_at = h.running, now

    def ended(self, model: str, workload_class: int, tenant: str) -> None:
        """``tenant`` gave a slot back."""
        h = self._held.get((model, workload_class), {}).get(tenant)
        if h is not None and h.running > 0:
            now = self._clock()
            h.average, h.average_at = h.averaged(now, self._window), now
            h.running -= 1

    def running(self, model: str, workload_class: int, tenant: str) -> int:
        """Slots ``tenant`` holds now."""
        h = self._held.get((model, workload_class), {}).get(tenant)
        return h.running if h is not None else 0

    def may_start(
        self,
        model: str,
        workload_class: int,
        tenant: str,
        slots: int,
        free: int,
        active: Collection[str],
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
    """Tokens each tenant asks a (model, class) to generate per second: the requests that
    reached admission over the last ``window_s`` (admitted or refused by it; refusals before
    it, such as quota or validation, and cache hits do not count), divided by the window.
    One :class:`~scheduler.admission.RateMeter` per (model, class, tenant), as if it had
    watched a quiet window before the tenant's first request.

    A request asks for ``max_new_tokens`` times the fraction of it the tenant's requests that
    ran to their end actually used (exponentially averaged; 1 until one has), so a chat
    tenant that asks for 1024 and stops after 200 is not taken for a heavy one. Prompts are
    left out: prefill holds a slot for a small part of a request's life, far less per token
    than decoding, so counting prompt tokens at the decode rate would make a tenant with long
    prompts look many times heavier than it is. Meters whose window has emptied are swept
    every ``SWEEP_EVERY`` arrivals.

    Divided by the whole window, a flood shows at once (10x a tenant's share reads as its
    whole share within a tenth of the window) while a light tenant's burst moves its demand
    by the burst's own work only. Its limits: a tenant that has just started reads low for up
    to a window, so it may get headroom before it has shown that it needs little (as it did
    on the 5-s average); and it is this replica's view against the slots of every replica,
    so with several replicas a tenant spread over them reads lighter than it is.
    """

    SWEEP_EVERY = 4096

    def __init__(self, clock: Clock, window_s: float = DEMAND_WINDOW_S) -> None:
        self._clock = clock
        self.window_s = window_s
        self._meters: dict[tuple[str, int, str], RateMeter] = {}
        self._used_fraction: dict[tuple[str, int, str], float] = {}
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

    def rate(self, model: str, workload_class: int, tenant: str) -> float:
        """Tokens per second ``tenant`` has asked for over the window (0 when none)."""
        meter = self._meters.get((model, workload_class, tenant))
        return meter.rate() if meter is not None else 0.0

    def slots(
        self, model: str, workload_class: int, tenants: Collection[str], token_s: float
    ) -> dict[str, float] | None:
        """Slots each of ``tenants`` asks for, by Little's law (tokens per second times
        ``token_s``, the seconds per generated token); None while ``token_s`` is unknown."""
        if token_s <= 0:
            return None
        return {t: self.rate(model, workload_class, t) * token_s for t in tenants}
