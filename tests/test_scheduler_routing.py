"""Routing decisions (pure): load estimates, power of two choices with affinity, outlier
ejection, retry budget, and the breaker's failure-rate window, against a fake clock."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from scheduler import routing
from scheduler.admission import ThroughputMeter
from scheduler.calibration import EMBED_SMOOTHING
from scheduler.node_handle import NodeHandle, paces_prompts
from scheduler.nodes import NodeDirectory
from scheduler.prefill import PrefillGuard
from scheduler.retry_budget import RetryBudget
from scheduler.routing import AffinityTable, LoadBook, OutlierDetector, power_of_two
from sluice.contract import WorkloadClass
from sluice.runtime.breaker import BreakerConfig, BreakerState, CircuitBreaker
from sluice.v1 import common_pb2
from tests.test_scheduler_core import FakeClock

REALTIME, BATCH = WorkloadClass.REALTIME, WorkloadClass.BATCH


def test_load_estimate_moves_with_own_dispatches_between_reports() -> None:
    """A burst between two reports fills the node in the estimate (no herd on a stale
    'idle' report); the next report replaces the estimate's base."""
    book = LoadBook(max_sequences=4)
    book.on_report(0, 0, 0, 100, 50.0)
    for _ in range(4):
        assert book.has_room(REALTIME, 0.0)
        book.on_dispatch(100)
    assert book.sequences() == 4 and not book.has_room(REALTIME, 0.0)
    book.on_report(4, 400, 10, 100, 50.0)  # the node now reports them itself
    assert book.sequences() == 4
    book.on_finish()
    assert book.sequences() == 3 and book.has_room(REALTIME, 0.0)


def test_own_in_flight_is_a_floor_under_a_stale_report() -> None:
    """A report that predates our dispatches never makes the node look emptier than what
    this scheduler itself has there."""
    book = LoadBook(max_sequences=8)
    for _ in range(3):
        book.on_dispatch(10)
    book.on_report(0, 0, 0, 0, 0.0)  # generated before our requests arrived
    assert book.sequences() == 3


def test_lower_classes_leave_headroom_to_realtime() -> None:
    """BATCH stops at capacity minus the headroom; REALTIME may use the last slots."""
    book = LoadBook(max_sequences=8)
    for _ in range(7):
        book.on_dispatch(10)
    assert not book.has_room(BATCH, 0.125)
    assert book.has_room(REALTIME, 0.125)


def test_without_headroom_a_lower_class_may_take_the_last_slots() -> None:
    """A promoted BATCH request is checked with no headroom (NodeDirectory.has_room): on a
    node with 7 of 8 slots taken it may start, where BATCH otherwise leaves the last one."""
    book = LoadBook(max_sequences=8)
    for _ in range(7):
        book.on_dispatch(10, BATCH)
    assert not book.has_room(BATCH, 0.125)
    assert book.has_room(BATCH, 0.0)
    assert book.capacity(BATCH, 0.0) == 8


def test_full_kv_cache_means_no_room() -> None:
    """A node reporting its KV cache nearly full takes nothing more."""
    book = LoadBook(max_sequences=8)
    book.on_report(1, 0, 96, 100, 1.0)
    assert not book.has_room(REALTIME, 0.0)


def test_power_of_two_prefers_less_loaded_and_affinity_on_tie() -> None:
    """Of two sampled nodes the less loaded wins; the affinity node wins only on a tie."""
    rng = random.Random(1)
    load = {"a": 0.1, "b": 0.9}
    picks = {power_of_two(["a", "b"], load.__getitem__, rng) for _ in range(20)}
    assert picks == {"a"}
    assert power_of_two(["a", "b"], load.__getitem__, rng, preferred="b") == "a"
    load["b"] = 0.12
    assert power_of_two(["a", "b"], load.__getitem__, rng, preferred="b") == "b"


def test_power_of_two_spreads_a_burst() -> None:
    """Dispatching a burst with live load books spreads it over the nodes instead of
    piling on one (the thundering-herd failure of picking the least loaded by report)."""
    rng = random.Random(3)
    books = {n: LoadBook(max_sequences=64) for n in "abcd"}
    for _ in range(40):
        chosen = power_of_two(list(books), lambda n: books[n].score(), rng)
        books[chosen].on_dispatch(100)
    counts = sorted(b.in_flight for b in books.values())
    assert counts[-1] - counts[0] <= 2


