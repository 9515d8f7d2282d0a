"""The vLLM node's stat logger (:class:`inference_node.engine.vllm_mapping.VllmStats`), fed
the shapes vLLM passes it (duck-typed: no vLLM in this environment), and where a prompt goes
in vLLM's priority queue (:func:`inference_node.engine.vllm_mapping.placement`)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from inference_node.engine.step_model import StepCost
from inference_node.engine.types import EngineRequest, SamplingParams
from inference_node.engine.vllm_jobs import (
    Job,
    begun_below,
    load,
    prefill_s,
    resumed_place,
    seat,
)
from inference_node.engine.vllm_mapping import (
    FirstTokenCalibration,
    Placement,
    PrefixHits,
    Seat,
    VllmStats,
    Waiting,
    may_give_seat,
    placement,
    seat_preemptions,
)
from sluice.contract import WorkloadClass


def _stats(rows: int, prompt: int, elapsed_ms: float, dummy: bool = False) -> SimpleNamespace:
    details = SimpleNamespace(
        num_generation_requests=rows,
        num_ctx_tokens=prompt,
        elapsed_ms=elapsed_ms,
        is_dummy=dummy,
    )
    return SimpleNamespace(
        num_running_reqs=rows, num_waiting_reqs=0, kv_cache_usage=0.1, iteration_details=details
    )


def test_steps_fit_the_step_time_against_decode_rows_and_prompt_tokens() -> None:
    """Each step's engine time from vLLM's iteration details (20 ms + 5 ms a decode row + 1 ms
    a prompt token, chunks counted as scheduled) gives the fit the built-in engine publishes;
    dummy iterations and stats without details count nothing."""
    stats = VllmStats()
    stats.record(_stats(3, 0, 500.0, dummy=True), None)
    stats.record(SimpleNamespace(num_running_reqs=1, num_waiting_reqs=0, kv_cache_usage=0), None)
    for i in range(64):
        rows, prompt = 1 + i % 8, (i * 7) % 40
        stats.record(_stats(rows, prompt, 20.0 + 5.0 * rows + 1.0 * prompt), None)
    cost = stats.step_model.cost
    assert cost is not None
    assert cost.base_s == pytest.approx(0.020, abs=1e-3)
    assert cost.per_sequence_s == pytest.approx(0.005, abs=2e-4)
    assert cost.per_prefill_token_s == pytest.approx(0.001, abs=1e-4)


COST = StepCost(base_s=0.1, per_sequence_s=0.01, per_prefill_token_s=0.001, samples=64)
RT, BATCH, FT = WorkloadClass.REALTIME, WorkloadClass.BATCH, WorkloadClass.FINETUNE


def _place(budget: float, waiting: list[Waiting], ahead: int = 0, **kw: object) -> Placement:
    cls = kw.get("cls", RT)
    cost = kw.get("cost", COST)
    assert isinstance(cls, WorkloadClass)
    assert cost is None or isinstance(cost, StepCost)
    return placement(cls, budget, 73, waiting, ahead, 12, 512, cost, now=11.0)


def test_realtime_goes_as_late_among_waiting_batch_as_its_first_token_budget_allows() -> None:
    """Fit 0.1 s + 10 ms a decode row + 1 ms a prompt token, 512-token steps, 12 rows: a step
    prefills 500 prompt tokens in 0.22 s + 1 ms each, plus one whole step in flight (0.72 s).
    BATCH prompts of 400 and 600 tokens wait; a 73-token REALTIME prompt's first token behind
    both: 1,073 / 500 steps x 0.22 + 1.073 + 0.72 = 2.27 s; behind the first only: 1.41 s;
    ahead of both: 1.01 s. It takes BATCH's rank and a key at the latest of those places
    within its budget (first come, first served where that fits), else REALTIME's rank."""
    waiting = [Waiting(10.0, False, 400), Waiting(10.5, False, 600)]
    assert _place(2.5, waiting) == Placement(BATCH.rank, 11.0)
    assert _place(2.0, waiting) == Placement(BATCH.rank, pytest.approx(10.5 - 1e-6))
    assert _place(1.2, waiting) == Placement(RT.rank, 11.0), "ahead of both"
    assert _place(0.5, waiting) == Placement(RT.rank, 11.0), "nothing fits: ahead of all BATCH"
    assert _place(2.0, [], ahead=500) == Placement(RT.rank, 11.0), "nothing to wait behind"


