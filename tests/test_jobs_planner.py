"""The jobs planner, pure: order across jobs and tenants, the line window, feasibility."""

from __future__ import annotations

from scheduler.jobs.planner import Backlog, LineWindow, Runnable, order, plan


def test_earliest_deadline_first_and_fair_across_tenants() -> None:
    """A tenant under its weighted share of the lines in flight goes first; within each
    group, the earliest deadline; a tenant over its share still gets lines after."""
    jobs = [Runnable("a1", "a", 100), Runnable("a2", "a", 50), Runnable("b1", "b", 200)]
    assert [j.job_id for j in order(jobs, {}, {"a": 1, "b": 1}, 10)] == ["a2", "a1", "b1"]
    busy_a = order(jobs, {"a": 5}, {"a": 1, "b": 1}, 10)
    assert [j.job_id for j in busy_a] == ["b1", "a2", "a1"]


def test_the_window_starts_slow_then_grows_additively_and_halves_once_per_pause() -> None:
    """One more line per admitted line until the first refusal (doubling per round), then
    1/window per line; a burst of refusals in one pause halves once; no new line while
    paused."""
    w = LineWindow(initial=4, maximum=64)
    for _ in range(12):
        w.admitted()
    assert w.size == 16
    w.refused(now=10.0, retry_after_s=1.0)
    w.refused(now=10.1, retry_after_s=1.0)
    assert w.size == 8 and w.room(10.5, 0) == 0 and w.room(11.2, 3) == 5
    w.admitted()
    assert 8 < w.size < 8.2


def test_a_job_is_refused_when_it_or_a_job_on_time_would_be_late() -> None:
    """EDF at the rate: a job that fits is accepted with its completion; one that would push
    an on-time job past its deadline is refused with the overshoot as its retry hint."""
    queued = [Backlog("big", deadline_ms=100_000, tokens=900)]
    fits = plan(queued, Backlog("new", deadline_ms=200_000, tokens=50), rate=10, now_ms=0)
    assert fits.feasible and fits.predicted_ms == 95_000
    late = plan(queued, Backlog("urgent", deadline_ms=20_000, tokens=150), rate=10, now_ms=0)
    assert not late.feasible and late.late == ("big",)
    assert late.retry_after_s == 5.0
