"""vLLM's scheduler with each step's prompt tokens capped to keep decoding streams at their pace.

vLLM fills every step with prompt chunks up to its token budget (``max_num_batched_tokens``)
beside the decoding streams. :class:`PacedScheduler` lowers that budget for one step while
some stream has no slack left for a full chunk step (:mod:`inference_node.engine.pace`): the
step carries the decode rows plus as many prompt tokens as the tightest stream's allowance
leaves by the step time this scheduler fits from its own steps (seconds from ``schedule`` to
the end of ``update_from_output``, against decode rows and prompt tokens: a
:class:`~inference_node.engine.step_model.StepModel` without its median clip, which halves
the cost of a chunk). Prompts of a stream's class or a higher one are not held back for it:
their first tokens were priced at full steps by the scheduler that admitted them. vLLM
schedules the requests it runs before those waiting, so a lower-class prefill it has begun
goes first; with prefix caching the node sends those back before a REALTIME prompt
(``vllm_jobs.pause_prefills``).

Each request's pace comes in ``SamplingParams.extra_args[PACE_KEY]`` (:func:`pace_args`, from
the node's ``step_budget_s``): its budget a token, token limit, whether its length is exact,
its class's rank (which decides the prompts not held back for it, rather than vLLM's priority:
a REALTIME prompt placed among BATCH ones runs at BATCH's), and, for a stream sent again after
a preemption, its first token's time and the tokens it had made. Imported by qualified name in
vLLM's engine-core process (``AsyncEngineArgs.scheduler_cls``), never by the node itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
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

log = structlog.wrap_logger(
    structlog.PrintLogger(),
    processors=[
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.JSONRenderer(),
    ],
)
"""JSON lines as the node's own (structlog is not configured in vLLM's engine-core process)."""

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
        self._paces: dict[str, Pace | None] = {}
        """Each request's pace, parsed once (None: it carries none)."""
        self._fit = StepModel(window=256, clip=math.inf)
        self._starts: dict[int, float] = {}
        """When each step in flight was scheduled, by its output's id (the asynchronous
        scheduler schedules the next step before the last one's output comes back)."""
        self._last_done = 0.0
        """When the last step's output came back: a step scheduled before then starts then."""
        self._capped = 0

    def _pace_of(self, request: Any) -> Pace | None:
        rid = request.request_id
        if rid not in self._paces:
            self._paces[rid] = _pace(request)
        return self._paces[rid]

    def _rank(self, request: Any) -> int:
        """Its class's rank: vLLM's priority is BATCH's for a REALTIME prompt placed among
        BATCH ones."""
        pace = self._pace_of(request)
        return pace.rank if pace is not None else int(request.priority)

    def _budget(self, now: float) -> int:
        """Tokens for the step about to be scheduled: for each class with a stream decoding,
        the prompt tokens its tightest stream allows, but never fewer than the prompts of
        that class and above need; the least of those (module doc)."""
        running = list(self.running)  # type: ignore[attr-defined]
        decoding = [r for r in running if r.num_output_tokens > 0 and not r.is_prefill_chunk]
        cost = self._fit.cost
        if cost is None or not decoding:
            return self._full_tokens
        rows, full = len(decoding), self._full_tokens - len(decoding)
        decode_s = cost.predict(rows)
        tightest: dict[int, float] = {}
        for r in decoding:
            pace = self._pace_of(r)
            if pace is not None:
                a = pace.allowance(r.num_output_tokens, now, decode_s, HORIZON_TOKENS)
                tightest[pace.rank] = min(a, tightest.get(pace.rank, math.inf))
        floor = min(FLOOR_TOKENS, full)
        caps = {k: prompt_token_cap(cost, rows, a, full, floor) for k, a in tightest.items()}
        if all(c >= full for c in caps.values()):
            return self._full_tokens
        ids = {r.request_id for r in decoding}
        waiting = list(self.waiting)  # type: ignore[attr-defined]
        prompts = [
            (self._rank(r), int(r.num_tokens - r.num_computed_tokens))
            for r in [*running, *waiting]
            if r.request_id not in ids
        ]
        cap = min(max(c, sum(t for k, t in prompts if k <= rank)) for rank, c in caps.items())
        cap = min(cap, full)
        if cap < min(full, sum(t for _, t in prompts)):  # prompt tokens held back
            self._capped += 1
            if self._capped % LOG_EVERY == 1:
                log.info(
                    "pace_capped", steps=self._capped, tokens=cap, rows=rows,
                    allowance_ms=round(min(tightest.values()) * 1000, 1),
                )  # fmt: skip
        return rows + cap

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        self.max_num_scheduled_tokens = self._budget(now)
        try:
            out = super().schedule(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.max_num_scheduled_tokens = self._full_tokens
        if len(self._starts) > 8:  # outputs that never came back (none expected)
            self._starts.clear()
        self._starts[id(out)] = now
        return out

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)  # type: ignore[misc]
        now = time.monotonic()
        started = self._starts.pop(id(scheduler_output), None)
        scheduled: dict[str, int] = scheduler_output.num_scheduled_tokens
        requests: dict[str, Any] = self.requests  # type: ignore[attr-defined]
        rows = 0
        for rid, tokens in scheduled.items():
            rows += tokens == 1
            request = requests.get(rid)
            if request is None or request.num_output_tokens == 0:
                continue
            pace = self._pace_of(request)
            if pace is not None and pace.first_at is None:
                self._paces[rid] = replace(pace, first_at=now)
        total = scheduler_output.total_num_scheduled_tokens
        if started is not None and total:
            self._fit.observe(now - max(started, self._last_done), rows, total - rows)
        self._last_done = now
        for rid in [rid for rid in self._paces if rid not in requests]:
            del self._paces[rid]
        return outputs


class PacedScheduler(PaceMixin, Scheduler):  # type: ignore[misc]
    """vLLM's scheduler with the cap (module doc)."""


class PacedAsyncScheduler(PaceMixin, AsyncScheduler):  # type: ignore[misc]
    """vLLM's asynchronous scheduler (GPU platforms) with the cap (module doc)."""