def test_realtime_never_goes_ahead_of_a_waiting_realtime_prompt() -> None:
    """A REALTIME prompt placed behind BATCH counted on the prompts ahead of it: a later one
    goes behind it even when its own budget is short or it has none (then right behind it:
    a REALTIME prompt taking REALTIME's rank would go ahead of it)."""
    waiting = [Waiting(10.0, False, 400), Waiting(10.2, True, 100), Waiting(10.5, False, 600)]
    assert _place(1.2, waiting) == Placement(BATCH.rank, pytest.approx(10.5 - 1e-6))
    assert _place(0.0, waiting) == Placement(BATCH.rank, pytest.approx(10.5 - 1e-6))
    assert _place(9.0, waiting, cost=None) == Placement(BATCH.rank, pytest.approx(10.5 - 1e-6))
    assert _place(9.0, waiting) == Placement(BATCH.rank, 11.0)


def test_without_a_budget_a_fit_or_realtime_a_prompt_takes_its_class_rank() -> None:
    """With no REALTIME prompt waiting."""
    waiting = [Waiting(10.0, False, 400)]
    assert _place(0.0, waiting) == Placement(RT.rank, 11.0)
    assert _place(2.0, waiting, cost=None) == Placement(RT.rank, 11.0)
    unpriced = StepCost(base_s=0.1, per_sequence_s=0.01, per_prefill_token_s=0.0, samples=9)
    assert _place(9.0, waiting, cost=unpriced) == Placement(RT.rank, 11.0), "prompts unpriced"
    assert _place(9.0, waiting, cls=BATCH) == Placement(BATCH.rank, 11.0)
    assert _place(9.0, waiting, cls=FT) == Placement(FT.rank, 11.0)


def test_realtime_prompts_placed_one_behind_another_keep_distinct_keys_in_order() -> None:
    """Six REALTIME prompts without a budget, each right behind the last, ahead of a BATCH
    prompt: their keys stay strictly between their neighbours' (the engine's keys count
    seconds from its start, where a float step is tiny), so vLLM keeps their order."""
    now = 1234.5
    waiting = [Waiting(now - 0.5, False, 400), Waiting(now - 0.4, False, 600)]
    assert _place(0.0, waiting) == Placement(RT.rank, 11.0), "nothing REALTIME waits: its rank"
    waiting.insert(0, Waiting(now - 0.6, True, 73))  # as if it had gone in BATCH's band
    for _ in range(6):
        p = placement(RT, 0.0, 73, waiting, 0, 12, 512, COST, now=now)
        assert p.priority == BATCH.rank
        index = next(i for i, w in enumerate(waiting) if w.key > p.key)
        assert waiting[index - 1].key < p.key < waiting[index].key
        assert waiting[index - 1].realtime and not waiting[index].realtime
        waiting.insert(index, Waiting(p.key, True, 73))
    assert [w.realtime for w in waiting] == [True] * 7 + [False, False]


def test_a_prompt_waits_only_behind_prompts_vllm_has_seats_for() -> None:
    """32 seats, 12 rows running: 19 waiting prompts can start beside it; a budget that
    would fit behind 25 BATCH prompts of 10 tokens places it behind 19."""
    waiting = [Waiting(10.0 + i / 100, False, 10) for i in range(25)]
    assert _place(9.0, waiting) == Placement(BATCH.rank, 11.0)
    full = placement(RT, 9.0, 73, waiting, 0, 12, 512, COST, now=11.0, seats=32)
    assert full == Placement(BATCH.rank, pytest.approx(10.19 - 1e-6))


