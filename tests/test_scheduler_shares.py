"""Tenant isolation on node slots (scheduler.shares), on a simulated clock."""

from __future__ import annotations

import itertools

import pytest

from scheduler.queues import QueuedRequest
from scheduler.shares import DemandMeter, SlotShares
from sluice.contract import WorkloadClass

REALTIME = WorkloadClass.REALTIME


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(weights: dict[str, float] | None = None) -> tuple[Clock, SlotShares]:
    clock = Clock()
    w = weights or {}
    return clock, SlotShares(clock, lambda t: w.get(t, 1.0), peak_window_s=5.0)


def start(shares: SlotShares, tenant: str, n: int = 1) -> None:
    for _ in range(n):
        shares.started("m", REALTIME, tenant)


def free(shares: SlotShares, slots: int) -> int:
    return slots - sum(shares.running("m", REALTIME, t) for t in ("victim", "flood", "A", "B"))


def may(shares: SlotShares, tenant: str, active: set[str], slots: int = 4) -> bool:
    return shares.may_start("m", REALTIME, tenant, slots, free(shares, slots), active)


def test_alone_a_tenant_may_fill_every_slot() -> None:
    _, shares = make()
    start(shares, "flood", 3)
    assert may(shares, "flood", {"flood"})


def test_past_its_share_a_tenant_leaves_the_others_reserve_free() -> None:
    """4 slots, two equal tenants: the flooder holds its 2; the victim, seen using one slot,
    reserves 2 (its peak + 1): the flooder may not take a third while the victim holds 1."""
    clock, shares = make()
    start(shares, "victim")
    start(shares, "flood", 2)
    clock.now += 10.0  # held that long: the flood averages its share, the victim half its own
    assert not may(shares, "flood", {"flood", "victim"})
    assert may(shares, "victim", {"flood", "victim"})  # within its own share


def test_reserve_is_what_the_other_was_seen_to_need_not_its_whole_share() -> None:
    """8 slots, equal weights: the victim peaks at one slot, so it reserves two and the
    flooder may borrow up to six; an idle victim (out of the active set) reserves nothing."""
    clock, shares = make()
    start(shares, "victim")
    shares.ended("m", REALTIME, "victim")
    start(shares, "flood", 5)
    assert may(shares, "flood", {"flood", "victim"}, slots=8)  # 5 + 1 leaves 2 for the victim
    start(shares, "flood")
    assert not may(shares, "flood", {"flood", "victim"}, slots=8)
    clock.now += 10
    assert may(shares, "flood", {"flood"}, slots=8)


def test_reserve_scales_with_weight() -> None:
    """Weights 3:1 on 4 slots: A's share is 3, B's is 1; B's reserve is capped at its share."""
    clock, shares = make({"A": 3.0, "B": 1.0})
    start(shares, "A", 3)
    clock.now += 10.0
    assert not may(shares, "A", {"A", "B"})  # B (share 1, holds 0) keeps its one slot
    start(shares, "B")
    assert not may(shares, "B", {"A", "B"})  # at its share, and none is free anyway
    assert shares.running("m", REALTIME, "A") == 3


def test_free_slots_count_what_other_classes_and_replicas_hold() -> None:
    """The flooder is past its share on 8 slots and the victim reserves 2: with 3 slots free
    it may take one, but not when other classes or replicas hold two of them."""
    _, shares = make()
    start(shares, "victim")
    shares.ended("m", REALTIME, "victim")
    start(shares, "flood", 5)
    both = {"flood", "victim"}
    assert shares.may_start("m", REALTIME, "flood", 8, 3, both)
    assert not shares.may_start("m", REALTIME, "flood", 8, 1, both)


def test_a_queued_tenant_below_its_share_keeps_its_slot_from_the_flooder() -> None:
    """Weights 1:1 on 4 slots: the flood holds 3, the victim 0 with a request queued, one slot
    free. The flood may not take it (the victim, queued in the same pass, does), whichever
    tenant the fair queue would order first."""
    _, shares = make({"flood": 1.0, "victim": 1.0})
    start(shares, "flood", 3)
    both = {"flood", "victim"}
    assert not shares.may_start("m", REALTIME, "flood", 4, 1, both, queued={"victim"})
    assert shares.may_start("m", REALTIME, "victim", 4, 1, both, queued={"flood", "victim"})