def test_affinity_table_is_bounded_lru() -> None:
    """The affinity table forgets the least recently used keys beyond its size."""
    table = AffinityTable(size=2)
    table.put("x", "a")
    table.put("y", "b")
    assert table.get("x") == "a"
    table.put("z", "c")
    assert table.get("y") is None and table.get("x") == "a" and table.get("z") == "c"


def test_latency_outlier_is_ejected_for_a_while() -> None:
    """A node whose TTFT runs 10x its peers' is ejected, and comes back after eject_s."""
    clock = FakeClock()
    detector = OutlierDetector(clock)
    for _ in range(10):
        for node in ("a", "b"):
            detector.observe(node, "ttft", 0.05)
    ejected = [detector.observe("slow", "ttft", 1.0) for _ in range(10)]
    assert any(ejected)
    assert detector.ejected("slow") and not detector.ejected("a")
    clock.advance(detector.config.eject_s + 0.1)
    assert not detector.ejected("slow")


def test_small_absolute_gaps_and_majorities_are_not_ejected() -> None:
    """3x a tiny TTFT is noise (under min_excess); and with two nodes both slow, at most
    half the fleet may be ejected at once."""
    clock = FakeClock()
    detector = OutlierDetector(clock)
    for _ in range(10):
        detector.observe("a", "ttft", 0.001)
        assert not detector.observe("b", "ttft", 0.01)
    detector2 = OutlierDetector(clock)
    for _ in range(10):
        detector2.observe("a", "itl", 0.01)
        detector2.observe("b", "itl", 1.0)
        detector2.observe("c", "itl", 1.0)
    assert sum(detector2.ejected(n) for n in "abc") <= 1


def test_retry_budget_caps_retries_at_a_fifth_of_requests() -> None:
    """Over 100 requests only 20 retries are allowed; the window slides."""
    clock = FakeClock()
    budget = RetryBudget(clock, ratio=0.2, window_s=10.0, min_retries=2)
    for _ in range(100):
        budget.record_request()
    allowed = sum(budget.try_spend() for _ in range(50))
    assert allowed == 20
    clock.advance(11.0)
    assert sum(budget.try_spend() for _ in range(5)) == 2  # only the floor without traffic


def test_retry_budget_memory_does_not_grow_with_requests() -> None:
    """A million requests over a minute leave the same ten counters (a list of timestamps
    held ~32 MB here) and the same decision: a fifth of the last window's requests."""
    clock = FakeClock()
    budget = RetryBudget(clock, ratio=0.2, window_s=10.0, min_retries=2)
    assert budget.buckets == 10
    # Only what the budget's own module allocates: threads other tests left behind (servers,
    # engines winding down) allocate meanwhile too, and tracemalloc sees every thread.
    mine = [tracemalloc.Filter(True, routing.__file__)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(mine)
        for _ in range(200_000):  # traced: slower, so a fifth of them
            budget.record_request()
            clock.advance(60e-6)
        after = tracemalloc.take_snapshot().filter_traces(mine)
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    for _ in range(800_000):
        budget.record_request()
        clock.advance(60e-6)
    assert budget.buckets == 10
    assert grown < 16_384, grown
    # The last 10 s held ~166,667 requests (the oldest slot partly elapsed): ~33,000 retries.
    allowed = sum(budget.try_spend() for _ in range(40_000))
    assert 0.2 * 150_000 <= allowed <= 0.2 * 166_667 + 1


def test_retry_budget_holds_a_fifth_over_every_window_under_steady_failure() -> None:
    """Ten requests a second, each followed by a retry attempt, for two minutes: in every
    10-s window (slot-aligned) retries stay within max(floor, 20 % of requests), and the
    budget is used (not starved) once traffic has filled a window."""
    clock = FakeClock(start=0.0)
    budget = RetryBudget(clock, ratio=0.2, window_s=10.0, min_retries=2)
    per_second: list[tuple[int, int]] = []
    for _second in range(120):
        requests = retries = 0
        for _ in range(10):
            budget.record_request()
            requests += 1
            retries += budget.try_spend()
            clock.advance(0.1)
        per_second.append((requests, retries))
    for end in range(10, 121):
        window = per_second[end - 10 : end]
        sent = sum(r for r, _ in window)
        retried = sum(t for _, t in window)
        assert retried <= max(2, int(0.2 * sent)), (end, retried, sent)
        if end >= 20:
            assert retried >= int(0.2 * sent) - 2, (end, retried, sent)


def test_retry_budget_forgets_a_window_of_silence_at_once() -> None:
    """After a silence longer than the window every slot is empty, and the floor is what
    remains, however large the clock's jump."""
    clock = FakeClock()
    budget = RetryBudget(clock, ratio=0.2, window_s=10.0, min_retries=3)
    for _ in range(1000):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(300)) == 200
    clock.advance(5.0)
    assert not budget.try_spend()  # still inside the window
    clock.advance(1e9)
    assert sum(budget.try_spend() for _ in range(10)) == 3