def test_within_a_class_prompts_go_by_their_prefill_finish_tag() -> None:
    """At its class's rank a prompt's key is its arrival plus its own prefill (``own_s``):
    of BATCH prompts of 163 and 47 tokens sent together, the 47 goes first; a 163-token
    prompt sent 0.5 s after a 769-token one goes ahead of it (within the 769's 0.77 s), one
    sent 1.2 s after does not. REALTIME at its rank alike."""

    def key(cls: WorkloadClass, tokens: int, now: float) -> float:
        p = placement(cls, 0.0, tokens, [], 0, 12, 512, COST, now=now, own_s=tokens * 1e-3)
        assert p.priority == cls.rank
        return p.key

    assert key(BATCH, 47, 16.0) < key(BATCH, 163, 16.0)
    assert key(BATCH, 163, 16.0) < key(BATCH, 769, 15.5) < key(BATCH, 163, 16.7)
    assert key(RT, 73, 16.0) == pytest.approx(16.073)


def test_a_prompts_own_prefill_counts_its_output_so_far_and_nothing_before_a_fit() -> None:
    """``prefill_s``: its prompt (and output so far, once preempted) at the fitted cost per
    prompt token; 0 before the node has a fit (its key is then its arrival)."""
    job = _job("b", BATCH, Placement(BATCH.rank, 1.0))
    assert prefill_s(job, None) == 0.0
    assert prefill_s(job, COST) == pytest.approx(len(job.request.prompt_token_ids) * 1e-3)
    job.token_ids.extend([5, 6, 7])
    assert prefill_s(job, COST) == pytest.approx((len(job.request.prompt_token_ids) + 3) * 1e-3)


def test_no_batch_prompt_goes_ahead_of_a_realtime_prompt_placed_among_batch_ones() -> None:
    """A REALTIME prompt placed behind a long BATCH prompt counted on the prompts ahead of
    it: a later short BATCH prompt, whose tag alone would put it first, goes right behind the
    placed one instead; a FINETUNE prompt keeps its tag (its own rank)."""
    waiting = [Waiting(16.269, False, 769), Waiting(16.269 + 1e-6, True, 73)]
    short = placement(BATCH, 0.0, 163, waiting, 0, 12, 512, COST, now=15.7, own_s=0.163)
    assert short == Placement(BATCH.rank, pytest.approx(16.269 + 2e-6))
    ft = placement(FT, 0.0, 163, waiting, 0, 12, 512, COST, now=15.7, own_s=0.163)
    assert ft == Placement(FT.rank, pytest.approx(15.863))


def _seat(rid: str, cls: WorkloadClass, order: float, started: bool, movable: bool = True) -> Seat:
    return Seat(rid, cls.rank, (cls.rank, order), started, movable)


def test_each_held_back_realtime_prompt_takes_the_seat_of_the_latest_lowest_class_stream() -> None:
    """With every seat taken, the REALTIME prompts vLLM holds back (the last of those not
    started, in queue order) each take the seat of a movable lower-class stream: FINETUNE
    before BATCH, the latest in the queue first; none for a seat already being freed."""
    seats = [
        _seat("b-old", BATCH, 1.0, True),
        _seat("b-new", BATCH, 5.0, True),
        _seat("b-kept", BATCH, 6.0, True, movable=False),
        _seat("ft", FT, 2.0, True),
        _seat("rt-run", RT, 3.0, True),
        _seat("rt-1", RT, 7.0, False),
        _seat("rt-2", RT, 8.0, False),
        _seat("b-wait", BATCH, 9.0, False),
    ]
    assert seat_preemptions(seats, 5, 3, 5, set()) == ([("rt-1", "ft"), ("rt-2", "b-new")], [])
    assert seat_preemptions(seats, 5, 3, 5, {"rt-1"}) == ([("rt-2", "ft")], [])
    # a REALTIME prompt not held back is prefilling: it has its seat
    assert seat_preemptions(seats, 5, 2, 5, set()) == ([("rt-2", "ft")], [])
    assert seat_preemptions(seats, 5, 1, 5, set()) == ([], [])
    # a free seat, or nothing waiting: vLLM seats it itself
    assert seat_preemptions(seats, 4, 3, 5, set()) == ([], [])
    assert seat_preemptions(seats, 5, 0, 5, set()) == ([], [])
    # no movable lower-class stream: nothing to preempt
    stuck = [s for s in seats if s.request_id in {"b-kept", "rt-run", "rt-1"}]
    assert seat_preemptions(stuck, 3, 1, 3, set()) == ([], [])