def test_a_queued_tenant_reserves_whole_slots_only() -> None:
    """Weights 2:1 on 4 slots: B's share is 1.33, A holds its 3 and wants one more, one slot
    is free (another replica's has ended). Queued and holding 1, B reserves nothing more (the
    fractional rest is the fair queue's to hand out), so A may borrow the slot; idle and
    holding 1, B keeps it for its next arrival."""
    clock, shares = make({"A": 2.0, "B": 1.0})
    start(shares, "A", 3)
    start(shares, "B")
    clock.now += 10.0
    both = {"A", "B"}
    assert shares.may_start("m", REALTIME, "A", 4, 1, both, queued={"B"})
    assert not shares.may_start("m", REALTIME, "A", 4, 1, both, queued=())


def test_a_borrower_claims_no_reserve_against_a_burst() -> None:
    """Weights 1:1 on 4 slots. The flood has held 3 for a while (past its share of 2 on
    average: it has been borrowing); now the victim, which has itself used its whole share,
    holds 2 and a third victim request finds one slot free: it goes ahead (the borrower has
    no slots to claim back). Against a flood that had kept to its share it would wait."""
    clock, shares = make({"flood": 1.0, "victim": 1.0})
    start(shares, "flood", 3)
    start(shares, "victim", 2)
    clock.now += 10.0  # flood averaged ~3, victim ~2: both at or past their share
    shares.ended("m", REALTIME, "flood")
    shares.ended("m", REALTIME, "flood")
    both = {"flood", "victim"}
    assert shares.may_start("m", REALTIME, "victim", 4, 1, both, queued={"flood", "victim"})

    clock2, fair = make({"flood": 1.0, "victim": 1.0})
    start(fair, "flood")
    start(fair, "victim", 2)
    clock2.now += 10.0
    assert not fair.may_start("m", REALTIME, "victim", 4, 1, both, queued={"flood", "victim"})


def test_a_light_tenant_at_its_share_keeps_one_slot_of_burst_headroom() -> None:
    """Weights 1:1 on 4 slots, a flood with requests queued. The victim has used about one
    slot on average (its share is 2) and now holds 2: one more slot is kept for its next
    arrival, paid for by the share it left unused; the flood may not take it even below its
    own share, and the victim's burst takes it at once. Past that one slot the ordinary
    rule applies; a victim that has used its whole share gets no headroom."""
    clock, shares = make({"flood": 1.0, "victim": 1.0})
    start(shares, "victim")
    start(shares, "flood")
    clock.now += 10.0  # victim averaged 1, flood 1
    start(shares, "victim")  # holds its share now: 2
    both = {"flood", "victim"}
    assert not shares.may_start("m", REALTIME, "flood", 4, 1, both, queued={"flood"})
    assert shares.may_start("m", REALTIME, "flood", 4, 2, both, queued={"flood"})
    assert shares.may_start("m", REALTIME, "victim", 4, 1, both, queued={"flood", "victim"})
    start(shares, "victim")  # 3: the headroom is used
    assert shares.may_start("m", REALTIME, "flood", 4, 1, both, queued={"flood"})
    assert not shares.may_start("m", REALTIME, "victim", 4, 1, both, queued={"flood", "victim"})

    clock2, busy = make({"flood": 1.0, "victim": 1.0})
    start(busy, "victim", 2)
    start(busy, "flood")
    clock2.now += 10.0  # victim averaged its whole share
    assert busy.may_start("m", REALTIME, "flood", 4, 1, both, queued={"flood"})
    assert not busy.may_start("m", REALTIME, "victim", 4, 1, both, queued={"flood", "victim"})


_ids = itertools.count()


