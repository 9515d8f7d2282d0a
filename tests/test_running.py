"""This replica's running requests (:mod:`scheduler.running`): when the ones a queued request
waits for are predicted to end, and the pace a lower class gets from dispatch to end."""

from __future__ import annotations

import pytest

from scheduler.queues import QueuedRequest
from scheduler.running import RunningBook
from scheduler.shares import DemandMeter
from sluice.contract import WorkloadClass

RT, BATCH = WorkloadClass.REALTIME, WorkloadClass.BATCH


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def request(rid: str, cls: WorkloadClass, new_tokens: int, model: str = "m") -> QueuedRequest:
    return QueuedRequest(rid, "t", cls, model, 10, new_tokens, deadline=1e9)


def test_a_burst_that_just_started_is_waited_for_one_end_per_request_queued_before() -> None:
    """Three REALTIME requests of 96, 64 and 32 tokens just started: at 0.1 s a token the
    first slot frees in 3.2 s, the second in 6.4 s; BATCH running there is preempted by
    REALTIME and not waited for, but a BATCH request waits for any end."""
    clock = Clock()
    book = RunningBook(clock, lambda item: float(item.max_new_tokens))
    for rid, n in (("a", 96), ("b", 64), ("c", 32)):
        book.started(request(rid, RT, n))
    book.started(request("x", BATCH, 8))
    book.started(request("other-model", RT, 4, model="n"))
    assert book.end_wait("m", RT, 0, 0.1) == pytest.approx(3.2)
    assert book.end_wait("m", RT, 1, 0.1) == pytest.approx(6.4)
    assert book.end_wait("m", RT, 5, 0.1) == pytest.approx(3.2)  # more queued than running
    assert book.end_wait("m", BATCH, 0, 0.1) == pytest.approx(0.8)
    assert book.end_wait("m", RT, 0, 0.0) == 0.0  # no time per token measured yet
    book.streamed(request("c", RT, 32), 30)  # two tokens left
    assert book.end_wait("m", RT, 0, 0.1) == pytest.approx(0.2)
    book.ended(request("c", RT, 32), 32)
    assert book.end_wait("m", RT, 0, 0.1) == pytest.approx(6.4)
    assert len(book) == 4


def test_ends_follow_what_the_tenant_s_requests_lately_used() -> None:
    """A tenant whose requests stop at a quarter of ``max_new_tokens`` is expected to end a
    quarter of the way (the demand meter's used fraction)."""
    clock = Clock()
    demand = DemandMeter(clock)
    done = request("done", RT, 100)
    for _ in range(40):
        demand.finished(done, 25)
    book = RunningBook(clock, demand.expected_tokens)
    book.started(request("a", RT, 100))
    assert book.end_wait("m", RT, 0, 0.1) == pytest.approx(2.5, rel=0.01)


def test_a_lower_class_pace_is_learned_from_dispatch_to_end_of_its_finished_streams() -> None:
    clock = Clock()
    book = RunningBook(clock, lambda item: float(item.max_new_tokens))
    assert book.pace("m", BATCH) == 0.0
    book.started(request("b1", BATCH, 50))
    clock.now += 20.0  # preempted and slow: 0.4 s a token from dispatch to end
    book.ended(request("b1", BATCH, 50), 50)
    assert book.pace("m", BATCH) == pytest.approx(0.4)
    book.started(request("b2", BATCH, 50))
    clock.now += 5.0
    book.ended(request("b2", BATCH, 50), 50)  # 0.1 s a token: averaged in
    assert book.pace("m", BATCH) == pytest.approx(0.4 + 0.2 * (0.1 - 0.4))
    book.started(request("b3", BATCH, 50))
    book.ended(request("b3", BATCH, 50), None)  # failed or cancelled: says nothing
    book.started(request("r", RT, 50))
    clock.now += 50.0
    book.ended(request("r", RT, 50), 50)
    assert book.pace("m", RT) == 0.0  # REALTIME: the nodes' time per token describes it
    assert book.pace("m", BATCH) == pytest.approx(0.34)
    assert len(book) == 0