def test_breaker_opens_on_failure_rate_without_five_in_a_row() -> None:
    """Alternating failures never make 5 in a row, but a 50 % rate over the window (with
    at least min_calls calls) opens the breaker."""
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(failure_rate=0.5, min_calls=10), clock)
    for _ in range(4):
        breaker.record_success()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.advance(5.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_breaker_open_time_is_capped_at_30_s() -> None:
    """Failed probes double the open time, never beyond 30 s."""
    clock = FakeClock()
    breaker = CircuitBreaker(BreakerConfig(), clock)
    for _ in range(5):
        breaker.record_failure()
    for _ in range(6):
        clock.advance(31.0)
        assert breaker.allow()
        breaker.record_failure()
    clock.advance(29.9)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.2)
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_report_racing_a_finish_leaves_no_phantom_sequence() -> None:
    """A report the node built just before one of our requests ended, arriving after the end,
    does not keep that slot looking busy."""
    book = LoadBook(max_sequences=4)
    for _ in range(4):
        book.on_dispatch(10)
    book.on_report(4, 0, 0, 100, 50.0)
    book.on_finish()
    book.on_report(4, 0, 0, 100, 50.0)  # still counts the request that just ended
    assert book.sequences() == 3 and book.has_room(REALTIME, 0.0)


def test_sequences_of_other_schedulers_count_once_two_reports_show_them() -> None:
    """Load this scheduler did not send (another replica's) is taken from the reports: the
    smaller excess of the last two, so one racing report cannot invent it."""
    book = LoadBook(max_sequences=4)
    book.on_dispatch(10)
    book.on_report(3, 0, 0, 100, 50.0)
    assert book.sequences() == 1
    book.on_report(3, 0, 0, 100, 50.0)
    assert book.sequences() == 3
    book.on_dispatch(10)
    assert book.sequences() == 4 and not book.has_room(REALTIME, 0.0)


def test_realtime_is_held_back_only_by_what_it_cannot_preempt() -> None:
    """A node full of BATCH sequences still has room for REALTIME (its engine preempts a
    BATCH sequence), none for more BATCH; REALTIME fills every slot before it waits."""
    book = LoadBook(max_sequences=4)
    for _ in range(3):
        book.on_dispatch(10, BATCH)
    assert not book.has_room(BATCH, 0.25)
    for _ in range(4):
        assert book.has_room(REALTIME, 0.25)
        book.on_dispatch(10, REALTIME)
    assert not book.has_room(REALTIME, 0.25)
    assert book.sequences() == 7 and book.sequences(REALTIME) == 4
    book.on_finish(REALTIME)
    assert book.has_room(REALTIME, 0.25) and not book.has_room(BATCH, 0.25)


def test_batch_sequences_the_node_pinned_hold_realtime_back() -> None:
    """Four BATCH sequences fill the node; once it reports three of them pinned (their
    deadlines near: no preemption), REALTIME has room for one, BATCH's own count unchanged."""
    book = LoadBook(max_sequences=4)
    for _ in range(4):
        book.on_dispatch(10, BATCH)
    book.on_report(4, 0, 0, 100, 50.0, by_class={BATCH: 4}, pinned=3)
    assert book.sequences(REALTIME) == 3 and book.sequences(BATCH) == book.sequences() == 4
    assert book.has_room(REALTIME, 0.0)
    book.on_dispatch(10, REALTIME)
    assert not book.has_room(REALTIME, 0.0)


