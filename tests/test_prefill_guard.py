"""The prefill bucket (:mod:`scheduler.prefill`): prompts sent to a node fill it, the share of
the node's time its streams' inter-token targets leave to prompts drains it, and a prompt
waits while it would overfill it beside a stream of its class or a higher one."""

from __future__ import annotations

import pytest

from bench.slo.cli import GUARD_OFF
from scheduler.admission import Admission, AdmissionConfig
from scheduler.config import SchedulerSettings, prefill_guard
from scheduler.prefill import PrefillBucket, PrefillGuard
from scheduler.queues import FairQueues, QueuedRequest
from scheduler.routing import LoadBook
from sluice.contract import WorkloadClass
from sluice.runtime.settings import parse_settings
from sluice.v1 import common_pb2

RT, BATCH = WorkloadClass.REALTIME, WorkloadClass.BATCH
FIT = common_pb2.StepCost(
    model="m", base_s=0.05, per_sequence_s=0.01, per_prefill_token_s=0.002, samples=64
)
"""50 ms a step, 10 ms a sequence, 2 ms a prompt token."""
GUARD = PrefillGuard({RT: 0.2, BATCH: 1.0}, burst_intervals=5.0, lower_class_share=0.5)
"""A bucket of 5 x 0.2 s = 1 s; BATCH may fill half of it."""


def book_with(*classes: WorkloadClass) -> LoadBook:
    book = LoadBook(max_sequences=32)
    book.on_report(0, 0, 0, 0, 0.0, steps=[FIT])
    for cls in classes:
        book.on_dispatch(10, cls)
    return book


def test_the_guard_derives_its_depth_and_share_from_the_targets() -> None:
    assert GUARD.burst_s == pytest.approx(1.0)
    assert GUARD.allowance(RT) == pytest.approx(1.0)
    assert GUARD.allowance(BATCH) == pytest.approx(0.5)
    assert GUARD.drain_share(0.15, {RT}) == pytest.approx(0.25)  # 1 - 0.15 / 0.2
    assert GUARD.drain_share(0.15, {BATCH}) == pytest.approx(0.85)
    assert GUARD.drain_share(0.3, {RT}) == pytest.approx(0.1)  # never below min_share
    assert GUARD.drain_share(0.15, set()) == 1.0  # nothing decodes: prompts take it all
    # REALTIME streams measured slower than their target: the fit missed something, and
    # prompts get the least share until they are back under it.
    assert GUARD.drain_share(0.15, {RT}, measured_s=0.21) == pytest.approx(0.1)
    assert GUARD.drain_share(0.15, {RT}, measured_s=0.19) == pytest.approx(0.25)
    settings = SchedulerSettings()
    # The scheduler's guard reads them against the step budget's share of the target (0.8:
    # 0.16 s), where it plans their steps: 0.17 s a token is already over it.
    planned = prefill_guard(settings)
    assert planned.measured_share == settings.itl_step_share
    assert planned.drain_share(0.1, {RT}, measured_s=0.17) == pytest.approx(0.1)
    assert planned.drain_share(0.1, {RT}, measured_s=0.15) == pytest.approx(0.5)
    assert prefill_guard(settings).burst_s == pytest.approx(
        8 * settings.realtime_itl_target_seconds
    )
    off = prefill_guard(parse_settings(SchedulerSettings, GUARD_OFF, "scheduler"))
    assert off.burst_s == 0.0  # bench-slo's reference suite runs without it
    assert PrefillGuard().burst_s == 0.0
    assert PrefillGuard({BATCH: 1.0}).burst_s == 0.0  # no REALTIME target: no bucket


def test_a_bucket_drains_at_its_share_and_an_empty_one_takes_any_prompt() -> None:
    bucket = PrefillBucket()
    bucket.settle(10.0, 0.5)
    assert bucket.wait(3.0, 1.0, 0.5) == 0.0  # empty: a prompt over the depth still starts
    bucket.add(3.0)
    assert bucket.wait(0.1, 1.0, 0.5) == pytest.approx(2.1 / 0.5)  # 3 + 0.1 over the 1 s
    assert bucket.wait(2.0, 1.0, 0.5) == pytest.approx(3.0 / 0.5)  # oversized: until empty
    bucket.settle(12.0, 0.5)
    assert bucket.debt_s == pytest.approx(2.0)
    assert bucket.wait(0.5, 1.0, 0.5) == pytest.approx(1.5 / 0.5)
    assert bucket.wait(0.0, 1.0, 0.5) == 0.0  # no fit (an embedder): nothing to hold
    assert bucket.wait(0.5, 1.0, 0.5, ahead_s=1.0) == pytest.approx(2.5 / 0.5)  # queued first
    bucket.settle(11.0, 0.5)  # a clock read out of order drains nothing
    assert bucket.debt_s == pytest.approx(2.0)
    bucket.settle(20.0, 0.5)
    assert bucket.debt_s == 0.0
    assert bucket.wait(5.0, 0.0, 0.5) == 0.0  # no allowance: the guard is off


