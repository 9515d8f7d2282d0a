"""The scheduling core (queues, fairness, aging, admission) against a fake clock: no I/O."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.admission import NO_CAPACITY, OVERLOADED, Admission, AdmissionConfig
from scheduler.calibration import STALE_WAIT_S
from scheduler.dispatch import _keyed
from scheduler.first_token_budget import TTFT_PRESSURE_HOLD_S
from scheduler.queues import FairQueues, QueueConfig, QueuedRequest, QueueFull
from sluice.contract import WorkloadClass
from sluice.v1 import node_pb2

REALTIME, BATCH, FINETUNE = WorkloadClass.REALTIME, WorkloadClass.BATCH, WorkloadClass.FINETUNE


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_ids = itertools.count()


def item(
    tenant: str = "a",
    cls: WorkloadClass = REALTIME,
    *,
    prompt: int = 10,
    new: int = 10,
    deadline: float = math.inf,
    model: str = "m",
    start_by: float = math.inf,
) -> QueuedRequest:
    return QueuedRequest(
        f"r{next(_ids)}", tenant, cls, model, prompt, new, deadline, start_by=start_by
    )


def make(
    weights: dict[str, float] | None = None, **config: float
) -> tuple[FakeClock, FairQueues, Admission]:
    clock = FakeClock()
    w = weights or {}

    def weight(t: str) -> float:
        return w.get(t, 1.0)

    queues = FairQueues(clock, weight, QueueConfig(**config))  # type: ignore[arg-type]
    # Deadlines alone: the REALTIME queue-wait bound has its own test.
    return clock, queues, Admission(queues, clock, weight, AdmissionConfig(realtime_max_wait_s=0))


def always(_: QueuedRequest) -> bool:
    return True


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def simulate(
    queues: FairQueues,
    clock: FakeClock,
    tenants: dict[str, float],
    *,
    slots: int = 4,
    steps: int = 4000,
    backlog: int = 8,
    rng: random.Random,
    lengths: tuple[int, int] = (5, 60),
) -> dict[str, float]:
    """A node with ``slots`` sequences, one token per sequence per 10 ms step; every tenant
    keeps ``backlog`` requests queued. Returns weighted tokens served per tenant."""
    served = dict.fromkeys(tenants, 0.0)
    running: list[tuple[QueuedRequest, int]] = []  # (request, tokens still to generate)
    w_p = queues.config.prompt_token_weight
    for _ in range(steps):
        for t in tenants:
            while queues.depth(REALTIME, t) < backlog:
                queues.push(item(t, prompt=rng.randint(5, 40), new=rng.randint(*lengths)))
        while len(running) < slots:
            got = queues.pop(always)
            assert got is not None
            served[got.tenant] += w_p * got.prompt_tokens
            # It really stops early sometimes (EOS): only produced tokens are charged.
            running.append((got, rng.randint(1, got.max_new_tokens)))
        clock.advance(0.01)
        still: list[tuple[QueuedRequest, int]] = []
        for req, left in running:
            queues.charge(req.tenant, REALTIME, 1)
            served[req.tenant] += 1
            if left > 1:
                still.append((req, left - 1))
        running = still
    return served


# -- fairness --------------------------------------------------------------------------------


def test_backlogged_tenants_with_weights_2_to_1_get_token_shares_2_to_1() -> None:
    """Two backlogged REALTIME tenants, weights 2:1, random lengths and early stops: token
    shares within 10 % of 2:1 and Jain's index on weight-normalised shares >= 0.95."""
    clock, queues, _ = make({"a": 2.0, "b": 1.0})
    served = simulate(queues, clock, {"a": 2.0, "b": 1.0}, rng=random.Random(7))
    ratio = served["a"] / served["b"]
    assert abs(ratio - 2.0) / 2.0 < 0.10, ratio
    assert jain([served["a"] / 2.0, served["b"] / 1.0]) >= 0.95


def test_fairness_is_on_tokens_not_requests() -> None:
    """A tenant sending requests 10x longer gets the same tokens, so ~10x fewer requests."""
    _, queues, _ = make()
    counts = {"short": 0, "long": 0}
    running: list[tuple[QueuedRequest, int]] = []
    for _ in range(3000):
        for t, n in (("short", 10), ("long", 100)):
            while queues.depth(REALTIME, t) < 4:
                queues.push(item(t, prompt=0, new=n))
        while len(running) < 2:
            got = queues.pop(always)
            assert got is not None
            counts[got.tenant] += 1
            running.append((got, got.max_new_tokens))
        still = []
        for req, left in running:
            queues.charge(req.tenant, REALTIME, 1)
            if left > 1:
                still.append((req, left - 1))
        running = still
    assert 8 <= counts["short"] / counts["long"] <= 12


def test_idle_tenant_banks_only_the_lift_credit() -> None:
    """VTC counter lift: a tenant that was idle while another was served 4000 tokens goes
    first on return (it is lifted to just below the other's counter, so it does not lose the
    tie to the older queue) but only for ``lift_credit`` worth of service, not until it has
    caught up."""
    _, queues, _ = make()
    for _ in range(50):
        queues.push(item("a"))
    for _ in range(40):
        got = queues.pop(always)
        assert got is not None
        queues.charge("a", REALTIME, 100)
    for _ in range(10):
        queues.push(item("b"))
    tenants = []
    for _ in range(8):
        got = queues.pop(always)
        assert got is not None
        queues.charge(got.tenant, REALTIME, 100)
        tenants.append(got.tenant)
    credit_pops = math.ceil(queues.config.lift_credit / 100)
    assert tenants[0] == "b"
    assert tenants[: credit_pops + 1].count("b") <= credit_pops + 1
    assert "a" in tenants[: credit_pops + 2]


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.sampled_from([1.0, 2.0, 3.0, 5.0]), min_size=2, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_property_backlogged_shares_converge_to_weights(weights: list[float], seed: int) -> None:
    """Whatever the weights and lengths, continuously backlogged tenants' weight-normalised
    token shares are nearly equal (Jain >= 0.95)."""
    names = {f"t{i}": w for i, w in enumerate(weights)}
    clock, queues, _ = make(names)
    served = simulate(queues, clock, names, steps=2500, rng=random.Random(seed))
    assert jain([served[t] / w for t, w in names.items()]) >= 0.95