def test_other_schedulers_sequences_are_counted_by_their_class() -> None:
    """Reports split by class: another replica's BATCH sequences do not hold REALTIME back,
    its REALTIME ones do."""
    book = LoadBook(max_sequences=4)
    for _ in range(2):
        book.on_report(4, 0, 0, 100, 50.0, by_class={BATCH: 4})
    assert book.sequences() == 4 and book.sequences(REALTIME) == 0
    assert book.has_room(REALTIME, 0.0) and not book.has_room(BATCH, 0.0)
    for _ in range(2):
        book.on_report(4, 0, 0, 100, 50.0, by_class={REALTIME: 4})
    assert not book.has_room(REALTIME, 0.0)


def test_full_kv_cache_leaves_room_for_realtime_only_when_batch_can_give_some_up() -> None:
    """KV nearly full of BATCH: REALTIME may still go (a preemption frees a slot's KV)."""
    book = LoadBook(max_sequences=8)
    for _ in range(2):
        book.on_report(2, 0, 96, 100, 1.0, by_class={BATCH: 2})
    assert book.has_room(REALTIME, 0.0)
    assert not book.has_room(BATCH, 0.0)


def test_slots_a_fine_tune_holds_are_capacity_no_class_may_use() -> None:
    """A report of 3 of 8 slots reserved by training leaves 5 for every class: BATCH stops at
    4 (5 less the headroom) and REALTIME at 5, though no sequence of any class holds the
    other 3 (they are not preemptible); the score counts occupancy of the 5. Once training
    gives them back (reserved 0), the full 8 again."""
    book = LoadBook(max_sequences=8)
    book.on_report(0, 0, 0, 100, 1.0, by_class={}, reserved=3)
    assert book.usable == 5 and book.capacity(BATCH, 0.125) == 4
    for _ in range(4):
        assert book.has_room(BATCH, 0.125)
        book.on_dispatch(10, BATCH)
    assert not book.has_room(BATCH, 0.125) and book.has_room(REALTIME, 0.125)
    book.on_dispatch(10, REALTIME)
    assert book.score() == 5 / 5 + 50 / (5 * 512)  # occupancy and tokens, of 5 slots
    assert book.has_room(REALTIME, 0.125)  # the engine preempts a BATCH sequence for it
    for _ in range(4):
        book.on_dispatch(10, REALTIME)
    assert not book.has_room(REALTIME, 0.125)
    book.on_report(9, 0, 0, 100, 1.0, by_class={BATCH: 4, REALTIME: 5}, reserved=0)
    assert book.usable == 8 and book.has_room(REALTIME, 0.125)
    book.on_report(9, 0, 0, 100, 1.0, by_class={BATCH: 4, REALTIME: 5}, reserved=9)
    assert book.usable == 1  # never less than one slot


def _handle(clock: FakeClock) -> NodeHandle:
    """A node handle with no channel: only its book and its measured rates are used."""
    return NodeHandle(
        info=common_pb2.NodeInfo(node_id="n1"),
        channel=None,  # type: ignore[arg-type]
        stub=None,  # type: ignore[arg-type]
        breaker=CircuitBreaker(BreakerConfig(), clock),
        meter=ThroughputMeter(clock),
    )


