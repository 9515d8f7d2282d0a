"""vLLM's scheduler with each step's prompt tokens capped to keep decoding streams at their pace.

vLLM fills every step with prompt chunks up to its token budget (``max_num_batched_tokens``)
beside the decoding streams. :class:`PacedScheduler` lowers that budget for one step while
some stream has no slack left for a full chunk step (:mod:`inference_node.engine.pace`): the
step carries the decode rows plus as many prompt tokens as the tightest stream's allowance
leaves by the step time this scheduler fits from its own steps (seconds from ``schedule`` to
the end of ``update_from_output``, against decode rows and prompt tokens: a
:class:`~inference_node.engine.step_model.StepModel` without its median clip, which halves
the cost of a chunk). Prompts of the tightest stream's class or a higher one are not held
back for it: their first tokens were priced at full steps by the scheduler that admitted them.

Each request's pace comes in ``SamplingParams.extra_args[PACE_KEY]`` (:func:`pace_args`, from
the node's ``step_budget_s``): its budget a token, token limit, whether its length is exact,
and, for a stream sent again after a preemption, its first token's time and the tokens it had
made. Imported by qualified name in vLLM's engine-core process
(``AsyncEngineArgs.scheduler_cls``), never by the node itself.
"""

from __future__ import annotations

import math
import time
from typing import Any

import structlog
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # type: ignore[import-not-found]
from vllm.v1.core.sched.scheduler import Scheduler  # type: ignore[import-not-found]

from inference_node.engine.pace import (
    FLOOR_TOKENS,
    HORIZON_TOKENS,
    PACE_KEY,
    Pace,
    pace_from_args,
    prompt_token_cap,
)
from inference_node.engine.step_model import StepModel

log = structlog.get_logger(__name__)

LOG_EVERY = 200
"""Capped steps between two ``pace_capped`` log lines."""


def _pace(request: Any) -> Pace | None:
    extra = getattr(request.sampling_params, "extra_args", None) or {}
    return pace_from_args(extra.get(PACE_KEY))


class PaceMixin:
    """The cap (module doc), over vLLM's ``Scheduler`` or ``AsyncScheduler``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._full_tokens = int(self.max_num_scheduled_tokens)  # type: ignore[attr-defined]
        self._paces: dict[str, Pace] = {}
        self._fit = StepModel(window=256, clip=math.inf)
        self._started = 0.0
        self._capped = 0

    def _pace_of(self, request: Any) -> Pace | None:
        pace = self._paces.get(request.request_id)
        if pace is None:
            pace = _pace(request)
            if pace is not None:
                self._paces[request.request_id] = pace
        return pace

    def _budget(self, now: float) -> int:
        """Tokens for the step about to be scheduled (module doc)."""
        running = list(self.running)  # type: ignore[attr-defined]
        decoding = [r for r in running if r.num_output_tokens > 0 and not r.is_prefill_chunk]
        decoding_ids = {r.request_id for r in decoding}
        cost = self._fit.cost
        if cost is None or not decoding:
            return self._full_tokens
        rows = len(decoding)
        decode_s = cost.predict(rows)
        worst, rank = math.inf, None
        for r in decoding:
            pace = self._pace_of(r)
            if pace is None:
                continue
            a = pace.allowance(r.num_output_tokens, now, decode_s, HORIZON_TOKENS)
            if a < worst:
                worst, rank = a, r.priority
        full = self._full_tokens - rows
        cap = prompt_token_cap(cost, rows, worst, full, min(FLOOR_TOKENS, full))
        if cap >= full or rank is None:
            return self._full_tokens
        waiting = list(self.waiting)  # type: ignore[attr-defined]
        ahead = sum(
            r.num_tokens - r.num_computed_tokens
            for r in [*running, *waiting]
            if r.priority <= rank and r.request_id not in decoding_ids
        )
        cap = min(full, max(cap, int(ahead)))
        self._capped += 1
        if self._capped % LOG_EVERY == 1:
            log.info(
                "pace_capped", steps=self._capped, tokens=cap, rows=rows,
                allowance_ms=round(worst * 1000, 1),
            )  # fmt: skip
        return rows + cap

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        self.max_num_scheduled_tokens = self._budget(now)
        try:
            out = super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.max_num_scheduled_tokens = self._full_tokens
        self._started = now
        return out

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        now = time.monotonic()
        scheduled: dict[str, int] = scheduler_output.num_scheduled_tokens
        requests: dict[str, Any] = self.requests  # type: ignore[attr-defined]
        rows = 0
        for rid, tokens in scheduled.items():
            request = requests.get(rid)
            decoding = tokens == 1
            rows += decoding
            if request is None:
                continue
            pace = self._pace_of(request)
            if pace is not None and pace.first_at is None and request.num_output_tokens > 0:
                self._paces[rid] = Pace(
                    pace.budget_s, pace.max_tokens, pace.exact, now, pace.done_before
                )
        total = scheduler_output.total_num_scheduled_tokens
        if self._started and total:
            self._fit.observe(now - self._started, rows, total - rows)
        for rid in [rid for rid in self._paces if rid not in requests]:
            del self._paces[rid]
        return outputs


class PacedScheduler(PaceMixin, Scheduler):  # type: ignore[misc]
    """vLLM's scheduler with the cap (module doc)."""


class PacedAsyncScheduler(PaceMixin, AsyncScheduler):  # type: ignore[misc]
    """vLLM's asynchronous scheduler (GPU platforms) with the cap (module doc)."""