# -- priority and aging ----------------------------------------------------------------------


def test_higher_class_goes_first() -> None:
    """Strict priority: REALTIME before BATCH before FINETUNE, whatever the arrival order."""
    _, queues, _ = make()
    f, b, r = item(cls=FINETUNE), item(cls=BATCH), item(cls=REALTIME)
    for x in (f, b, r):
        queues.push(x)
    assert [queues.pop(always) for _ in range(3)] == [r, b, f]


def test_aged_batch_item_overtakes_fresh_realtime() -> None:
    """A BATCH item that waited ``aging_s`` longer than the REALTIME head is served first."""
    clock, queues, _ = make(aging_s=10.0)
    old = item(cls=BATCH)
    queues.push(old)
    clock.advance(5.0)
    queues.push(item(cls=REALTIME))
    assert queues.pop(always) is not old  # 5 s < 10 s of extra wait: REALTIME first
    queues.push(item(cls=REALTIME))
    clock.advance(10.5)
    queues.push(item(cls=REALTIME))
    assert queues.pop(always) is not old  # the older REALTIME item (waited 10.5 s)
    assert queues.pop(always) is old  # BATCH waited 15.5 s, REALTIME head 0 s


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), aging=st.sampled_from([1.0, 5.0, 20.0]))
def test_property_no_admitted_request_starves(seed: int, aging: float) -> None:
    """REALTIME arrives faster than it is served (queue kept at its bound of 20): every BATCH
    and FINETUNE item is still served, within the aging bound plus the REALTIME backlog."""
    rng = random.Random(seed)
    clock, queues, _ = make(aging_s=aging, max_per_tenant=20)
    low = [item("x", rng.choice([BATCH, FINETUNE])) for _ in range(5)]
    for x in low:
        queues.push(x)
    served_at: dict[str, float] = {}
    for _ in range(100_000):
        while queues.depth(REALTIME, "rt") < 20:
            queues.push(item("rt", REALTIME))
        got = queues.pop(always)
        assert got is not None
        served_at[got.request_id] = clock()
        if all(x.request_id in served_at for x in low):
            break
        clock.advance(rng.uniform(0.05, 0.2))
    waits = [served_at[x.request_id] - x.enqueued_at for x in low]
    # Realtime head waits at most ~20 pops * 0.2 s = 4 s; two rank steps of aging on top.
    assert max(waits) <= 2 * aging + 4.0 + 5 * 0.2 * 6


def test_pop_skips_items_that_cannot_be_placed() -> None:
    """A model without room does not block requests for another model (same tenant too)."""
    _, queues, _ = make()
    blocked = item(model="busy")
    ok = item(model="free")
    queues.push(blocked)
    queues.push(ok)
    assert queues.pop(lambda r: r.model == "free") is ok
    assert queues.pop(lambda r: r.model == "free") is None
    assert len(queues) == 1


# -- bounds and cancel -----------------------------------------------------------------------


def test_queue_bounds_per_tenant_and_per_class() -> None:
    """Bounded per tenant and per class: QueueFull names the scope."""
    _, queues, _ = make(max_per_tenant=2, max_per_class=3)
    queues.push(item("a"))
    queues.push(item("a"))
    with pytest.raises(QueueFull) as err:
        queues.push(item("a"))
    assert err.value.scope == "tenant"
    queues.push(item("b"))
    with pytest.raises(QueueFull) as err:
        queues.push(item("c"))
    assert err.value.scope == "class"
    queues.push(item("c", BATCH))  # another class has its own bound


def test_cancel_removes_at_once_and_updates_costs() -> None:
    """Cancel (client gone) takes the item out of depth, cost and the pick order at once."""
    _, queues, _ = make()
    a, b = item("a", prompt=10, new=10), item("a", prompt=10, new=10)
    queues.push(a)
    queues.push(b)
    assert queues.queued_cost(REALTIME, "m") == 30.0
    assert queues.cancel(a.request_id) is a
    assert queues.cancel(a.request_id) is None
    assert queues.depth(REALTIME, "a") == 1
    assert queues.queued_cost(REALTIME, "m") == 15.0
    assert queues.waiting(REALTIME, "m") == {"a": 1}
    assert queues.pop(always) is b
    assert queues.waiting(REALTIME, "m") == {}


# -- admission -------------------------------------------------------------------------------


def test_empty_queue_with_room_admits_without_wait() -> None:
    """Nothing ahead and a node with room: admitted, predicted wait 0."""
    clock, _, admission = make()
    verdict = admission.decide(item(deadline=clock() + 0.01), rate=100.0, room_now=True)
    assert verdict.admitted and verdict.predicted_wait_s == 0.0


def test_request_that_cannot_start_before_deadline_is_refused_with_predicted_wait() -> None:
    """1,000 weighted tokens of the tenant's own queued ahead at 100 tokens/s is a 10 s wait:
    a 5 s deadline is refused now (OVERLOADED, retry after 10 s); a 20 s deadline is admitted.
    Another tenant's request waits only for its fair-share interleave."""
    clock, queues, admission = make()
    for _ in range(10):
        queues.push(item("me", prompt=0, new=100))
    other = admission.decide(item("other", deadline=clock() + 5), rate=100.0, room_now=False)
    assert other.admitted and other.predicted_wait_s == pytest.approx(0.15)
    short = admission.decide(item("me", deadline=clock() + 5), rate=100.0, room_now=False)
    assert not short.admitted and short.reason == OVERLOADED
    assert short.predicted_wait_s == pytest.approx(10.0, rel=0.05)
    assert short.retry_after(admission.config) == pytest.approx(10.0, rel=0.05)
    long = admission.decide(item("me", deadline=clock() + 20), rate=100.0, room_now=False)
    assert long.admitted