def test_a_stream_gives_its_seat_only_without_stop_strings_or_seeded_sampling_and_with_slack() -> (
    None
):
    """A restart must not change a stream: one with stop strings or seeded sampling keeps its
    seat; so does one whose caller's deadline leaves it under a second of slack after its
    remaining tokens at a full step (1.2 times over) and prefilling its tokens again."""
    greedy = SamplingParams(max_new_tokens=64)
    full = (40, 100)  # 40 tokens left, 100 to prefill again

    def gives(params: SamplingParams, left_s: float, elapsed_s: float = 1.0) -> bool:
        return may_give_seat(params, left_s, elapsed_s, full, COST, 12)

    assert gives(greedy, 0.0)  # no deadline
    assert not gives(SamplingParams(max_new_tokens=64, stop=("\n",)), 0.0)
    assert not gives(SamplingParams(max_new_tokens=64, temperature=0.7, seed=3), 0.0)
    assert gives(SamplingParams(max_new_tokens=64, temperature=0.7), 0.0)
    # need: 1.2 * 40 * (0.1 + 0.01 * 12) + 0.001 * 100 = 10.66 s; slack over 1 s
    assert gives(greedy, 12.7)
    assert not gives(greedy, 12.6)
    assert may_give_seat(greedy, 3.0, 1.0, full, None, 12)  # no fit yet: the time left
    assert not may_give_seat(greedy, 1.9, 1.0, full, None, 12)


def test_the_stat_logger_calls_the_seat_check_after_each_step() -> None:
    stats = VllmStats()
    calls: list[int] = []
    stats.on_step = lambda: calls.append(stats.running)
    stats.record(_stats(3, 0, 50.0), None)
    stats.record(None, None)
    assert calls == [3]


def test_the_prefix_hit_ratio_weighs_the_last_new_prompts_by_their_length() -> None:
    """Cached over prompt tokens of the last ``window`` new prompts (0 before any; a count
    past the prompt is the prompt)."""
    hits = PrefixHits(window=3)
    assert hits.ratio() == 0.0
    hits.observe(100, 0)
    hits.observe(300, 256)
    assert hits.ratio() == pytest.approx(256 / 400)
    hits.observe(100, 500)
    hits.observe(0, 0)  # nothing to count
    assert hits.ratio() == pytest.approx(356 / 500)
    hits.observe(500, 0)  # the first prompt leaves the window
    assert hits.ratio() == pytest.approx(356 / 900)


def test_placement_keeps_the_calibrated_margin_and_none_uncalibrated() -> None:
    """The first token predicted at the chosen place comes with it; the budget less the
    calibration margin decides the place, and with no calibration yet a REALTIME prompt
    goes ahead of the BATCH prompts as without a budget."""
    waiting = [Waiting(10.0, False, 400), Waiting(10.5, False, 600)]
    behind_both = placement(RT, 2.5, 73, waiting, 0, 12, 512, COST, now=11.0)
    assert behind_both == Placement(BATCH.rank, 11.0)
    assert behind_both.predicted_s == pytest.approx(2.26512)
    tight = placement(RT, 2.5, 73, waiting, 0, 12, 512, COST, now=11.0, margin_s=0.5)
    assert tight == Placement(BATCH.rank, pytest.approx(10.5 - 1e-6))
    assert tight.predicted_s == pytest.approx(1.41 + 0.00012, abs=0.01)
    first = placement(RT, 2.5, 73, waiting, 0, 12, 512, COST, now=11.0, margin_s=None)
    assert first == Placement(RT.rank, 11.0)
    assert first.predicted_s == pytest.approx(1.013, abs=0.01)
    assert placement(BATCH, 2.5, 73, waiting, 0, 12, 512, COST, now=11.0).predicted_s == 0.0


