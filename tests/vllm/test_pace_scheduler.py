"""The pace cap inside vLLM's scheduler (``inference_node/engine/vllm_pace.py``), on a stand-in
for vLLM's scheduler state: which token budget a step gets from the streams running and the
prompts waiting, and that vLLM's budget is restored after each step. The engine itself runs
it in ``test_vllm_node.py``; here no engine is started."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from inference_node.engine.pace import FLOOR_TOKENS, PACE_KEY, pace_args
from inference_node.engine.step_model import StepCost
from inference_node.engine.vllm_pace import PaceMixin

FULL = 512
COST = StepCost(base_s=0.05, per_sequence_s=0.001, per_prefill_token_s=0.0012, samples=64)


@dataclass
class FakeRequest:
    request_id: str
    priority: int
    num_tokens: int
    num_computed_tokens: int
    num_output_tokens: int = 0
    is_prefill_chunk: bool = False
    pace: dict[str, Any] | None = None
    sampling_params: Any = field(init=False)

    def __post_init__(self) -> None:
        extra = {PACE_KEY: self.pace} if self.pace else None
        self.sampling_params = SimpleNamespace(extra_args=extra)


class FakeScheduler:
    """What ``PaceMixin`` reads of vLLM's ``Scheduler``; ``schedule`` records the budget."""

    def __init__(self) -> None:
        self.max_num_scheduled_tokens = FULL
        self.running: list[FakeRequest] = []
        self.waiting: list[FakeRequest] = []
        self.requests: dict[str, FakeRequest] = {}
        self.budgets: list[int] = []

    def schedule(self) -> Any:
        self.budgets.append(self.max_num_scheduled_tokens)
        return SimpleNamespace(num_scheduled_tokens={}, total_num_scheduled_tokens=0)

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        return {}


class Paced(PaceMixin, FakeScheduler):
    pass


def stream(rid: str, rank: int, made: int, tokens: int, first_at: float) -> FakeRequest:
    """A decoding stream of class ``rank`` and exactly ``tokens`` tokens, ``made`` so far."""
    pace = pace_args(0.16, tokens, True, rank, first_at, 0)
    return FakeRequest(rid, rank, 100 + made, 100 + made - 1, made, pace=pace)


def prompt(rid: str, rank: int, tokens: int, priority: int | None = None) -> FakeRequest:
    """A prompt of class ``rank`` (at vLLM ``priority``: its rank unless placed)."""
    pace = pace_args(0.16 if rank == 0 else 0.8, 50, True, rank, None, 0)
    return FakeRequest(rid, rank if priority is None else priority, tokens, 0, pace=pace)


def scheduler_with(*running: FakeRequest, waiting: tuple[FakeRequest, ...] = ()) -> Paced:
    s = Paced()
    s._fit.cost = COST
    s.running, s.waiting = list(running), list(waiting)
    s.requests = {r.request_id: r for r in [*running, *waiting]}
    return s


def test_a_stream_with_slack_leaves_the_full_budget() -> None:
    now = time.monotonic()
    s = scheduler_with(stream("rt", 0, 2, 200, now - 0.1), waiting=(prompt("b", 1, 800),))
    s.schedule()
    assert s.budgets == [FULL]
    assert s.max_num_scheduled_tokens == FULL


def test_a_short_stream_out_of_slack_caps_lower_class_prompts() -> None:
    # 5 of 14 tokens made in 1.8 s: 13 x 0.16 = 2.08 s allowed, 8 plain steps still to come.
    now = time.monotonic()
    rows = [stream("rt", 0, 5, 14, now - 1.8), stream("b0", 1, 40, 300, now - 3.0)]
    s = scheduler_with(*rows, waiting=(prompt("b", 1, 800),))
    s.schedule()
    (budget,) = s.budgets
    assert budget == len(rows) + FLOOR_TOKENS  # no room: the floor
    assert s.max_num_scheduled_tokens == FULL  # restored for vLLM's own checks


def test_prompts_of_the_streams_class_are_not_held_back_for_it() -> None:
    now = time.monotonic()
    rt = stream("rt", 0, 5, 14, now - 1.8)
    s = scheduler_with(rt, waiting=(prompt("r2", 0, 300), prompt("b", 1, 800)))
    s.schedule()
    assert s.budgets == [1 + 300]  # the REALTIME prompt whole, nothing for BATCH beyond it


def test_a_batch_stream_out_of_slack_does_not_hold_back_realtime_prompts() -> None:
    now = time.monotonic()
    slow = stream("b0", 1, 40, 60, now - 9.0)
    s = scheduler_with(slow, waiting=(prompt("r", 0, 200), prompt("f", 2, 900)))
    s.schedule()
    assert s.budgets == [1 + 200]


def test_a_realtime_stream_out_of_slack_caps_even_beside_a_slower_batch_stream() -> None:
    # The BATCH stream is further behind its own pace, which exempts BATCH prompts for it;
    # the REALTIME stream's cap still holds them back.
    now = time.monotonic()
    rt, slow = stream("rt", 0, 5, 14, now - 1.8), stream("b0", 1, 40, 60, now - 9.0)
    s = scheduler_with(rt, slow, waiting=(prompt("b", 1, 800),))
    s.schedule()
    assert s.budgets == [2 + FLOOR_TOKENS]


def test_a_placed_realtime_prompt_counts_by_its_class_not_its_vllm_priority() -> None:
    # A REALTIME stream placed among BATCH prompts runs at BATCH's priority: its class
    # decides which prompts are held back for it, and a placed REALTIME prompt is not.
    now = time.monotonic()
    placed = stream("rt", 0, 5, 14, now - 1.8)
    placed.priority = 1
    waiting = (prompt("r2", 0, 120, priority=1), prompt("b", 1, 800))
    s = scheduler_with(placed, waiting=waiting)
    s.schedule()
    assert s.budgets == [1 + 120]


def test_the_first_token_starts_the_pace_and_ended_requests_are_forgotten() -> None:
    s = scheduler_with()
    fresh = FakeRequest("rt", 0, 101, 100, 1, pace=pace_args(0.16, 14, True, 0, None, 0))
    s.requests = {"rt": fresh}
    out = SimpleNamespace(num_scheduled_tokens={"rt": 100}, total_num_scheduled_tokens=100)
    s.update_from_output(out, None)
    assert s._paces["rt"].first_at is not None
    s.requests = {}
    s.update_from_output(
        SimpleNamespace(num_scheduled_tokens={}, total_num_scheduled_tokens=0), None
    )
    assert "rt" not in s._paces
