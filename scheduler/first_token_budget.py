"""What a REALTIME first token may take at its node, for an engine that orders waiting prompts
itself (``NodeGenerateRequest.first_token_budget_s``): the vLLM node places a REALTIME prompt
as late among waiting BATCH prompts as that budget allows, instead of ahead of them all
(``inference_node/engine/vllm_mapping.py: placement``).

Off unless the scheduler's ``first_token_budgets`` setting is on. A budget is only slack
the scheduler is sure of: none for a request predicted near its
target (its first token calibrates the next predictions, and a node's deliberate delay would
pad them all), none on a retry, and none for a while after a REALTIME refusal for the target
(REALTIME is short of time there; a late first token then also raises the measured first-token time
that every next prediction is floored at). Why, with the runs:
``docs/decisions/node-vllm-realtime-placement.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from scheduler.queues import Clock, QueuedRequest
from sluice.contract import WorkloadClass

TTFT_PRESSURE_HOLD_S = 20.0
"""After a REALTIME refusal for a model's TTFT target, how long its first tokens get no
budget (one scheduler replica's view: others keep theirs)."""


class FirstTokenBudgets:
    """Budgets under the classes' TTFT ``targets`` (module doc)."""

    def __init__(
        self, clock: Clock, targets: Mapping[WorkloadClass, float], enabled: bool = True
    ) -> None:
        self._clock = clock
        self._targets = targets if enabled else {}
        self._refused_at: dict[str, float] = {}

    def refused(self, item: QueuedRequest) -> None:
        """``item`` was refused: its first token would miss its class's TTFT target (only
        REALTIME's holds the budgets back: they are REALTIME's)."""
        if item.workload_class.is_top:
            self._refused_at[item.model] = self._clock()

    def budget(self, item: QueuedRequest) -> float:
        """What ``item``'s TTFT target leaves its first token once dispatched (the target less
        its wait); 0 when there is no slack to give (module doc)."""
        ttft, now = self._targets.get(item.workload_class, 0.0), self._clock()
        if not item.workload_class.is_top or ttft <= 0 or item.predicted_first_token_s is not None:
            return 0.0
        if now - self._refused_at.get(item.model, -math.inf) < TTFT_PRESSURE_HOLD_S:
            return 0.0
        return max(ttft - ((item.dispatched_at or now) - item.enqueued_at), 0.0)