def test_calibration_is_the_90th_percentile_lateness_of_recent_queued_first_tokens() -> None:
    """Only first tokens predicted half a second or more count; none until eight are recent,
    and those older than a minute drop out; a first token earlier than predicted pads
    nothing."""
    cal = FirstTokenCalibration()
    for i in range(7):
        cal.record(float(i), 1.0, 1.0 + 0.1 * i)
    cal.record(7.0, 0.3, 3.0)  # a step or two: not a queue's error
    assert cal.margin(8.0) is None
    cal.record(8.0, 1.0, 0.5)
    assert cal.margin(8.0) == pytest.approx(0.6)  # 8 samples: the 8th smallest of -0.5..0.6
    for i in range(60):
        cal.record(9.0 + i / 10, 1.0, 0.2)
    assert cal.margin(19.0) == 0.0
    assert cal.margin(200.0) is None


def test_a_realtime_prompt_placed_behind_held_back_batch_is_lifted_not_given_a_seat() -> None:
    """A freed seat goes to the first prompt vLLM holds back: a REALTIME prompt placed among
    BATCH ones (BATCH's priority) behind a held-back BATCH prompt would not get it, so none
    is freed for it: it goes back at REALTIME's rank; one ahead of every held-back BATCH
    prompt gets one."""
    seats = [
        _seat("b-run", BATCH, 1.0, True),
        Seat("b-wait", BATCH.rank, (BATCH.rank, 4.0), False),
        Seat("rt-placed", RT.rank, (BATCH.rank, 5.0), False),
    ]
    assert seat_preemptions(seats, 1, 2, 1, set()) == ([], ["rt-placed"])
    ahead = [*seats[:1], Seat("rt-placed", RT.rank, (BATCH.rank, 3.0), False), seats[1]]
    assert seat_preemptions(ahead, 1, 2, 1, set()) == ([("rt-placed", "b-run")], [])


def _job(rid: str, cls: WorkloadClass, place: Placement, started: bool = False) -> Job:
    request = EngineRequest(rid, (1, 2, 3), SamplingParams(max_new_tokens=8))
    job = Job(request, cls, 0, asyncio.new_event_loop(), place=place)
    job.started = started
    return job


def test_a_preempted_stream_goes_back_behind_realtime_prompts_placed_among_batch() -> None:
    """A preempted BATCH stream keeps its place unless a REALTIME prompt placed among BATCH
    ones waits behind it (that prompt counted on the prompts ahead of it): then it goes right
    behind the last such prompt, before the next waiting prompt."""
    band = BATCH.rank
    victim = _job("v", BATCH, Placement(band, 1.0))
    others = [
        _job("rt-placed", RT, Placement(band, 3.0)),
        _job("b-next", BATCH, Placement(band, 4.0)),
        _job("rt-started", RT, Placement(band, 9.0), started=True),
        _job("rt-front", RT, Placement(RT.rank, 8.0)),
    ]
    assert resumed_place(victim, [victim, *others]) == Placement(band, 3.5)
    assert resumed_place(victim, [victim, *others[:1]]) == Placement(band, 3.0 + 1e-6)
    assert resumed_place(victim, [victim, *others[1:]]) == victim.place
    late = _job("late", BATCH, Placement(band, 5.0))
    assert resumed_place(late, [late, *others]) == late.place
    for job in (victim, late, *others):
        job.loop.close()


def test_a_stream_cut_inside_a_character_restarted_thrice_or_realtime_keeps_its_seat() -> None:
    """Only a running lower-class stream gives its seat, and not when its last ids decode to
    a trailing U+FFFD (vLLM holds those bytes back) or it was restarted three times."""

    def movable(job: Job, text: str = "ok") -> bool:
        return seat(job, (job.workload_class.rank, 1.0), 0.0, 12, COST, lambda _ids: text).movable

    batch = _job("b", BATCH, Placement(BATCH.rank, 1.0), started=True)
    batch.token_ids.extend([5, 6])
    assert movable(batch)
    assert not movable(batch, "ok \ufffd")
    waiting = _job("w", BATCH, Placement(BATCH.rank, 1.0))
    realtime = _job("r", RT, Placement(RT.rank, 1.0), started=True)
    assert not movable(waiting)
    assert not movable(realtime)
    batch.restarts, batch.pauses = 3, 1  # a pause is no seat restart
    assert movable(batch)
    batch.pauses = 0
    assert not movable(batch)
    for job in (batch, waiting, realtime):
        job.loop.close()