def test_a_node_s_streaming_token_time_is_its_realtime_streams_mean_time_per_token() -> None:
    """The per-token time of REALTIME chunks is the time they took over the tokens they
    brought, lately (each weighted by its age, 2 s): one 0.65-s prefill step among 0.07-s decode
    steps leaves it near the streams' mean (an average of the gaps in time read 0.23 s, over a
    0.2-s target); every stream of a step counts; it is read as 0 once no REALTIME chunk came
    for 4 s, and a chunk after a long pause starts it afresh."""
    clock = FakeClock()
    node = _handle(clock)
    assert node.live_token_s(clock()) == 0
    for _ in range(28):  # two streams, a decode step every 0.07 s
        clock.advance(0.07)
        node.observe_token_gap(0.07, 1, clock())
        node.observe_token_gap(0.07, 1, clock())
    assert node.stream_token_s == pytest.approx(0.07)
    clock.advance(0.65)  # a step with a full prompt chunk beside them
    node.observe_token_gap(0.65, 1, clock())
    node.observe_token_gap(0.65, 1, clock())
    assert 0.09 < node.live_token_s(clock()) < 0.12
    for _ in range(14):
        clock.advance(0.07)
        node.observe_token_gap(0.07, 1, clock())
    assert 0.08 < node.live_token_s(clock()) < 0.1
    for _ in range(20):  # the streams slow to 0.3 s a token, four tokens a chunk
        clock.advance(1.2)
        node.observe_token_gap(1.2, 4, clock())
    assert node.live_token_s(clock()) == pytest.approx(0.3, rel=0.02)
    node.observe_token_gap(0.5, 0, clock())  # a chunk without tokens says nothing
    assert node.live_token_s(clock()) == pytest.approx(0.3, rel=0.02)
    clock.advance(4.1)
    assert node.live_token_s(clock()) == 0
    node.observe_token_gap(0.3, 1, clock())
    assert node.live_token_s(clock()) == pytest.approx(0.3)


def _models(*generators: bool, embedder: bool = False) -> common_pb2.NodeInfo:
    """A node entry with a generating model per flag (whether its engine paces prompts)."""
    info = common_pb2.NodeInfo(node_id="n1", address="127.0.0.1:1")
    for i, paced in enumerate(generators):
        info.models.add(name=f"m{i}", kind=common_pb2.MODEL_KIND_GENERATE, paces_prompts=paced)
    if embedder:
        info.models.add(name="e", kind=common_pb2.MODEL_KIND_EMBED)
    return info


def test_a_node_paces_its_prompts_only_when_every_generating_model_s_engine_does() -> None:
    """One model on the built-in engine beside a vLLM one shares the node's bucket, so the
    bucket keeps its rule there; an embedder has no say."""
    assert paces_prompts(_models(True, embedder=True))
    assert paces_prompts(_models(True, True))
    assert not paces_prompts(_models(True, False))
    assert not paces_prompts(_models(embedder=True))
    assert not paces_prompts(_models(False))


async def test_the_measured_time_rule_waits_for_the_full_target_where_the_node_paces_prompts() -> (
    None
):
    """The prefill bucket's measured-time rule (prompts at ``min_share`` once the streams run
    slower than the step budget, 0.16 s here) waits for the target itself (0.2 s) on a node
    whose engine paces its own lower-class prompts (``ModelInfo.paces_prompts``, vLLM's pace):
    streams at 0.18 s a token there drain the bucket at the fitted share; at 0.21 s, or on a
    node that does not pace, at ``min_share``. The flag reaches the book from the registry
    entry, as it changes (``NodeDirectory``, ``NodeHandle.take_info``)."""
    clock = FakeClock()
    guard = PrefillGuard({REALTIME: 0.2}, burst_intervals=5.0, measured_share=0.8)
    directory = NodeDirectory(None, clock=clock, prefill_guard=guard)  # type: ignore[arg-type]
    node = _handle(clock)
    node.info = _models(False)  # its address: an update, not a new node
    directory._nodes["n1"] = node  # no channel: only the book is read
    fit = common_pb2.StepCost(model="m0", base_s=0.05, per_sequence_s=0.01, samples=64)
    node.book.on_report(0, 0, 0, 0, 0.0, steps=[fit])
    node.book.on_dispatch(10, REALTIME)
    fitted = 1 - 0.06 / 0.2  # one sequence: a 0.06-s step
    for paced, stream_s, share in (
        (False, 0.18, guard.min_share),
        (True, 0.18, fitted),
        (True, 0.21, guard.min_share),
        (False, 0.15, fitted),
    ):
        directory._on_change("n1", _models(paced))  # the registry's update
        assert node.book.paces_prompts is paced and directory.get("n1") is node
        clock.advance(5.0)  # the last gap forgotten: this one alone is the streams' time
        node.observe_token_gap(stream_s, 1, clock())
        assert node.book.settle_prefill(guard, clock(), node.live_token_s(clock())) == (
            pytest.approx(share)
        )