def item(tenant: str, max_new: int = 100, prompt: int = 20) -> QueuedRequest:
    return QueuedRequest(f"{tenant}-{next(_ids)}", tenant, REALTIME, "m", prompt, max_new, 1e9)


def test_demand_is_tokens_asked_for_per_second_over_the_window() -> None:
    """A steady 2 requests a second of 100 new tokens each reads 200 tokens/s, prompts aside,
    once the window has filled and from then on."""
    clock = Clock()
    meter = DemandMeter(clock, window_s=20.0)
    for i in range(120):
        meter.arrived(item("victim", prompt=500))
        clock.now += 0.5
        if i >= 40:
            assert meter.rate("m", REALTIME, "victim") == pytest.approx(200.0, rel=0.06)


def test_a_sparse_tenant_reads_its_rate_over_the_whole_window() -> None:
    """One request of 100 tokens every 5 s reads 20 tokens/s whatever the phase of the last
    arrival, once the window has filled: the window is the divisor, not the time since the
    oldest arrival in it."""
    clock = Clock()
    meter = DemandMeter(clock, window_s=20.0)
    for i in range(20):
        meter.arrived(item("sparse"))
        for _ in range(5):
            clock.now += 1.0
            if i >= 4:
                assert meter.rate("m", REALTIME, "sparse") == pytest.approx(20.0, rel=0.05)


def test_a_flood_reads_past_its_share_within_a_tenth_of_the_window() -> None:
    """A tenant that starts sending 10x what it had sent shows it at once: 100 requests in
    2 s read as 500 tokens/s over the 20-s window."""
    clock = Clock()
    meter = DemandMeter(clock, window_s=20.0)
    for _ in range(100):
        meter.arrived(item("flood"))
        clock.now += 0.02
    assert meter.rate("m", REALTIME, "flood") == pytest.approx(500.0)


def test_a_quiet_window_forgets_a_tenant() -> None:
    clock = Clock()
    meter = DemandMeter(clock, window_s=20.0)
    meter.arrived(item("victim"))
    clock.now += 21.5
    assert meter.rate("m", REALTIME, "victim") == 0.0


def test_demand_counts_the_tokens_a_tenant_actually_uses() -> None:
    """A tenant whose requests stop at a fifth of max_new_tokens is expected to keep doing so."""
    clock = Clock()
    meter = DemandMeter(clock, window_s=20.0)
    for _ in range(30):
        meter.finished(item("chat", max_new=1000), generated=200)
    meter.arrived(item("chat", max_new=1000))
    assert meter.rate("m", REALTIME, "chat") == pytest.approx(200.0 / 20.0, rel=0.01)


def test_demand_in_slots_waits_for_a_time_per_token() -> None:
    """Slots are tokens per second times seconds per token; unknown until a node has one."""
    clock = Clock()
    meter = DemandMeter(clock, window_s=20.0)
    for _ in range(40):
        meter.arrived(item("victim"))
        clock.now += 0.5
    assert meter.slots("m", REALTIME, {"victim"}, token_s=0.0) is None
    slots = meter.slots("m", REALTIME, {"victim"}, token_s=0.005)
    assert slots is not None and slots["victim"] == pytest.approx(1.0, rel=0.06)


def test_a_light_tenant_keeps_its_headroom_through_its_own_burst() -> None:
    """Weights 1:1 on 4 slots. The victim asks for one slot (its share is 2) but has held 2
    for 8 s of a burst, so its 5-s average (1.6) is past its share less the margin: judged on
    that average it loses its headroom in the middle of the burst and the flood takes the
    free slot. Judged on its demand it keeps it; a tenant asking for its whole share does not."""
    clock, shares = make({"flood": 1.0, "victim": 1.0})
    start(shares, "victim", 2)
    start(shares, "flood")
    clock.now += 8.0
    both = {"flood", "victim"}
    assert shares.may_start("m", REALTIME, "flood", 4, 1, both, queued={"flood"})  # on its average
    light = {"victim": 1.0, "flood": 20.0}
    assert not shares.may_start("m", REALTIME, "flood", 4, 1, both, queued={"flood"}, demand=light)
    assert shares.may_start(
        "m", REALTIME, "victim", 4, 1, both, queued={"flood", "victim"}, demand=light
    )
    heavy = {"victim": 2.0, "flood": 20.0}
    assert shares.may_start("m", REALTIME, "flood", 4, 1, both, queued={"flood"}, demand=heavy)


