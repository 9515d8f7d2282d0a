"""The jobs planner, pure: order across jobs and tenants, the line window, feasibility, the
measured rate predictions use."""

from __future__ import annotations

import pytest

from scheduler.jobs.outcomes import JobRate, Saturation
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


def test_job_rate_samples_only_saturated_intervals_and_keeps_what_it_measured() -> None:
    """A one-line job or a tail (not saturated) moves nothing; saturated intervals set the
    rate, which stands for its memory, then gives way to the capacity estimate."""
    rate = JobRate(half_life_s=10.0, memory_s=600.0)
    rate.observe(0.0, 0.0, saturated=False)
    rate.observe(340.0, 1.0, saturated=False)  # one line alone: its own speed
    assert rate.rate(500.0, 1.0) == 500.0
    for t in range(2, 12):
        rate.observe(340.0 + 1000.0 * (t - 1), float(t), saturated=True)
    assert rate.rate(500.0, 11.0) == pytest.approx(1000.0)
    rate.observe(10_340.0, 300.0, saturated=False)  # five minutes without a saturated job
    assert rate.rate(500.0, 300.0) == pytest.approx(1000.0)
    assert rate.rate(500.0, 700.0) == 500.0  # too old: the capacity estimate again


def test_saturation_needs_most_ticks_full() -> None:
    """An interval counts as saturated when at least 80 % of its ticks were full."""
    sat = Saturation(share=0.8)
    assert not sat.take()  # no ticks: nothing known
    for full in [True] * 8 + [False] * 2:
        sat.tick(full)
    assert sat.take()
    for full in [True] * 7 + [False] * 3:
        sat.tick(full)
    assert not sat.take()