def test_wait_prediction_counts_higher_classes_and_fair_share() -> None:
    """Ahead of a BATCH request: all REALTIME work, its own queue, and the other tenants'
    fair-share interleave (capped by what they have queued)."""
    _, queues, admission = make({"me": 1.0, "big": 1.0})
    queues.push(item("rt", REALTIME, prompt=0, new=300))
    for _ in range(10):
        queues.push(item("big", BATCH, prompt=0, new=100))
    queues.push(item("me", BATCH, prompt=0, new=50))
    new = item("me", BATCH, prompt=0, new=50)
    # 300 realtime + own 50 + big's interleave min(1000, (50 + 50) * 1/1) = 100.
    assert admission.cost_ahead(new) == pytest.approx(450.0)
    assert admission.cost_ahead(item("rt2", REALTIME, prompt=0, new=1)) == pytest.approx(1.0)


def test_full_fleet_adds_the_next_slot_to_the_wait() -> None:
    """Empty queue but no room: the wait is about one average request at the total rate."""
    clock, _, admission = make()
    full = admission.decide(item(deadline=clock() + 60), 100.0, room_now=False, busy_cost=300)
    assert full.admitted and full.predicted_wait_s == pytest.approx(3.0)
    late = admission.decide(item(deadline=clock() + 1), 100.0, room_now=False, busy_cost=300)
    assert not late.admitted and late.reason == OVERLOADED


def test_no_capacity_is_its_own_reason() -> None:
    """No node can serve the model (rate 0) and no room: refused with NO_CAPACITY."""
    clock, _, admission = make()
    verdict = admission.decide(item(deadline=clock() + 60), rate=0.0, room_now=False)
    assert not verdict.admitted and verdict.reason == NO_CAPACITY
    assert verdict.retry_after(admission.config) == admission.config.max_retry_s


def test_request_that_would_start_in_time_but_finish_late_is_refused() -> None:
    """With a measured 0.1 s per token, a request waiting 10 s for 100 new tokens needs 20 s:
    a 15 s deadline is refused now even though it would start in time; 25 s is admitted; the
    same request queued is shed once its finish is predicted past the deadline."""
    clock, queues, admission = make()
    for _ in range(10):
        queues.push(item("me", prompt=0, new=100))
    late = admission.decide(
        item("me", new=100, deadline=clock() + 15), 100.0, room_now=False, token_s=0.1
    )
    assert not late.admitted and late.reason == OVERLOADED
    assert late.predicted_wait_s == pytest.approx(10.0, rel=0.05)
    assert admission.decide(item("me", new=100, deadline=clock() + 15), 100.0, False).admitted
    fits = admission.decide(
        item("me", new=100, deadline=clock() + 25), 100.0, room_now=False, token_s=0.1
    )
    assert fits.admitted
    queued = item("me", new=100, deadline=clock() + 15)
    queues.push(queued)
    assert admission.shed(lambda _m: 100.0) == []
    dropped = admission.shed(lambda _m: 100.0, lambda _m: 0.1)
    assert [d.item for d in dropped] == [queued]


def test_lower_class_is_predicted_with_what_higher_classes_leave() -> None:
    """REALTIME admitted at 80 weighted tokens/s out of 100 leaves BATCH 20/s: 100 tokens of
    its own queued wait 5 s, so a 4 s deadline is refused now (not admitted and shed later);
    with REALTIME using everything BATCH still counts on ``min_class_share`` (5 %)."""
    clock, queues, admission = make()
    queues.push(item("b", BATCH, prompt=0, new=100))
    for _ in range(10):  # 800 tokens of REALTIME over 10 s
        admission.record_admitted(item("rt", REALTIME, prompt=0, new=80))
        clock.advance(1.0)
    assert admission.class_rate("m", BATCH, 100.0) == pytest.approx(20.0, rel=0.15)
    assert admission.class_rate("m", REALTIME, 100.0) == 100.0
    short = admission.decide(item("b", BATCH, deadline=clock() + 4), 100.0, room_now=False)
    assert not short.admitted and short.predicted_wait_s >= 4.5
    for _ in range(20):
        admission.record_admitted(item("rt", REALTIME, prompt=0, new=200))
    assert admission.class_rate("m", BATCH, 100.0) == pytest.approx(5.0)


def test_wait_is_bounded_by_the_tenants_fair_share_while_others_are_active() -> None:
    """B (weight 1) with 100 tokens queued and A (weight 2) active but with nothing queued:
    the queue alone says B waits 1 s at 100/s, but A may come back at any moment and take
    two thirds, so B's wait is predicted at 100 / (100 / 3) = 3 s; once A has been quiet for
    ``active_window_s`` it is 1 s again."""
    clock, queues, admission = make({"A": 2.0, "B": 1.0})
    admission.touch(item("A"))
    queues.push(item("B", prompt=0, new=100))
    verdict = admission.decide(item("B", deadline=clock() + 60), 100.0, room_now=False)
    assert verdict.predicted_wait_s == pytest.approx(3.0)
    clock.advance(admission.config.active_window_s + 0.1)
    verdict = admission.decide(item("B", deadline=clock() + 60), 100.0, room_now=False)
    assert verdict.predicted_wait_s == pytest.approx(1.0)


def test_waiting_request_must_leave_the_deadline_margin_unused() -> None:
    """A predicted 10 s wait with an 10.5 s deadline would finish inside the last 10 % of the
    time left: refused. With 12 s left it fits."""
    clock, queues, admission = make()
    for _ in range(10):
        queues.push(item("me", prompt=0, new=100))
    assert not admission.decide(item("me", deadline=clock() + 10.5), 100.0, False).admitted
    assert admission.decide(item("me", deadline=clock() + 12), 100.0, False).admitted