def test_a_prompt_waits_only_beside_streams_of_its_class_or_above() -> None:
    """Two REALTIME streams (step 0.07 s: prompts may take 65 % of the node) and 0.8 s of
    prompts sent: one more 200-token prompt (0.4 s) overfills the 1 s bucket by 0.2 s and
    waits 0.2 / 0.65 s; a 50-token one fits. BATCH may fill only half the bucket, so it
    waits for 0.3 + 0.1 s of drain; a node without REALTIME streams takes REALTIME at once."""
    book = book_with(RT, RT)
    book.on_prefill(0.8, GUARD, now=100.0)
    share = 1 - (0.05 + 0.01 * 2) / 0.2
    cost = book.prefill_cost("m", 200)
    assert cost == pytest.approx(0.4)
    assert book.prefill_wait(RT, cost, GUARD, now=100.0) == pytest.approx(0.2 / share)
    assert book.prefill_wait(RT, book.prefill_cost("m", 50), GUARD, now=100.0) == 0.0
    assert book.prefill_wait(BATCH, 0.1, GUARD, now=100.0) == pytest.approx(0.4 / share)
    assert book.prefill_cost("other", 200) == 0.0  # a model without a fit costs nothing
    only_batch = book_with(BATCH)
    only_batch.on_prefill(3.0, GUARD, now=100.0)
    assert only_batch.prefill_wait(RT, 0.4, GUARD, now=100.0) == 0.0
    assert only_batch.prefill_wait(BATCH, 0.4, GUARD, now=100.0) > 0


def test_the_bucket_drains_faster_once_streams_end() -> None:
    """The share is read at each settle: with the node's streams gone, prompts take all of
    its time."""
    book = book_with(RT)
    book.on_prefill(1.0, GUARD, now=0.0)
    book.settle_prefill(GUARD, now=1.0)  # one stream: step 0.06 s, share 0.7
    assert book.prefill.debt_s == pytest.approx(0.3)
    book.on_finish(RT)
    book.settle_prefill(GUARD, now=1.1)
    assert book.prefill.debt_s == pytest.approx(0.2)  # 0.3 - 0.1 at the whole node's share


def request(cls: WorkloadClass, prompt: int, deadline: float) -> QueuedRequest:
    return QueuedRequest(f"r{prompt}", "t", cls, "m", prompt, 10, deadline)


def test_a_realtime_prompt_that_would_wait_past_its_ttft_target_for_the_bucket_is_refused() -> None:
    """No slot is short and nothing is queued, but the bucket needs 1.8 s to take the prompt:
    with its 0.3 s of prefill that misses the 2 s TTFT target, so it is refused now with the
    bucket's wait as its retry; 0.5 s of it is admitted to wait."""
    now = [0.0]
    queues = FairQueues(lambda: now[0], lambda _t: 1.0)
    config = AdmissionConfig(realtime_max_wait_s=0, ttft_targets={RT: 2.0})
    admission = Admission(queues, lambda: now[0], lambda _t: 1.0, config)
    item = request(RT, 150, deadline=60.0)
    late = admission.decide(item, 1000.0, False, prefill_s=0.3, room_in_s=1.8)
    assert not late.admitted and not late.past_deadline
    assert late.predicted_wait_s == pytest.approx(1.8)
    assert late.retry_after(config) == pytest.approx(1.8)
    soon = admission.decide(item, 1000.0, False, prefill_s=0.3, room_in_s=0.5)
    assert soon.admitted and soon.predicted_wait_s == pytest.approx(0.5)


def test_a_prompt_s_first_token_under_load_counts_the_chunks_and_the_prompts_before_it() -> None:
    """Two streams decode beside it: a 1000-token prompt takes 2 steps of 510 prompt tokens
    (0.07 s each besides its tokens' 2 s); 0.5 s of prompts already sent (250 tokens) go
    first and make it 3 steps. Without a fit nothing is predicted."""
    book = book_with(RT, RT)
    assert book.first_token_s("m", 1000, 512) == pytest.approx(2 * 0.07 + 2.0)
    book.prefill.add(0.5)
    assert book.first_token_s("m", 1000, 512) == pytest.approx(3 * 0.07 + 2.5)
    assert book.first_token_s("other", 1000, 512) == 0.0
    assert not book.tells_ahead("m")


