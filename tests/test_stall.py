"""The stall detector's core: which streams it ends, on a fake clock."""

from __future__ import annotations

from scheduler.stall import StallPolicy, StallWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_silent_node_ends_its_streams_within_the_ceiling() -> None:
    """No chunk and no load report for longer than the bound: the stream is cancelled and
    marked stalled; it is swept once."""
    clock = Clock()
    watch = StallWatch(clock, StallPolicy(floor_s=1.5, ceiling_s=3.0))
    cancelled: list[str] = []
    report_at = clock.now
    stream = watch.watch("n1", lambda: report_at, lambda: cancelled.append("n1"))
    clock.now += 2.9
    assert watch.sweep() == []
    clock.now += 0.2
    assert watch.sweep() == [stream]
    assert stream.stalled and cancelled == ["n1"]
    assert watch.sweep() == []


def test_a_live_node_keeps_a_quiet_stream() -> None:
    """A stream with no chunk for a long time is left alone while its node still reports (a
    long prefill on a busy node is not a stall)."""
    clock = Clock()
    watch = StallWatch(clock)
    stream = watch.watch("n1", clock, lambda: None)
    clock.now += 60
    assert watch.sweep() == []
    assert not stream.stalled


def test_the_bound_follows_the_streams_inter_token_time() -> None:
    """A stream at 10 ms per token stalls after the floor (1.5 s), one at 120 ms after 20
    inter-token times (2.4 s), never later than the ceiling."""
    policy = StallPolicy(floor_s=1.5, ceiling_s=3.0, itl_factor=20)
    assert policy.bound_s(0.01) == 1.5
    assert abs(policy.bound_s(0.12) - 2.4) < 1e-9
    assert policy.bound_s(1.0) == 3.0
    assert policy.bound_s(None) == 3.0
    clock = Clock()
    watch = StallWatch(clock, policy)
    silent_since = clock.now
    stream = watch.watch("n1", lambda: silent_since, lambda: None)
    for _ in range(11):
        stream.chunk(clock.now, 1)
        clock.now += 0.01
    clock.now += 1.4
    assert watch.sweep() == []
    clock.now += 0.2
    assert watch.sweep() == [stream]


def test_an_unwatched_stream_is_never_cancelled() -> None:
    clock = Clock()
    watch = StallWatch(clock)
    stream = watch.watch("n1", lambda: 0.0, lambda: None)
    watch.unwatch(stream)
    clock.now += 100
    assert watch.sweep() == []