def test_request_that_could_start_now_but_not_finish_in_time_is_refused() -> None:
    """Room and nothing ahead on busy nodes, but 100 tokens at a measured 0.2 s each need
    20 s: with 15 s left it is refused now (it would hit its deadline mid-stream); with 30 s
    it is admitted; on idle nodes it is admitted (the measurement is stale there)."""
    clock, _, admission = make()
    late = admission.decide(
        item(new=100, deadline=clock() + 15), 100.0, room_now=True, busy_cost=50, token_s=0.2
    )
    assert not late.admitted and late.reason == OVERLOADED
    assert late.predicted_wait_s == pytest.approx(0.5)
    fits = admission.decide(item(new=100, deadline=clock() + 30), 100.0, True, token_s=0.2)
    assert fits.admitted and fits.predicted_wait_s == 0.0
    idle = admission.decide(
        item(new=100, deadline=clock() + 15), 100.0, True, token_s=0.2, busy=False
    )
    assert idle.admitted  # on idle nodes a per-token time measured under load says nothing


def test_shrinking_capacity_sheds_lowest_class_first() -> None:
    """When the rate halves, the queue is re-predicted: FINETUNE and BATCH requests that can
    no longer start in time are shed; REALTIME ones ahead of them stay."""
    clock, queues, admission = make()
    realtime = [item("a", REALTIME, prompt=0, new=100, deadline=clock() + 30) for _ in range(5)]
    batch = [item("a", BATCH, prompt=0, new=100, deadline=clock() + 30) for _ in range(5)]
    tune = [item("a", FINETUNE, prompt=0, new=100, deadline=clock() + 30) for _ in range(5)]
    for x in (*tune, *batch, *realtime):
        queues.push(x)
    assert admission.shed(lambda _m: 100.0) == []  # 1,500 tokens at 100/s: all start by 14 s
    dropped = admission.shed(lambda _m: 40.0)  # starts at 0, 2.5, ... 35 s: 30 s deadline
    assert {d.item.workload_class for d in dropped} == {FINETUNE}
    assert len(dropped) == 2 and all(d.reason == OVERLOADED for d in dropped)
    dropped = admission.shed(lambda _m: 15.0)
    assert {d.item.workload_class for d in dropped} <= {BATCH, FINETUNE}
    assert all(x.request_id in queues for x in realtime)


def test_a_queued_request_is_shed_for_its_wait_not_for_a_slower_token_time() -> None:
    """Behind 10 s of queued work and admitted at 0.1 s a token (50 tokens: 5 s), a request
    with 20 s left stays queued when the measured token time swings to 0.5 s (25 s, past
    its deadline): shedding counts the decode time admission counted. A wait that grew past
    the deadline (the rate halved: 20 s) still sheds it."""
    clock, queues, admission = make()
    for _ in range(10):
        queues.push(item("a", REALTIME, prompt=0, new=100))
    late = item("b", REALTIME, prompt=0, new=50, deadline=clock() + 20)
    assert admission.decide(late, rate=100.0, room_now=False, token_s=0.1).admitted
    assert late.decode_s == pytest.approx(5.0)
    queues.push(late)
    assert admission.shed(lambda _m: 100.0, lambda _m: 0.5) == []
    assert [s.item for s in admission.shed(lambda _m: 50.0, lambda _m: 0.5)] == [late]


def test_model_with_no_node_sheds_after_grace() -> None:
    """With no capacity at all a queued request is kept for the grace period, then shed."""
    clock, queues, admission = make()
    x = item(deadline=clock() + 60)
    queues.push(x)
    assert admission.shed(lambda _m: 0.0) == []
    clock.advance(admission.config.no_capacity_grace_s)
    (dropped,) = admission.shed(lambda _m: 0.0)
    assert dropped.item is x and dropped.reason == NO_CAPACITY
    assert len(queues) == 0


def test_queue_is_deque_free_after_everything_leaves() -> None:
    """Popping everything leaves zero depth and zero queued cost."""
    _, queues, _ = make()
    for t in "abc":
        queues.push(item(t))
    drained = deque(queues.pop(always) for _ in range(3))
    assert None not in drained
    assert len(queues) == 0 and queues.queued_cost(REALTIME, "m") == 0.0


# -- two replicas ----------------------------------------------------------------------------


def two_replicas(split: dict[str, float], seed: int) -> dict[str, float]:
    """Two replicas' queues share one node of 8 slots: a freed slot goes to a replica at
    random (whichever notices first). Tenant t's requests reach replica 0 with probability
    split[t]. Returns generated tokens per tenant."""
    rng = random.Random(seed)
    clock = FakeClock()
    weights = {"a": 2.0, "b": 1.0}
    replicas = [FairQueues(clock, weights.__getitem__) for _ in range(2)]
    served = dict.fromkeys(weights, 0.0)
    running: list[tuple[QueuedRequest, int, FairQueues]] = []
    for _ in range(6000):
        for t in weights:
            for queues in replicas:
                share = split[t] if queues is replicas[0] else 1 - split[t]
                while share > 0 and queues.depth(REALTIME, t) < 4:
                    queues.push(item(t, prompt=0, new=rng.randint(5, 60)))
        while len(running) < 8:
            owner, other = rng.sample(replicas, 2)
            got = owner.pop(always)
            if got is None:
                owner, got = other, other.pop(always)
            assert got is not None
            running.append((got, got.max_new_tokens, owner))
        clock.advance(0.01)
        still = []
        for req, left, owner in running:
            owner.charge(req.tenant, REALTIME, 1)  # the replica that dispatched it charges it
            served[req.tenant] += 1
            if left > 1:
                still.append((req, left - 1, owner))
        running = still
    return served


def test_two_replicas_with_evenly_spread_traffic_keep_weighted_shares() -> None:
    """Each replica queues fairly on its own; when every tenant's traffic is spread evenly
    over the replicas (round-robin or random balancing), global shares stay near 2:1."""
    served = two_replicas({"a": 0.5, "b": 0.5}, seed=5)
    ratio = served["a"] / served["b"]
    assert abs(ratio - 2.0) / 2.0 < 0.10, ratio
    assert jain([served["a"] / 2.0, served["b"]]) >= 0.95