def test_where_the_node_tells_the_prompts_ahead_the_first_token_follows_its_queue() -> None:
    """The node's report names 400 prompt tokens ahead of a REALTIME prompt: the bucket's
    debt no longer counts; the REALTIME prompts sent since the report do, the others at most
    a step's worth, and the step under way comes first. A new report starts the count again."""
    book = book_with(RT, RT)
    book.prefill.add(5.0)  # the bucket's debt: 2500 tokens, not what the node holds
    book.on_report(2, 0, 0, 0, 0.0, by_class={RT: 2}, steps=[FIT], ahead={"m": 400})
    assert book.tells_ahead("m") and not book.tells_ahead("other")
    step = 0.05 + 0.01 * 2
    assert book.first_token_s("m", 100, 512) == pytest.approx(2 * step + 500 * 0.002)
    book.on_dispatch(10, RT, "m", 300)
    book.on_dispatch(10, BATCH, "m", 2000)  # at most a step of it: 512
    step = 0.05 + 0.01 * 4  # both decode beside it now
    assert book.first_token_s("m", 100, 512) == pytest.approx(4 * step + 1312 * 0.002)
    book.on_report(4, 0, 0, 0, 0.0, by_class={RT: 3, BATCH: 1}, steps=[FIT], ahead={"m": 0})
    assert book.first_token_s("m", 100, 512) == pytest.approx(2 * step + 100 * 0.002)


def test_prompt_tokens_the_node_s_prefix_cache_holds_are_not_priced() -> None:
    """The node reports that its prefix cache held 60 % of new prompts' tokens lately: a
    prompt's prefill and its first token count 40 % of its tokens and of those ahead (at
    least one token; the bucket's debt only once), a report without the ratio prices them
    whole again."""
    book = book_with(RT, RT)
    book.on_report(
        2, 0, 0, 0, 0.0, by_class={RT: 2}, steps=[FIT], ahead={"m": 400}, cached={"m": 0.6}
    )
    step = 0.05 + 0.01 * 2
    assert book.prefill_cost("m", 1000) == pytest.approx(400 * 0.002)
    assert book.prefill_cost("m", 1) == pytest.approx(0.002) and book.prefill_cost("m", 0) == 0
    assert book.first_token_s("m", 100, 512) == pytest.approx(2 * step + 200 * 0.002)
    assert book.prefill_cost("other", 1000) == 0.0  # no fit for it
    book.on_report(2, 0, 0, 0, 0.0, by_class={RT: 2}, steps=[FIT], ahead={"m": 400})
    assert book.first_token_s("m", 100, 512) == pytest.approx(2 * step + 500 * 0.002)
    untold = book_with(RT, RT)  # no queue reported: the bucket's debt, priced less the cache
    untold.on_report(2, 0, 0, 0, 0.0, by_class={RT: 2}, steps=[FIT], cached={"m": 0.6})
    untold.prefill.add(untold.prefill_cost("m", 500))  # 200 tokens' worth, not discounted again
    assert untold.first_token_s("m", 100, 512) == pytest.approx(step + 240 * 0.002)


def test_a_realtime_request_that_could_start_now_is_refused_when_the_load_would_miss_its_ttft() -> (
    None
):
    """A slot is free and nothing is queued, but beside the batch its prompt's first token
    is predicted in 2.5 s (0.3 s alone): refused now, to retry after the 0.5 s excess; under
    the target it starts; a prompt that alone takes 2.4 s is admitted (it never could meet
    the target, so waiting for less load would not help)."""
    now = [0.0]
    queues = FairQueues(lambda: now[0], lambda _t: 1.0)
    config = AdmissionConfig(realtime_max_wait_s=0, ttft_targets={RT: 2.0})
    admission = Admission(queues, lambda: now[0], lambda _t: 1.0, config)
    item = request(RT, 150, deadline=60.0)
    late = admission.decide(item, 1000.0, True, busy=False, prefill_s=2.5, idle_prefill_s=0.3)
    assert not late.admitted and not late.past_deadline and "TTFT target" in late.detail
    assert late.retry_after(config) == pytest.approx(0.5)
    soon = admission.decide(item, 1000.0, True, busy=False, prefill_s=1.5, idle_prefill_s=0.3)
    assert soon.admitted
    long_prompt = admission.decide(
        item, 1000.0, True, busy=False, prefill_s=3.0, idle_prefill_s=2.4
    )
    assert long_prompt.admitted


def test_a_full_node_s_step_is_its_usable_slots_or_the_batch_the_budget_allows() -> None:
    """50 ms + 10 ms a sequence: 32 slots make 0.37 s; a 0.16 s budget allows 11 sequences
    (0.16 s); 4 slots held by training leave 28; another model, or none fitted, says 0."""
    book = book_with(RT)
    assert book.full_step_s("m", 0.0) == pytest.approx(0.05 + 0.01 * 32)
    assert book.full_step_s("m", 0.16) == pytest.approx(0.05 + 0.01 * 11)
    book.on_report(0, 0, 0, 0, 0.0, reserved=4, steps=[FIT])
    assert book.full_step_s("m", 1.0) == pytest.approx(0.05 + 0.01 * 28)
    assert book.full_step_s("other", 0.16) == 0.0
    assert LoadBook().full_step_s("m", 0.16) == 0.0