def test_a_load_report_reaches_the_book_with_the_prompts_ahead_per_model() -> None:
    """``NodeHandle.on_report``: the book takes the report's counts, step fits and the prompt
    tokens ahead of a REALTIME prompt and the prefix cache's hit ratio for each model the node
    tells them for."""
    clock = FakeClock()
    node = _handle(clock)
    report = common_pb2.LoadReport(
        node_id="n1", realtime_prefill_ahead_tokens={"m": 700}, prefix_cache_hit_ratio={"m": 0.5}
    )
    report.classes.add(workload_class=BATCH, running=2)
    report.step_costs.add(model="m", base_s=0.05, per_sequence_s=0.01, per_prefill_token_s=0.002)
    node.on_report(report, clock(), PrefillGuard())
    assert node.load is report and node.book.sequences() == 0  # a first report: none foreign
    assert node.book.ahead_tokens == {"m": 700} and node.book.tells_ahead("m")
    assert node.book.cached == {"m": 0.5}  # half of the 800 prompt tokens are priced
    assert node.book.first_token_s("m", 100, 512) == pytest.approx(2 * 0.05 + 400 * 0.002)


def test_first_tokens_are_timed_by_the_timed_terms_and_the_bucket_priced_by_the_fit() -> None:
    """A report whose fit carries ``timed`` terms (its median clip halved the prompt cost):
    first tokens and a prompt's prefill alone are timed by those, while the prefill bucket's
    debt is read back into tokens at the price it was charged at (the fit's)."""
    clock = FakeClock()
    node = _handle(clock)
    report = common_pb2.LoadReport(node_id="n1", realtime_prefill_ahead_tokens={"m": 300})
    fit = report.step_costs.add(
        model="m", base_s=0.05, per_sequence_s=0.0, per_prefill_token_s=0.001
    )
    fit.timed.CopyFrom(common_pb2.StepCost(base_s=0.04, per_prefill_token_s=0.002))
    node.on_report(report, clock(), PrefillGuard())
    assert node.book.first_token_s("m", 100, 512) == pytest.approx(2 * 0.04 + 400 * 0.002)
    del node.book.ahead_tokens["m"]  # no longer told: the bucket's debt ahead, no step under way
    node.book.prefill.add(0.2)  # 200 tokens at the fit's price
    assert node.book.first_token_s("m", 100, 512) == pytest.approx(0.04 + 300 * 0.002)
    older = common_pb2.LoadReport(node_id="n1")
    older.step_costs.add(model="m", base_s=0.05, per_prefill_token_s=0.001)  # no timed terms
    node.on_report(older, clock(), PrefillGuard())
    assert node.book.timings["m"] is node.book.fits["m"]


def test_an_embedding_model_s_calls_take_slots_but_no_step_budget() -> None:
    """A node whose fit allows 8 REALTIME sequences within the step budget: with 8 running, a
    generation finds no room, an Embed still does (it runs on the embedding thread, not in
    the batch) until every slot is taken. The scheduler's moving average of a model's and
    class's Embed calls starts at the first call and follows later ones at
    :data:`EMBED_SMOOTHING`; the fastest of the last ones is kept beside it."""
    clock = FakeClock()
    directory = NodeDirectory(None, clock=clock, step_budgets={REALTIME: 0.08})  # type: ignore[arg-type]
    node = _handle(clock)
    node.info = _models(False, embedder=True)
    node.book.max_sequences = 12
    directory._nodes["n1"] = node  # no channel: only the book is read
    fit = common_pb2.StepCost(model="m0", base_s=0.04, per_sequence_s=0.005, samples=64)
    node.book.on_report(0, 0, 0, 0, 0.0, steps=[fit])
    for _ in range(8):
        node.book.on_dispatch(10, REALTIME)
    assert not directory.has_room(node, REALTIME, "m0")
    assert directory.has_room(node, REALTIME, "e")
    for _ in range(4):
        node.book.on_dispatch(10, REALTIME)
    assert not directory.has_room(node, REALTIME, "e")  # every slot held
    times = directory.embed_times
    assert times.seconds("e", REALTIME) == times.fastest("e", REALTIME) == 0.0
    times.record("e", REALTIME, 0.1)
    times.record("e", REALTIME, 0.2)
    times.record("e", BATCH, 0.9)  # each class its own
    assert times.seconds("e", REALTIME) == pytest.approx(0.1 + EMBED_SMOOTHING * 0.1)
    assert times.fastest("e", REALTIME) == 0.1