def test_two_replicas_with_tenants_pinned_apart_split_by_replica_not_weight() -> None:
    """The documented limit: with tenant a only on replica 0 and b only on replica 1, the
    replicas split the node between them and weights no longer apply (shares near 1:1);
    global quotas, not the queues, bound a tenant there."""
    served = two_replicas({"a": 1.0, "b": 0.0}, seed=5)
    assert 0.8 < served["a"] / served["b"] < 1.25


def test_lower_class_wait_must_fit_its_deadline_twice_over() -> None:
    """A 5 s predicted wait with 10 s left: a REALTIME request is admitted; a BATCH one must
    fit 10 s of wait into the 9 s usable, so it is refused at once, its retry delay the plain
    5 s prediction, rather than shed from the queue later."""
    clock, queues, admission = make()
    for _ in range(5):
        queues.push(item("me", BATCH, prompt=0, new=100))
    batch = admission.decide(item("me", BATCH, new=10, deadline=clock() + 10), 100.0, False)
    assert not batch.admitted and batch.reason == OVERLOADED
    assert batch.predicted_wait_s == pytest.approx(5.0, rel=0.05)
    assert admission.decide(item("me", BATCH, new=10, deadline=clock() + 30), 100.0, False).admitted
    for _ in range(5):
        queues.push(item("rt", REALTIME, prompt=0, new=100))
    realtime = admission.decide(item("rt", REALTIME, new=10, deadline=clock() + 10), 100.0, False)
    assert realtime.admitted and realtime.predicted_wait_s == pytest.approx(5.0, rel=0.05)


def test_realtime_request_past_its_queue_bound_is_refused_at_once() -> None:
    """With a 1.5 s REALTIME queue bound, a predicted 3 s wait is refused now (retry after
    3 s) even with 60 s left before the deadline; BATCH is held to its deadline alone."""
    clock, queues, _ = make()
    admission = Admission(queues, clock, lambda _t: 1.0, AdmissionConfig(realtime_max_wait_s=1.5))
    for _ in range(3):
        queues.push(item("me", REALTIME, prompt=0, new=100))
    late = admission.decide(item("me", REALTIME, new=10, deadline=clock() + 60), 100.0, False)
    assert not late.admitted and late.reason == OVERLOADED
    assert late.predicted_wait_s == pytest.approx(3.0, rel=0.05)
    assert "queue bound" in late.detail
    batch = admission.decide(item("me", BATCH, new=10, deadline=clock() + 60), 100.0, False)
    assert batch.admitted


def test_a_queued_realtime_request_whose_first_token_would_miss_its_ttft_target_is_refused() -> (
    None
):
    """TTFT target 2 s, no queue bound: a predicted 1 s wait admits a short prompt (0.2 s of
    prefill) and refuses a long one (1.5 s; retry after the wait); one whose prompt alone
    takes longer than the target is admitted (a retry would miss it too); BATCH has no target."""
    clock, queues, _ = make()
    config = AdmissionConfig(realtime_max_wait_s=0, ttft_targets={REALTIME: 2.0})
    admission = Admission(queues, clock, lambda _t: 1.0, config)
    queues.push(item("me", REALTIME, prompt=0, new=100))
    short = admission.decide(item("me", REALTIME, new=10), 100.0, False, prefill_s=0.2)
    assert short.admitted and short.predicted_wait_s == pytest.approx(1.0, rel=0.05)
    long = admission.decide(item("me", REALTIME, new=10), 100.0, False, prefill_s=1.5)
    assert not long.admitted and long.reason == OVERLOADED and not long.past_deadline
    assert long.predicted_wait_s == pytest.approx(1.0, rel=0.05)
    assert "2s realtime TTFT target" in long.detail
    hopeless = admission.decide(item("you", REALTIME, new=10), 100.0, False, prefill_s=2.5)
    assert hopeless.admitted
    assert admission.decide(item("me", BATCH, new=10), 100.0, False, prefill_s=5.0).admitted


def test_a_queued_realtime_embed_is_held_to_its_embed_target_not_the_ttft_target() -> None:
    """Embed target 0.5 s, TTFT target 2 s, no queue bound: behind a predicted 0.4 s wait an
    Embed whose calls take 0.05 s is admitted, one whose calls take 0.2 s is refused (retry
    after the wait; the detail names the embed target), a generation with that prefill is
    not, nor an Embed whose fastest call lately (0.6 s) misses the target alone, nor one that
    starts at once (the gate passes its average call as its call alone)."""
    clock, queues, _ = make()
    config = AdmissionConfig(
        realtime_max_wait_s=0, ttft_targets={REALTIME: 2.0}, embed_targets={REALTIME: 0.5}
    )
    admission = Admission(queues, clock, lambda _t: 1.0, config)
    queues.push(item("me", REALTIME, prompt=0, new=40))

    def embed() -> QueuedRequest:
        return dataclasses.replace(item("me", REALTIME, new=0), embed=True)

    quick = admission.decide(embed(), 100.0, False, prefill_s=0.05)
    assert quick.admitted and quick.predicted_wait_s == pytest.approx(0.4, rel=0.05)
    slow = admission.decide(embed(), 100.0, False, prefill_s=0.2)
    assert not slow.admitted and slow.reason == OVERLOADED and not slow.past_deadline
    assert slow.predicted_wait_s == pytest.approx(0.4, rel=0.05)
    assert "predicted answer in" in slow.detail and "0.5s realtime embed target" in slow.detail
    assert admission.decide(item("me", REALTIME, new=10), 100.0, False, prefill_s=0.2).admitted
    assert admission.decide(embed(), 100.0, False, prefill_s=0.9, idle_prefill_s=0.6).admitted
    _, idle, _ = make()
    at_once = Admission(idle, clock, lambda _t: 1.0, config)  # the gate passes its average
    assert at_once.decide(embed(), 100.0, True, prefill_s=0.9, idle_prefill_s=0.9).admitted