def test_a_tenant_asking_for_ten_times_its_share_keeps_no_headroom() -> None:
    """The flood has held one slot on average (light by its use) and now holds its share of
    2: on its average it keeps a slot of headroom from the victim, on its demand (ten times
    its share) it keeps none."""
    clock, shares = make({"flood": 1.0, "victim": 1.0})
    start(shares, "flood")
    clock.now += 10.0
    start(shares, "flood")
    both = {"flood", "victim"}
    assert not shares.may_start("m", REALTIME, "victim", 4, 1, both, queued={"victim"})
    demand = {"flood": 20.0, "victim": 1.0}
    assert shares.may_start("m", REALTIME, "victim", 4, 1, both, queued={"victim"}, demand=demand)


def test_a_light_tenants_queued_burst_takes_every_slot_that_frees() -> None:
    """Weights 1:1 on 4 slots, the flood asking for ten times its share. The victim, light by
    demand, is in a burst: it holds 3 (its share and the slot of headroom) with 3 more queued.
    Told how many wait, its headroom covers the whole queued burst: a slot the flood's request
    gives back goes to the victim, not back to the flood (whose share it is), and the flood
    waits until the burst has drained. Without the counts the victim stops at one slot past
    its share and its burst waits for its own requests to end."""
    clock, shares = make({"flood": 1.0, "victim": 1.0})
    start(shares, "victim")
    start(shares, "flood")
    clock.now += 10.0  # victim averaged 1, flood 1
    start(shares, "victim", 2)  # 3 held: its share of 2 and the headroom
    shares.ended("m", REALTIME, "flood")  # the flood's request ends: one slot frees
    both = {"flood", "victim"}
    demand = {"victim": 1.0, "flood": 20.0}
    burst = {"victim": 3, "flood": 5}
    assert shares.may_start(
        "m", REALTIME, "victim", 4, 1, both, queued=burst, demand=demand, waiting=burst
    )
    assert not shares.may_start(
        "m", REALTIME, "flood", 4, 1, both, queued=burst, demand=demand, waiting=burst
    )
    assert not shares.may_start("m", REALTIME, "victim", 4, 1, both, queued=burst, demand=demand)
    assert shares.may_start("m", REALTIME, "flood", 4, 1, both, queued=burst, demand=demand)

    drained = {"flood": 5}  # the victim's queue is empty again: one slot of headroom as before
    start(shares, "victim")  # 4 held
    shares.ended("m", REALTIME, "victim")
    shares.ended("m", REALTIME, "victim")  # 2 held, its share: one free slot stays its own
    assert not shares.may_start(
        "m", REALTIME, "flood", 4, 1, both, queued=drained, demand=demand, waiting=drained
    )
    assert shares.may_start(
        "m", REALTIME, "flood", 4, 2, both, queued=drained, demand=demand, waiting=drained
    )


def test_a_tenant_asking_for_its_share_gets_no_burst_past_it() -> None:
    """A tenant whose demand is its whole share is not light: however many it has queued,
    it keeps to its share and the other's reserve."""
    clock, shares = make({"flood": 1.0, "victim": 1.0})
    start(shares, "victim", 2)
    start(shares, "flood")
    clock.now += 10.0
    both = {"flood", "victim"}
    demand = {"victim": 2.0, "flood": 2.0}
    waiting = {"victim": 6, "flood": 1}
    assert not shares.may_start(
        "m", REALTIME, "victim", 4, 1, both, queued=waiting, demand=demand, waiting=waiting
    )
    assert shares.may_start(
        "m", REALTIME, "flood", 4, 1, both, queued=waiting, demand=demand, waiting=waiting
    )


