"""The pace cap on vLLM's steps (inference_node/engine/pace.py): how long the next step may take
for a stream to keep its mean time per token, and how many prompt tokens that leaves."""

from __future__ import annotations

import math

import pytest

from inference_node.engine.pace import (
    FLOOR_TOKENS,
    Pace,
    pace_args,
    pace_from_args,
    prompt_token_cap,
)
from inference_node.engine.step_model import StepCost

# A decode step of 0.05 s + 1 ms a row, 1.2 ms a prompt token: a 512-token chunk beside 10
# rows takes 0.67 s, as vLLM's CPU engine's steps do.
COST = StepCost(base_s=0.05, per_sequence_s=0.001, per_prefill_token_s=0.0012, samples=64)


def test_a_short_stream_of_known_length_spends_its_slack_then_caps() -> None:
    pace = Pace(budget_s=0.16, max_tokens=14, exact=True, first_at=100.0)
    decode = COST.predict(10)  # 0.06 s
    # Just after its first token: 13 x 0.16 = 2.08 s for 13 tokens, 12 of them after the next.
    fresh = pace.allowance(1, 100.0, decode, horizon=16)
    assert fresh == pytest.approx(2.08 - 12 * decode)
    assert fresh > COST.predict(10, 512)  # a full chunk step still fits
    # Two full chunk steps later it has no room for a third.
    late = pace.allowance(3, 100.0 + 2 * COST.predict(10, 512), decode, horizon=16)
    assert late < COST.predict(10, 512)
    # 0.13 s: room for 59 prompt tokens beside the rows, under the floor.
    assert prompt_token_cap(COST, 10, late, full=502, floor=FLOOR_TOKENS) == FLOOR_TOKENS
    # With more room the cap is the most tokens whose step fits it.
    tokens = prompt_token_cap(COST, 10, 0.3, full=502, floor=FLOOR_TOKENS)
    assert COST.predict(10, tokens) <= 0.3 < COST.predict(10, tokens + 1)


def test_a_long_stream_has_slack_for_full_steps() -> None:
    pace = Pace(budget_s=0.16, max_tokens=200, exact=True, first_at=0.0)
    # 50 tokens in at 0.07 s each: 4.5 s saved, far more than a chunk step costs.
    allowance = pace.allowance(50, 49 * 0.07, COST.predict(10), horizon=16)
    assert allowance > 4.0
    assert prompt_token_cap(COST, 10, allowance, full=502, floor=64) == 502


def test_unknown_length_spends_only_what_was_saved_and_a_short_look_ahead() -> None:
    known = Pace(budget_s=0.16, max_tokens=500, exact=True, first_at=0.0)
    unknown = Pace(budget_s=0.16, max_tokens=500, exact=False, first_at=0.0)
    decode = COST.predict(10)
    # Just after its first token it may end at its fifth: four tokens' worth, three after
    # the next, no more than a short step.
    fresh = unknown.allowance(1, 0.0, decode, horizon=4)
    assert fresh == pytest.approx(0.16 * 4 - 3 * decode)
    assert fresh < known.allowance(1, 0.0, decode, 4)
    assert prompt_token_cap(COST, 10, fresh, full=502, floor=64) < 502
    # What it saved running fast is spent: 40 tokens at 0.06 s leave 4 s for the next step.
    assert unknown.allowance(40, 39 * 0.06, decode, 4) > 3.9
    # A stream that ran slow has no slack: the step may take only the floor's tokens.
    behind = unknown.allowance(20, 19 * 0.3, decode, horizon=4)
    assert behind < decode
    assert prompt_token_cap(COST, 10, behind, full=502, floor=64) == 64


def test_no_limit_before_the_first_token_without_a_budget_or_a_fit() -> None:
    decode = COST.predict(10)
    assert Pace(0.16, 14, True).allowance(0, 5.0, decode, 16) == math.inf
    assert Pace(0.0, 14, True, first_at=1.0).allowance(3, 5.0, decode, 16) == math.inf
    assert Pace(0.16, 14, True, first_at=1.0).allowance(14, 5.0, decode, 16) == math.inf
    assert prompt_token_cap(None, 10, 0.1, full=502, floor=64) == 502
    assert prompt_token_cap(COST, 10, math.inf, full=502, floor=64) == 502


def test_a_preempted_stream_keeps_its_first_token_and_tokens_made() -> None:
    args = pace_args(0.16, 40, True, 1, first_at=12.5, done=9)
    assert args is not None
    pace = pace_from_args(args)
    assert pace == Pace(0.16, 40, True, rank=1, first_at=12.5, done_before=9)
    # Sent again with 9 tokens made: its first new token is its 10th.
    assert pace.allowance(1, 14.0, 0.06, 16) == pytest.approx(0.16 * 39 - 1.5 - 29 * 0.06)
    assert pace_from_args(pace_args(0.16, 40, False, 0, None, 0)) == Pace(0.16, 40, False)
    assert pace_args(0.0, 40, True, 0, None, 0) is None
    assert pace_from_args(None) is None