def test_realtime_first_tokens_later_than_predicted_pad_the_next_ttft_test() -> None:
    """Ten REALTIME requests admitted at once with 1.0 s predicted from dispatch to first
    token took 1.0-1.9 s: the 90th percentile of the overrun (0.8 s) pads the next
    prediction, so a prompt predicted at 1.5 s (2.3 s padded) is refused by the 2 s TTFT
    target, one at 1.1 s is admitted. Each counts once (later chunks do not), only requests
    held to a target count (BATCH has none here), and only predictions of half the target or
    more: a 0.2 s one that took 3 s is neither counted nor padded (the burst that follows an
    idle node is no evidence about the edge). The overruns age out after a minute."""
    clock, queues, _ = make()
    config = AdmissionConfig(realtime_max_wait_s=0, ttft_targets={REALTIME: 2.0})
    admission = Admission(queues, clock, lambda _t: 1.0, config)
    for overrun in [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
        done = item("rt", REALTIME, prompt=0, new=50)
        assert admission.decide(done, 100.0, True, prefill_s=1.0).admitted
        assert done.predicted_first_token_s == pytest.approx(1.0)
        admission.started(done)
        clock.advance(1.0 + overrun)
        admission.first_token(done)
        clock.advance(0.5)
        admission.first_token(done)  # told again: not counted again
        assert done.predicted_first_token_s is None
    batch = item("b", BATCH, prompt=0, new=50)
    assert admission.decide(batch, 100.0, True, prefill_s=1.0).admitted
    admission.started(batch)
    clock.advance(3.0)
    admission.first_token(batch)
    retried = item("rt", REALTIME, prompt=0, new=50)
    assert admission.decide(retried, 100.0, True, prefill_s=1.0).admitted
    admission.started(retried)
    clock.advance(3.0)
    admission.first_token(retried, retried=True)  # another node's after a failure: not counted
    small = item("rt", REALTIME, prompt=0, new=50)
    assert admission.decide(small, 100.0, True, prefill_s=0.2).admitted
    assert small.predicted_first_token_s is None
    admission.started(small)
    clock.advance(3.0)
    admission.first_token(small)
    assert admission.first_token_calibration.margin("m") == pytest.approx(0.8)
    late = admission.decide(item("rt", REALTIME, new=10), 100.0, True, prefill_s=1.5)
    assert not late.admitted and "predicted first token in 2.300s" in late.detail
    assert admission.decide(item("rt", REALTIME, new=10), 100.0, True, prefill_s=1.1).admitted
    assert admission.decide(item("rt", REALTIME, new=10), 100.0, True, prefill_s=0.99).admitted
    clock.advance(61.0)
    assert admission.decide(item("rt", REALTIME, new=10), 100.0, True, prefill_s=1.5).admitted


def test_admitted_batch_request_is_promoted_ahead_of_realtime_near_its_latest_start() -> None:
    """Admission stamps a BATCH request with the start it promises: 20 s left, 10 % margin,
    100 tokens at 0.05 s leave 18 - 5 = 13 s of slack, half of it promised (the wait factor
    2), so it starts within 6.5 s. REALTIME work keeps arriving ahead of it; one second before
    that start it is served first anyway, and a REALTIME request is not stamped at all."""
    clock, queues, admission = make()
    batch = item("b", BATCH, new=100, deadline=clock() + 20)
    assert admission.decide(batch, rate=100.0, room_now=False, token_s=0.05).admitted
    assert batch.start_by == pytest.approx(clock() + 6.5)
    queues.push(batch)
    realtime = item("rt", REALTIME, deadline=clock() + 20)
    assert admission.decide(realtime, rate=100.0, room_now=False, token_s=0.05).admitted
    assert realtime.start_by == math.inf
    queues.push(realtime)
    assert queues.promoted() == []
    clock.advance(5.4)
    assert queues.promoted() == []
    assert queues.pop(always) is realtime
    queues.push(item("rt", REALTIME))
    clock.advance(0.2)  # 0.9 s before its latest start
    assert queues.promoted() == [batch]
    assert queues.pop(always) is batch
    assert queues.promoted() == []


def test_promoted_items_go_earliest_start_first_and_wait_for_a_placeable_slot() -> None:
    """Among promoted items the earliest latest-start goes first, whatever their order of
    arrival or tenants' counters; one that cannot be placed does not block the next."""
    clock, queues, _ = make()
    late = item("x", BATCH, model="m", start_by=clock() + 0.8)
    early = item("y", FINETUNE, model="other", start_by=clock() + 0.3)
    queues.push(late)
    queues.push(early)
    queues.push(item("rt", REALTIME))
    assert queues.promoted() == [early, late]
    assert queues.pop(lambda i: i.model == "m") is late
    assert queues.pop(always) is early


def test_a_request_behind_a_promoted_one_counts_its_wait_as_that_hold() -> None:
    """A promoted BATCH request that cannot be placed holds its model: a REALTIME request for
    it is not looked at, and its time counts as that hold; the promoted one keeps its own."""
    clock, queues, _ = make()
    promoted = item("x", BATCH, model="m", start_by=clock() + 0.5)
    queues.push(promoted)
    rt = item("rt", REALTIME, model="m")
    queues.push(rt)
    tried: list[QueuedRequest] = []

    def no_seat(i: QueuedRequest) -> bool:
        tried.append(i)
        i.hold("slots", clock())
        return False

    assert queues.pop(no_seat) is None
    assert tried == [promoted]
    clock.advance(2.0)
    assert queues.pop(lambda i: i is promoted) is promoted
    rt.hold("", clock())
    promoted.hold("", clock())
    assert rt.held_s == pytest.approx({"promoted_lower_class": 2.0})
    assert promoted.held_s == pytest.approx({"slots": 2.0})  # its own hold, not behind itself


def test_realtime_wait_counts_lower_class_work_promoted_while_it_waits() -> None:
    """A REALTIME request predicted to wait 2 s behind REALTIME work also waits for BATCH work
    whose promised start falls in that time (it will be served first), not for BATCH work
    promised much later."""
    clock, queues, admission = make()
    for _ in range(2):
        queues.push(item("rt", REALTIME, prompt=0, new=100))
    soon = item("b", BATCH, prompt=0, new=100, start_by=clock() + 1.5)
    later = item("b", BATCH, prompt=0, new=100, start_by=clock() + 30)
    queues.push(soon)
    queues.push(later)
    verdict = admission.decide(item("rt", REALTIME, prompt=0), rate=100.0, room_now=False)
    assert verdict.admitted and verdict.predicted_wait_s == pytest.approx(3.0)


def test_realtime_wait_counts_promises_that_fall_due_in_the_longer_wait_too() -> None:
    """2 s behind REALTIME work, plus a BATCH request promised at 1.5 s: 3 s, within which (1 s
    lead) one promised at 3.5 s falls due as well: 4 s. One promised at 30 s never counts."""
    clock, queues, admission = make()
    for _ in range(2):
        queues.push(item("rt", REALTIME, prompt=0, new=100))
    for start in (1.5, 3.5, 30.0):
        queues.push(item("b", BATCH, prompt=0, new=100, start_by=clock() + start))
    verdict = admission.decide(item("rt", REALTIME, prompt=0), rate=100.0, room_now=False)
    assert verdict.admitted and verdict.predicted_wait_s == pytest.approx(4.0)


def test_realtime_waits_are_padded_by_how_much_longer_recent_ones_turned_out() -> None:
    """Ten REALTIME requests predicted 0.5 s each waited 0.5-1.4 s: the 90th percentile of
    the overrun (0.8 s) pads the next prediction, so a 1 s wait (1.8 s padded) is refused by
    the 1.5 s REALTIME queue bound. The overruns count against the uncalibrated prediction
    (no feedback), only REALTIME's. After a minute the newest eight still pad (the next
    overload's first seconds) until eight recent ones replace them."""
    clock, queues, _ = make()
    admission = Admission(queues, clock, lambda _: 1.0, AdmissionConfig(realtime_max_wait_s=1.5))
    for overrun in [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
        done = item("rt", REALTIME, prompt=0, new=50)
        done.enqueued_at, done.predicted_wait_s = clock(), 0.5
        clock.advance(0.5 + overrun)
        admission.started(done)
    admission.started(item("b", BATCH, prompt=0, new=50, start_by=clock()))  # not counted
    assert admission.calibration.margin("m") == pytest.approx(0.8)
    queues.push(item("rt", REALTIME, prompt=0, new=100))
    probe = item("rt", REALTIME, prompt=0, new=0)
    verdict = admission.decide(probe, rate=100.0, room_now=False)
    assert not verdict.admitted and verdict.predicted_wait_s == pytest.approx(1.8)
    assert probe.predicted_wait_s == pytest.approx(1.0)
    clock.advance(61.0)
    assert admission.calibration.margin("m") == pytest.approx(0.9)  # the newest 8: 0.2-0.9
    assert not admission.decide(item("rt", REALTIME, prompt=0, new=0), 100.0, False).admitted
    for n in range(1, 9):  # recent ones on time: the old pad holds until there are eight
        done = item("rt", REALTIME, prompt=0, new=50)
        done.enqueued_at, done.predicted_wait_s = clock(), 0.5
        clock.advance(0.5)
        admission.started(done)
        assert admission.calibration.margin("m") == (0.0 if n == 8 else pytest.approx(0.9))
    assert admission.decide(item("rt", REALTIME, prompt=0, new=0), 100.0, False).admitted


def test_a_stale_wait_pad_that_refuses_every_queued_realtime_request_ends() -> None:
    """A pad over the queue bound refuses every REALTIME request that would queue, so no new
    sample replaces it: it stands for the next overload's first seconds only up to
    ``STALE_WAIT_S`` after its samples were taken, then queued REALTIME is admitted again."""
    clock, queues, _ = make()
    admission = Admission(queues, clock, lambda _: 1.0, AdmissionConfig(realtime_max_wait_s=1.5))
    for _ in range(8):
        done = item("rt", REALTIME, prompt=0, new=50)
        done.enqueued_at, done.predicted_wait_s = clock(), 0.1
        clock.advance(2.1)
        admission.started(done)
    queues.push(item("rt", REALTIME, prompt=0, new=10))
    clock.advance(61.0)
    assert admission.calibration.margin("m") == pytest.approx(2.0)
    assert not admission.decide(item("rt", REALTIME, prompt=0, new=0), 100.0, False).admitted
    clock.advance(STALE_WAIT_S - 61.0 + 0.1)  # the newest sample is past the bound
    assert admission.calibration.margin("m") == 0.0
    assert admission.decide(item("rt", REALTIME, prompt=0, new=0), 100.0, False).admitted


def test_realtime_with_room_waits_when_promoted_lower_class_work_holds_the_model() -> None:
    """A node has room, but a BATCH request promoted now waits (it holds the model until it
    starts): a REALTIME request is not predicted to start at once; it waits for a running
    request to end (the average cost, 50 tokens) and the promoted work (100), 1.5 s at 100
    tokens/s, and with no promoted work it starts at once."""
    clock, queues, admission = make()
    assert admission.decide(item("rt", REALTIME, prompt=0), 100.0, True).predicted_wait_s == 0
    queues.push(item("b", BATCH, prompt=0, new=100, start_by=clock() + 0.1))
    verdict = admission.decide(item("rt", REALTIME, prompt=0), 100.0, True, busy_cost=50.0)
    assert verdict.admitted and verdict.predicted_wait_s == pytest.approx(1.5)


def test_shed_walks_promoted_items_first() -> None:
    """Capacity halves: a promoted BATCH request (it is served next) keeps its place, and
    the REALTIME request behind it, which no longer fits, is the one shed."""
    clock, queues, admission = make()
    batch = item("b", BATCH, prompt=0, new=100, deadline=clock() + 3, start_by=clock() + 0.5)
    realtime = item("rt", REALTIME, prompt=0, new=100, deadline=clock() + 1.5)
    queues.push(batch)
    queues.push(realtime)
    dropped = admission.shed(lambda _m: 50.0)
    assert [s.item for s in dropped] == [realtime]
    assert batch.request_id in queues


def test_promoted_item_without_room_holds_its_model() -> None:
    """A promoted BATCH request that cannot be placed yet (lower classes leave headroom) keeps
    the REALTIME requests for its model from taking the slots it waits for; requests for
    another model go on."""
    clock, queues, _ = make()
    batch = item("b", BATCH, model="m", start_by=clock() + 0.5)
    queues.push(batch)
    realtime = item("rt", REALTIME, model="m")
    elsewhere = item("rt", REALTIME, model="other")
    queues.push(realtime)
    queues.push(elsewhere)
    assert queues.pop(lambda i: i.workload_class == REALTIME) is elsewhere
    assert queues.pop(lambda i: i.workload_class == REALTIME) is None
    assert queues.pop(always) is batch
    assert queues.pop(always) is realtime


def test_a_promoted_item_holds_its_model_for_promoted_hold_s_at_most() -> None:
    """A promoted BATCH request that cannot start (say REALTIME's batch limit keeps it out)
    holds its model for ``promoted_hold_s`` (1 s): until then a REALTIME request waits behind
    it and admission counts it as promoted work; after, the REALTIME request may start, the
    BATCH one counts no more, and it still goes first once it can start (before the REALTIME
    request queued behind it). A second promoted request stuck behind the first counts that
    time against its own hold: the model is not held a second more after the first's ends."""
    clock, queues, _ = make(promoted_hold_s=1.0)
    batch = item("b", BATCH, prompt=0, new=100, start_by=clock() + 0.5)
    behind = item("c", BATCH, prompt=0, new=50, start_by=clock() + 0.6)
    queues.push(batch)
    queues.push(behind)
    first, second = item("rt", REALTIME), item("rt", REALTIME)
    queues.push(first)
    queues.push(second)
    realtime = lambda i: i.workload_class == REALTIME  # noqa: E731
    assert queues.pop(realtime) is None
    assert queues.promised_cost("m", clock()) == 150
    clock.advance(0.9)
    assert queues.pop(realtime) is None
    clock.advance(0.1)
    assert queues.promised_cost("m", clock()) == 0  # what admission counts as promoted
    assert queues.pop(realtime) is first
    assert queues.pop(always) is batch
    assert queues.pop(always) is behind
    assert queues.pop(always) is second


def test_shed_keeps_a_lower_class_request_its_promotion_will_serve() -> None:
    """10 s of REALTIME work is queued ahead of a BATCH request with 4 s to its deadline, but
    it is promoted in 1 s (start_by 2 s away, 1 s lead) and then goes first: not shed.
    Without the promise it would be."""
    clock, queues, admission = make()
    for _ in range(10):
        queues.push(item("rt", REALTIME, prompt=0, new=100, deadline=clock() + 60))
    promised = item("b", BATCH, prompt=0, new=10, deadline=clock() + 4, start_by=clock() + 2)
    unpromised = item("b", BATCH, prompt=0, new=10, deadline=clock() + 4)
    queues.push(promised)
    queues.push(unpromised)
    dropped = admission.shed(lambda _m: 100.0)
    assert [s.item for s in dropped] == [unpromised]


def test_the_node_is_told_what_the_ttft_target_leaves_a_first_token() -> None:
    """REALTIME (2 s target) queued 0.5 s leaves 1.5 s for its first token (the node's
    request carries it, for vLLM's queue order); BATCH (no target) none, nor a REALTIME
    prompt predicted near its target (its first token calibrates the next predictions: a
    deliberate delay there would pad them all), nor a retry, nor any while the target
    refused a request lately."""
    clock, queues, _ = make()
    config = AdmissionConfig(
        realtime_max_wait_s=0, ttft_targets={REALTIME: 2.0}, first_token_budgets=True
    )
    admission = Admission(queues, clock, lambda _t: 1.0, config)
    off = Admission(queues, clock, lambda _t: 1.0, AdmissionConfig(ttft_targets={REALTIME: 2.0}))
    rt, batch = item("rt", REALTIME, prompt=0, new=5), item("b", BATCH, prompt=0, new=5)
    near = item("rt", REALTIME, prompt=0, new=5)
    assert admission.decide(rt, 100.0, True, prefill_s=0.2).admitted
    assert admission.decide(near, 100.0, True, prefill_s=1.2).admitted
    for it in (rt, batch, near):
        it.enqueued_at = clock()
    clock.advance(0.5)
    for it in (rt, batch, near):
        admission.started(it)
    clock.advance(3.0)  # later calls read the dispatch time
    assert admission.first_token_budgets.budget(rt) == pytest.approx(1.5)
    assert off.first_token_budgets.budget(rt) == 0.0, "off by default"
    assert admission.first_token_budgets.budget(batch) == 0.0
    assert admission.first_token_budgets.budget(near) == 0.0
    clock.advance(1.0)
    late = item("rt", REALTIME, prompt=0, new=5)
    assert not admission.decide(late, 100.0, True, prefill_s=2.5, idle_prefill_s=0.1).admitted
    assert admission.first_token_budgets.budget(rt) == 0.0, "refused for the target: no slack"
    clock.advance(TTFT_PRESSURE_HOLD_S)
    assert admission.first_token_budgets.budget(rt) == pytest.approx(1.5)
    forward = node_pb2.NodeGenerateRequest(first_token_budget_s=1.5)
    assert _keyed(forward).first_token_budget_s == 1.5, "the first attempt carries it"
    assert _keyed(forward).first_token_budget_s == 0.0, "a retry does not"


def test_a_queued_request_counts_its_time_per_hold_that_kept_it() -> None:
    """Each dispatch pass notes what held the request; the time until the next pass counts
    for that hold, time before the first look counts as ``behind``, and leaving the queue
    closes the count."""
    r = item()
    r.enqueued_at = 10.0
    r.hold("slots", 10.5)  # first looked at half a second in
    r.hold("slots", 11.0)
    r.hold("prefill", 12.0)
    r.hold("", 12.25)  # dispatched
    assert r.held_s == pytest.approx({"behind": 0.5, "slots": 1.5, "prefill": 0.25})
    r.hold("", 13.0)  # nothing held it since: nothing more counted
    assert sum(r.held_s.values()) == pytest.approx(2.25)