def test_the_load_counts_begun_prefills_and_held_realtime_prompts_ahead_of_a_realtime_one() -> None:
    """Of the requests not yet at their first token, those vLLM does not hold back are being
    prefilled (it runs them before any waiting prompt, whatever their class): a REALTIME
    one's prompt counts ahead of a REALTIME prompt whole, lower-class ones at most the step
    under way (a REALTIME prompt sends the rest back). Of the held ones only those at
    REALTIME's rank count; a REALTIME prompt placed among BATCH ones does not, nor does a
    running stream (its prompt is done). A preempted one prefills its output again."""
    band = BATCH.rank
    streaming = _job("s", RT, Placement(RT.rank, 1.0), started=True)
    begun = _job("b-begun", BATCH, Placement(band, 2.0))
    begun_ft = _job("f-begun", FT, Placement(FT.rank, 2.0))
    begun_rt = _job("rt-begun", RT, Placement(RT.rank, 2.5))
    held_rt = _job("rt-held", RT, Placement(RT.rank, 3.0))
    held_rt.token_ids.extend([4, 5])  # preempted after two tokens
    placed = _job("rt-placed", RT, Placement(band, 4.0))
    held_batch = _job("b-held", BATCH, Placement(band, 5.0))
    jobs = [streaming, begun, begun_ft, begun_rt, held_rt, placed, held_batch]
    running, waiting, queued, ahead = load(jobs, {id(j) for j in jobs[4:]}, 512)
    assert ahead == 3 + (3 + 2) + (3 + 3)
    assert load(jobs, {id(j) for j in jobs[4:]}, 4)[3] == 3 + (3 + 2) + 4
    assert load(jobs, {id(j) for j in jobs[4:]})[3] == ahead  # no pauses: whole, uncapped
    assert running == {RT: 2, BATCH: 1, FT: 1} and waiting == {RT: 2, BATCH: 1, FT: 0}
    assert queued == 8 * 4 + (5 + 6) + (3 + 8) + (3 + 8)
    for job in jobs:
        job.loop.close()


def test_the_prompts_paused_for_a_realtime_one_are_the_lower_class_ones_vllm_may_prefill() -> None:
    """After step 5 vLLM reported one request waiting: of the prompts sent before it, the last
    in queue order is held back, the others (a BATCH and a FINETUNE one) may be prefilling;
    one sent since may be too. Each prompt (3 tokens) outlasts a step of 2 tokens; with steps
    of 3 none would, and none is paused. A REALTIME prompt, a stream and a prompt already being sent
    back are never paused (nor one not sent yet, or sent back since those stats), and a paused
    prompt still counts as new and waiting."""
    band = BATCH.rank
    stream = _job("s", BATCH, Placement(band, 0.5), started=True)
    first = _job("b1", BATCH, Placement(band, 1.0))
    second = _job("f", FT, Placement(FT.rank, 0.2))
    held = _job("f-late", FT, Placement(FT.rank, 0.9))
    rt = _job("rt", RT, Placement(RT.rank, 3.0))
    resent = _job("b0", BATCH, Placement(band, 0.1))
    resent.preempted = True
    fresh = _job("b2", BATCH, Placement(band, 2.0))
    unsent = _job("b3", BATCH, Placement(band, 0.3))
    jobs = [stream, fresh, second, rt, first, resent, held, unsent]
    for job in jobs:
        job.sent_step = 6 if job is fresh else 4
        job.run = None if job is unsent else job.loop.create_future()  # type: ignore[assignment]
    order = lambda j: (j.place.priority, j.place.key)  # noqa: E731
    assert begun_below(jobs, 1, 5, 2, order) == [first, fresh, second]
    assert begun_below(jobs, 3, 5, 2, order) == [fresh]
    assert begun_below(jobs, 1, 5, 3, order) == []  # each ends within a step of 3 tokens
    fresh.paused_at = 5  # sent back since step 5's stats: not again
    assert begun_below(jobs, 3, 5, 2, order) == []
    first.restarts = first.pauses = 3
    assert first.new_and_waiting
    for job in jobs:
        job.loop.close()
