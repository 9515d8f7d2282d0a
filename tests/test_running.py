"""This replica's running requests (:mod:`scheduler.running`): when a slot is left for a queued
request, and the pace a lower class gets from first token to end."""

from __future__ import annotations

import pytest

from scheduler.node_handle import POOL_FOR_CLASS
from scheduler.queues import QueuedRequest
from scheduler.running import PACE_STALE_S, RunningBook
from scheduler.shares import DemandMeter
from sluice.contract import WorkloadClass

RT, BATCH, FT = WorkloadClass.REALTIME, WorkloadClass.BATCH, WorkloadClass.FINETUNE


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(
    rid: str, cls: WorkloadClass, new_tokens: int, model: str = "m", tenant: str = "t"
) -> QueuedRequest:
    return QueuedRequest(rid, tenant, cls, model, 10, new_tokens, deadline=1e9)


def book(clock: Clock) -> RunningBook:
    return RunningBook(clock, lambda item: float(item.max_new_tokens), POOL_FOR_CLASS)


def test_a_burst_that_just_started_is_waited_for_until_a_slot_is_left() -> None:
    """Three REALTIME requests of 96, 64 and 32 tokens just started: at 0.1 s a token the
    first slot frees in 3.2 s; one queued before of 8 tokens takes it and frees it again at
    4.0 s, before the 64-token one ends; a longer one queued before pushes it to the next
    end, 6.4 s. BATCH running there is preempted by REALTIME and not waited for, but a
    BATCH request waits for any end. Another model's and another pool's runs do not count."""
    clock = Clock()
    running = book(clock)
    for rid, n in (("a", 96), ("b", 64), ("c", 32)):
        running.started(request(rid, RT, n))
    running.started(request("x", BATCH, 8))
    running.started(request("other-model", RT, 4, model="n"))
    assert running.end_wait("m", RT, [], 0.1) == pytest.approx(3.2)
    assert running.end_wait("m", RT, [request("q", RT, 8)], 0.1) == pytest.approx(4.0)
    assert running.end_wait("m", RT, [request("q", RT, 500)], 0.1) == pytest.approx(6.4)
    waits = [running.end_wait("m", RT, [request("q", RT, 8)] * n, 0.1) for n in range(6)]
    assert waits == sorted(waits)  # further back never waits less
    assert running.end_wait("m", BATCH, [], 0.1) == pytest.approx(0.8)
    assert running.end_wait("m", FT, [], 0.1) == 0.0  # the finetune pool's own nodes
    assert running.end_wait("m", RT, [], 0.0) == 0.0  # no time per token measured yet
    running.streamed(request("c", RT, 32), 30)  # two tokens left
    assert running.end_wait("m", RT, [], 0.1) == pytest.approx(0.2)
    running.ended(request("c", RT, 32), 32)
    assert running.end_wait("m", RT, [], 0.1) == pytest.approx(6.4)
    assert len(running) == 4


def test_ends_follow_what_the_tenant_s_requests_lately_used() -> None:
    """A tenant whose requests stop at a quarter of ``max_new_tokens`` is expected to end a
    quarter of the way; a tenant with none finished yet, like the others of its class."""
    clock = Clock()
    demand = DemandMeter(clock)
    done = request("done", RT, 100)
    for _ in range(40):
        demand.finished(done, 25)
    running = RunningBook(clock, demand.expected_tokens, POOL_FOR_CLASS)
    running.started(request("a", RT, 100))
    assert running.end_wait("m", RT, [], 0.1) == pytest.approx(2.5, rel=0.01)
    assert demand.expected_tokens(request("n", RT, 100, tenant="new")) == pytest.approx(
        25, rel=0.01
    )
    assert demand.expected_tokens(request("n", BATCH, 100, tenant="new")) == 100


def test_a_run_never_told_ended_is_dropped_after_its_deadline() -> None:
    clock = Clock()
    running = book(clock)
    running.started(QueuedRequest("lost", "t", RT, "m", 10, 50, deadline=110.0))
    assert running.end_wait("m", RT, [], 0.1) == pytest.approx(5.0)
    clock.now = 200.0
    assert running.end_wait("m", RT, [], 0.1) == 0.0 and len(running) == 0


def test_a_lower_class_pace_is_learned_from_first_token_to_end_of_its_finished_streams() -> None:
    """Each long-enough BATCH stream's time per token after its first is averaged in;
    short, failed and REALTIME streams say nothing; the pace counts at most 3x the nodes'
    time per token, and is forgotten once no stream updated it for a while."""
    clock = Clock()
    running = book(clock)
    assert running.pace("m", BATCH, 0.1) == 0.0

    def stream(rid: str, cls: WorkloadClass, tokens: int, seconds: float, ran: bool) -> None:
        item = request(rid, cls, tokens)
        running.started(item)
        clock.now += 4.0  # a long wait for the first token: not part of the pace
        running.streamed(item, 1)
        clock.now += seconds
        running.streamed(item, tokens - 1)
        running.ended(item, tokens if ran else None)

    stream("b1", BATCH, 51, 20.0, ran=True)  # preempted and slow: 0.4 s a token
    assert running.pace("m", BATCH, 0.2) == pytest.approx(0.4)
    assert running.pace("m", BATCH, 0.1) == pytest.approx(0.3)  # 3x the nodes' at most
    stream("b2", BATCH, 51, 5.0, ran=True)  # 0.1 s a token
    assert running.pace("m", BATCH, 1.0) == pytest.approx(0.4 + 0.2 * (0.1 - 0.4))
    stream("b3", BATCH, 51, 50.0, ran=False)  # cancelled: says nothing
    stream("b4", BATCH, 4, 50.0, ran=True)  # too short to say
    stream("r", RT, 51, 50.0, ran=True)
    assert running.pace("m", RT, 1.0) == 0.0  # REALTIME: the nodes' time per token
    clock.now += PACE_STALE_S
    assert running.pace("m", BATCH, 1.0) == 0.0
    stream("b5", BATCH, 51, 10.0, ran=True)  # a fresh start, not averaged with the stale
    assert running.pace("m", BATCH, 1.0) == pytest.approx(0.2)
    assert len(running) == 0


def test_a_lower_class_decode_is_priced_at_no_less_than_a_full_node_s_step() -> None:
    """BATCH admitted on a half-empty node at its 0.05 s per token gets a full node's step
    once REALTIME fills it: its decode counts the slowest of the nodes' time per token, its
    class's pace and the full step; without a full step known, the first two."""
    clock = Clock()
    full = {"m": 0.16}
    running = RunningBook(
        clock, lambda item: float(item.max_new_tokens), POOL_FOR_CLASS, lambda m: full.get(m, 0.0)
    )
    assert running.lower_token_s("m", BATCH, 0.05) == pytest.approx(0.16)
    assert running.lower_token_s("m", BATCH, 0.2) == pytest.approx(0.2)
    assert running.lower_token_s("other", BATCH, 0.05) == pytest.approx(0.05)
    item = request("b", BATCH, 51)
    running.started(item)
    running.streamed(item, 1)
    clock.now += 15.0  # 0.3 s a token
    running.streamed(item, 50)
    running.ended(item, 51)
    assert running.lower_token_s("m", BATCH, 0.1) == pytest.approx(0.3)
    assert book(clock).lower_token_s("m", BATCH, 0.05) == pytest.approx(0.05)
