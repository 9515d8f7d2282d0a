"""How many prompt tokens a step may carry and still keep every decoding stream at its pace.

The SLO a stream is held to is its *mean* time per output token. A step that prefills a full
chunk beside the streams (0.5-0.7 s for 512 tokens on this CPU) costs a long stream little of
that mean, but a short one a lot: a 14-token REALTIME stream beside three such steps misses a
0.25-s mean. So a stream's pace is a budget of time, spent as it goes. A stream that must
produce ``n`` tokens at ``budget_s`` a token has ``budget_s × (n − 1)`` from its first token to
its last. What it has not spent yet, less plain decode steps for every token after the next,
is the longest the next step may take (:meth:`Pace.allowance`). When the tightest allowance
among the streams is shorter than a full step, the step carries only as many prompt tokens as
the fitted step time leaves room for (:func:`prompt_token_cap`), at least ``floor``: prompts
slow down only while a stream has no slack left for them.

``n`` is the stream's token limit when its length is known (``ignore_eos``: it produces
exactly that many), else the tokens so far plus ``horizon``: the stream may end soon, so only
the slack it has already saved, and a short look ahead, are spent.

Used in vLLM's engine-core process by :mod:`inference_node.engine.vllm_pace`; pure so that it
is tested without vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from inference_node.engine.step_model import StepCost

PACE_KEY = "sluice_pace"
"""The key of a request's pace in vLLM's ``SamplingParams.extra_args`` (:func:`pace_args`)."""
HORIZON_TOKENS = 4
"""Tokens looked ahead for a stream of unknown length (module doc)."""
FLOOR_TOKENS = 64
"""Fewest prompt tokens a step carries while prompts wait, however tight the pace: prompts
always move (64 tokens add about 0.07 s to a step at the 1.06-1.3 ms a prompt token of
docs/decisions/node-step-fit-clip.md)."""


@dataclass(frozen=True)
class Pace:
    """A stream's pace: ``budget_s`` a token on average from its first token to its last."""

    budget_s: float
    max_tokens: int
    exact: bool
    """It produces exactly ``max_tokens`` (no EOS, no stop strings): its length is known."""
    rank: int = 0
    """Its class's rank (REALTIME 0): prompts of this class or a higher one are not held back
    for it."""
    first_at: float | None = None
    """When its first token came (monotonic seconds; None until then)."""
    done_before: int = 0
    """Tokens it produced before this engine request (a preempted stream sent again)."""

    def allowance(self, produced: int, now: float, decode_s: float, horizon: int) -> float:
        """The longest the next step may take (seconds; ``inf`` when the stream sets no
        limit) for this stream, ``produced`` tokens into this engine request, to keep its
        pace with plain decode steps of ``decode_s`` after it."""
        if self.first_at is None or not 0 < self.budget_s < math.inf:
            return math.inf
        so_far = self.done_before + produced
        total = self.max_tokens if self.exact else min(self.max_tokens, so_far + horizon)
        if total <= so_far:
            return math.inf
        spent = now - self.first_at
        after_next = total - so_far - 1
        return self.budget_s * (total - 1) - spent - after_next * decode_s


def prompt_token_cap(
    cost: StepCost | None, rows: int, allowance_s: float, full: int, floor: int
) -> int:
    """Prompt tokens a step decoding ``rows`` streams may carry within ``allowance_s`` by
    ``cost``: ``full`` when the allowance sets no limit or there is no fit, never under
    ``floor``."""
    if cost is None or not cost.per_prefill_token_s > 0 or allowance_s == math.inf:
        return full
    room = (allowance_s - cost.predict(rows)) / cost.per_prefill_token_s
    return max(floor, min(full, math.floor(room)))


def pace_args(
    budget_s: float, max_tokens: int, exact: bool, rank: int, first_at: float | None, done: int
) -> dict[str, float | int | bool] | None:
    """What :class:`Pace` a request carries to vLLM's scheduler (``extra_args[PACE_KEY]``);
    None when it has no budget."""
    if not 0 < budget_s < math.inf:
        return None
    return {
        "budget_s": budget_s,
        "max_tokens": max_tokens,
        "exact": exact,
        "rank": rank,
        "first_at": first_at or 0.0,
        "done": done,
    }


def pace_from_args(args: dict[str, float | int | bool] | None) -> Pace | None:
    """The :class:`Pace` of :func:`pace_args`' dict (None for none)."""
    if not args:
        return None
    first = float(args["first_at"])
    return Pace(
        budget_s=float(args["budget_s"]),
        max_tokens=int(args["max_tokens"]),
        exact=bool(args["exact"]),
        rank=int(args["rank"]),
        first_at=first if first > 0 else None,
        done_before=int(args["done"]),
    )
