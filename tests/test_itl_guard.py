"""The inter-token guard (:mod:`sluice.itl`): the batch a fitted step time allows for a step
budget, and the scheduler's per-class count of it on a node (:class:`LoadBook`)."""

from __future__ import annotations

import math

from bench.slo.cli import GUARD_OFF
from scheduler.config import SchedulerSettings, embed_targets, step_budgets, ttft_targets
from scheduler.routing import LoadBook
from sluice.contract import WorkloadClass
from sluice.itl import batch_limit, fitted_limit, tightest
from sluice.runtime.settings import parse_settings
from sluice.v1 import common_pb2

RT, BATCH = WorkloadClass.REALTIME, WorkloadClass.BATCH
FIT = common_pb2.StepCost(model="m", base_s=0.04, per_sequence_s=0.005, samples=64)
"""40 ms a step plus 5 ms a sequence."""
BUDGETS = {RT: 0.08, BATCH: 0.2, WorkloadClass.FINETUNE: 0.4}


def test_the_batch_is_the_most_sequences_whose_predicted_step_fits_the_budget() -> None:
    assert batch_limit(0.04, 0.005, 0.08) == 8
    assert batch_limit(0.04, 0.005, 0.0799) == 7
    assert batch_limit(0.2, 0.005, 0.08) == 1  # a sequence alone always runs
    assert batch_limit(0.04, 0.0, 0.08) is None  # a step that does not grow: no limit
    for unset in (0.0, -1.0, math.nan, math.inf):
        assert batch_limit(0.04, 0.005, unset) is None
    assert tightest([0.0, 0.2, math.nan, 0.08, math.inf, -3.0]) == 0.08
    assert tightest([]) == 0.0
    assert fitted_limit(None, [0.08]) is None
    assert fitted_limit(FIT, [0.2, 0.08]) == 8


def test_settings_give_each_class_its_target_times_the_step_share() -> None:
    budgets = step_budgets(SchedulerSettings(realtime_itl_target_seconds=0.1, itl_step_share=0.5))
    assert math.isclose(budgets[RT], 0.05) and math.isclose(budgets[BATCH], 0.5)
    assert step_budgets(SchedulerSettings(realtime_itl_target_seconds=0))[RT] == 0


def test_without_a_fitted_step_only_the_slots_count() -> None:
    book = LoadBook(max_sequences=32)
    assert book.capacity(RT, 0.125, BUDGETS) == 32
    book.on_report(0, 0, 0, 0, 0.0, steps=[FIT])
    assert book.capacity(RT, 0.125, BUDGETS) == 8
    book.on_report(0, 0, 0, 0, 0.0)  # a report without a fit (a restarted node)
    assert book.capacity(RT, 0.125, BUDGETS) == 32


def test_batch_fills_to_its_looser_target_only_where_realtime_does_not_run() -> None:
    """REALTIME counts its own sequences against its own budget (the node preempts BATCH for
    it); BATCH gets its looser batch on a node without REALTIME, REALTIME's beside it."""
    book = LoadBook(max_sequences=64)
    book.on_report(0, 0, 0, 0, 0.0, steps=[FIT])
    assert book.capacity(BATCH, 0.125, BUDGETS) == 32  # (0.2 - 0.04) / 0.005
    for _ in range(20):
        book.on_dispatch(10, BATCH)
    assert book.has_room(BATCH, 0.125, budgets=BUDGETS)
    assert book.has_room(RT, 0.125, budgets=BUDGETS)  # 0 REALTIME of its 8
    book.on_dispatch(10, RT)
    assert book.capacity(BATCH, 0.125, BUDGETS) == 8
    assert not book.has_room(BATCH, 0.125, budgets=BUDGETS)  # 21 > REALTIME's 8
    for _ in range(7):
        book.on_dispatch(10, RT)
    assert not book.has_room(RT, 0.125, budgets=BUDGETS)
    assert book.has_room(RT, 0.125)  # without budgets: slots alone


def test_the_costliest_fit_of_a_report_counts() -> None:
    book = LoadBook(max_sequences=64)
    cheap = common_pb2.StepCost(model="e", base_s=0.001, per_sequence_s=0.0001)
    book.on_report(0, 0, 0, 0, 0.0, steps=[cheap, FIT])
    assert book.capacity(RT, 0.125, BUDGETS) == 8


def test_the_scheduler_command_line_turns_the_guard_off() -> None:
    """What ``bench.slo``'s reference suite passes (`sluice up`'s ``scheduler_args``)."""
    settings = parse_settings(SchedulerSettings, GUARD_OFF, "scheduler")
    assert set(step_budgets(settings).values()) == {0.0}
    assert set(ttft_targets(settings).values()) == {0.0}
    assert set(embed_targets(settings).values()) == {0.0}


def test_a_report_keeps_each_models_fit_for_its_prefill() -> None:
    """The batch limit counts the costliest fit of a report; a model's prompt is priced by
    its own fit, from the last report only."""
    book = LoadBook(max_sequences=64)
    cheap = common_pb2.StepCost(model="e", base_s=0.001, per_sequence_s=0.0001)
    book.on_report(0, 0, 0, 0, 0.0, steps=[cheap, FIT])
    assert book.step is FIT
    assert book.fits["e"] is cheap and book.fits[FIT.model] is FIT
    book.on_report(0, 0, 0, 0, 0.0, steps=[FIT])  # a model the node stopped fitting is gone
    assert "e" not in book.fits and book.step is FIT