def test_a_queued_burst_does_not_hold_a_light_tenant_below_its_share() -> None:
    """Two tenants that both read light (each just started, its demand still low) and both
    have requests queued: one past its share with a queued burst keeps its slot of headroom
    from the other, but not the rest of its burst, as it does from a heavy tenant (the 2:1
    fairness load's first seconds)."""
    _clock, shares = make({"A": 2.0, "B": 1.0})
    start(shares, "A", 2)  # A's share of 4 slots is 2.67: it holds 2 of the 3 taken
    start(shares, "B")
    both = {"A", "B"}
    demand = {"A": 0.2, "B": 0.1}
    waiting = {"A": 8, "B": 8}
    start(shares, "A")  # A holds 3, B 1: none free
    shares.ended("m", REALTIME, "B")  # one frees
    assert not shares.may_start(
        "m", REALTIME, "B", 4, 1, both, queued=waiting, demand=demand, waiting=waiting
    )
    assert shares.may_start(
        "m", REALTIME, "A", 4, 1, both, queued=waiting, demand=demand, waiting=waiting
    )
    assert shares.may_start(
        "m", REALTIME, "B", 4, 2, both, queued=waiting, demand=demand, waiting=waiting
    )
    heavy_b = {"A": 0.2, "B": 5.0}
    assert not shares.may_start(
        "m", REALTIME, "B", 4, 2, both, queued=waiting, demand=heavy_b, waiting=waiting
    )


def test_a_flood_that_still_reads_light_keeps_its_burst_off_a_light_tenants_share() -> None:
    """A flood's first seconds: its demand still reads light. Holding its share of 2 it takes
    its one slot of headroom; past that its queued burst may not take the slot the victim
    (light, below its share, one request queued) is owed, though it would pass the reserve of
    a tenant that asks for more than its share."""
    clock, shares = make({"flood": 1.0, "victim": 1.0})
    start(shares, "victim")
    start(shares, "flood", 2)
    clock.now += 1.0
    both = {"flood", "victim"}
    demand = {"victim": 1.0, "flood": 0.8}
    waiting = {"victim": 1, "flood": 5}
    assert shares.may_start(
        "m", REALTIME, "flood", 4, 1, both, queued=waiting, demand=demand, waiting=waiting
    )
    start(shares, "flood")  # 3 held: its headroom is used
    shares.ended("m", REALTIME, "victim")  # a victim request ends
    start(shares, "victim")  # the next starts: 1 held, 1 more queued
    shares.ended("m", REALTIME, "flood")
    start(shares, "flood")  # the flood's slot turned over: 3 held, one slot frees now
    assert not shares.may_start(
        "m", REALTIME, "flood", 4, 1, both, queued=waiting, demand=demand, waiting=waiting
    )
    assert shares.may_start(
        "m", REALTIME, "victim", 4, 1, both, queued=waiting, demand=demand, waiting=waiting
    )
    heavy_victim = {"victim": 3.0, "flood": 0.8}
    assert shares.may_start(
        "m", REALTIME, "flood", 4, 1, both, queued=waiting, demand=heavy_victim, waiting=waiting
    )


def test_without_counts_a_light_tenant_past_its_headroom_keeps_to_the_reserves() -> None:
    """Without ``waiting`` the rule is the one-slot headroom it was: a light tenant holding its
    share and the headroom slot waits for the others' reserve, however much it asks less."""
    clock, shares = make({"flood": 1.0, "victim": 1.0})
    start(shares, "victim")
    start(shares, "flood")
    clock.now += 10.0
    start(shares, "victim", 2)  # 3: share and headroom
    shares.ended("m", REALTIME, "flood")  # one slot frees
    both = {"flood", "victim"}
    demand = {"victim": 0.5, "flood": 20.0}
    assert not shares.may_start(
        "m", REALTIME, "victim", 4, 1, both, queued={"flood"}, demand=demand
    )
    assert shares.may_start(
        "m", REALTIME, "victim", 4, 1, both, queued={"flood"}, demand=demand, waiting={}
    )
