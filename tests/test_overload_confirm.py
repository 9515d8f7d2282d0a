"""The contested-rate confirmation's pure parts (``bench.overload.search``): which rate the
two searches disagree on, and the capacity a pooled verdict there leaves."""

from __future__ import annotations

from bench.overload.search import (
    PooledProbe,
    SearchResult,
    SearchStep,
    capacity_after,
    confirm,
    contested_rate,
)


def test_the_contested_rate_is_the_higher_capacity_when_the_searches_differ() -> None:
    assert contested_rate([2.8284, 4.0]) == 4.0 == contested_rate([4.0, 0.0])
    assert contested_rate([4.0, 4.00001]) is None, "rounded as the runs are keyed"
    assert contested_rate([4.0, 4.0]) is None and contested_rate([2.0]) is None
    assert contested_rate([]) is None


def searched(*steps: tuple[float, bool]) -> SearchResult:
    """A search with these (rate, passed) steps and its capacity, the highest passed."""
    found = [SearchStep(rate, 1.0 if ok else 0.5, ok) for rate, ok in steps]
    return SearchResult(max((s.offered_rps for s in found if s.passed), default=0.0), found)


def test_a_pooled_pass_raises_the_capacity_to_the_rate_and_a_fail_drops_it_below() -> None:
    """Pass: at least the contested rate. Fail: the highest rate below it that passed in the
    search, though the search never probed the rate the other arm's did in between; 0.0 when
    none passed."""
    climbed = searched((1.0, True), (2.0, True), (4.0, True), (8.0, False))
    refined = searched((1.0, True), (2.0, True), (4.0, False), (2.8284, True))
    assert capacity_after(refined, 4.0, passed=True) == 4.0
    assert capacity_after(climbed, 4.0, passed=True) == 4.0
    assert capacity_after(climbed, 4.0, passed=False) == 2.0
    assert capacity_after(refined, 4.0, passed=False) == 2.8284
    assert capacity_after(searched((0.5, False), (0.25, False)), 1.0, passed=False) == 0.0


def test_confirm_judges_the_pooled_attainment_and_keeps_the_step() -> None:
    """The pooled share decides, not the new probe's: 94.7 % then 96.8 % pool to a pass over
    both probes' requests; the confirmation is kept on the search with the capacity it left,
    and a failed one counts as a failing step above the capacity (bracketed)."""
    refined = searched((2.0, True), (4.0, False), (2.8284, True))
    done = confirm(refined, PooledProbe(4.0, 0.968, 0.957, 190, 2), required=0.95)
    assert done.passed and (done.capacity_before_rps, done.capacity_rps) == (2.8284, 4.0)
    assert refined.capacity_rps == 4.0 and refined.confirmations == [done]
    climbed = searched((2.0, True), (4.0, True))
    assert not climbed.bracketed
    failed = confirm(climbed, PooledProbe(4.0, 0.99, 0.94, 200, 2), required=0.95)
    assert not failed.passed and climbed.capacity_rps == 2.0 and climbed.bracketed


# -- report checks ---------------------------------------------------------------------------
