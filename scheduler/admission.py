"""Admission control: refuse now, in milliseconds, what cannot finish before its deadline.

Synchronous and I/O-free, with an injected clock. A new request's wait is predicted as the
weighted tokens ahead of it (:meth:`Admission.cost_ahead`: higher classes, its own queue, and
each other backlogged tenant's fair-queuing share; plus one average request when no node has
room) over the service rate of the nodes that serve its model (:class:`ThroughputMeter`).
Invariants of :meth:`Admission.decide`:

- a class counts only on the rate higher classes left over the last ``arrival_window_s``
  (:class:`RateMeter`), never less than ``min_class_share``; the wait is at least the tenant's
  own queue at its weighted share (the WFQ bound, Parekh & Gallager 1993);
- a request is admitted only if its wait plus its decode time (``max_new_tokens`` x the measured
  inter-token time) fits the deadline less ``deadline_margin``; below REALTIME the wait counts
  ``lower_class_wait_factor`` times; a REALTIME wait past ``realtime_max_wait_s`` is refused;
- an admitted lower-class request is stamped with the start it is promised (``start_by``),
  which the queues keep by promoting it;
- a REALTIME wait is padded by how much longer than predicted recent REALTIME waits turned out
  (:class:`~scheduler.calibration.WaitCalibration`; the last overload's, up to 5 minutes old,
  while fewer are recent), and its first token counts the time from dispatch measured lately.

Why, with the figures: docs/decisions/scheduler-finish-time-admission.md,
scheduler-lower-class-wait-factor.md, scheduler-lower-class-promise.md,
scheduler-promise-budget.md. Failure mode: the prediction is only as good as the rate; nodes
not measured yet count ``default_tokens_per_s`` each.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from scheduler.calibration import FIRST_TOKEN_CALIBRATED_FROM, STALE_WAIT_S, WaitCalibration
from scheduler.first_token_budget import FirstTokenBudgets
from scheduler.queues import Clock, FairQueues, QueuedRequest
from sluice.contract import WorkloadClass

OVERLOADED = "OVERLOADED"
NO_CAPACITY = "NO_CAPACITY"


@dataclass(frozen=True)
class AdmissionConfig:
    """How waits are predicted and refusals timed."""

    default_tokens_per_s: float = 200.0
    """Service rate assumed for a node that has not been measured yet (weighted tokens/s)."""
    min_retry_s: float = 0.05
    """Smallest retry delay sent with a refusal."""
    max_retry_s: float = 300.0
    """Largest retry delay sent with a refusal."""
    no_capacity_grace_s: float = 1.0
    """How long a queued request may wait with no node able to serve it before it is shed."""
    arrival_window_s: float = 60.0
    """Window of the cost admitted per class: what higher classes take while a lower-class
    request waits (docs/decisions/scheduler-higher-class-forecast.md)."""
    min_class_share: float = 0.05
    """Least share of the nodes' rate a class is predicted to get under higher classes."""
    active_window_s: float = 5.0
    """A tenant admitted or streaming within this long counts as active in its class."""
    deadline_margin: float = 0.1
    """Share of the time left before the deadline a waiting request must leave unused."""
    realtime_max_wait_s: float = 1.5
    """Longest predicted queue wait a REALTIME request is admitted with (0: no bound beyond
    its deadline). Its deadline says when the client gives up; this says how long someone
    waiting for a first token should sit in silence before being told to come back."""
    ttft_targets: Mapping[WorkloadClass, float] = field(default_factory=dict)
    """Each class's time-to-first-token target (absent or 0: none): a request that would
    queue is refused at once when its predicted wait plus its prompt's prefill exceeds it;
    one that starts at once, or whose prompt alone takes longer, is never refused for it
    (nothing sooner exists: a retry would miss it as well)."""
    embed_targets: Mapping[WorkloadClass, float] = field(default_factory=dict)
    """Each class's target for a whole ``Embed`` call (absent or 0: none), held as a TTFT
    target is: an embedding's first answer is its whole answer, its node call its prompt."""
    first_token_budgets: bool = False
    """Whether nodes are told what each first token may take (:class:`FirstTokenBudgets`)."""
    lower_class_wait_factor: float = 2.0
    """A waiting request below ``REALTIME`` must fit its deadline with its predicted wait
    counted this many times over: higher-class work arriving after it is served first
    (docs/decisions/scheduler-lower-class-wait-factor.md). The retry delay sent is still the
    plain prediction."""


@dataclass(frozen=True)
class Verdict:
    """The answer to one request: admitted, or refused with a predicted wait."""

    admitted: bool
    predicted_wait_s: float
    reason: str = ""
    detail: str = ""
    """Why, for the refusal's message, when the predicted wait alone does not say it."""
    past_deadline: bool = True
    """Refused because it could not finish before its deadline (False: a queue bound)."""

    def retry_after(self, config: AdmissionConfig) -> float:
        """The retry delay to send: the predicted wait, clamped to the configured range."""
        wait = self.predicted_wait_s if math.isfinite(self.predicted_wait_s) else config.max_retry_s
        return min(max(wait, config.min_retry_s), config.max_retry_s)


@dataclass(frozen=True)
class Shed:
    """A queued request dropped because it can no longer start in time."""

    item: QueuedRequest
    predicted_wait_s: float
    reason: str


class ThroughputMeter:
    """Requested cost retired per second by one node, over a sliding window.

    Only windows in which the node was kept busy say anything about its capacity, so the
    meter reports the rate over the span it actually saw completions in (at least
    ``min_span_s``), and the owner takes the larger of it and the node's own reported rate.
    """

    def __init__(self, clock: Clock, window_s: float = 10.0, min_span_s: float = 1.0) -> None:
        self._clock = clock
        self._window = window_s
        self._min_span = min_span_s
        self._events: deque[tuple[float, float]] = deque()
        self._sum = 0.0

    def record(self, cost: float) -> None:
        """A request of ``cost`` weighted tokens finished."""
        self._events.append((self._clock(), cost))
        self._sum += cost

    def rate(self) -> float:
        """Weighted tokens per second (0 when nothing finished within the window)."""
        now = self._clock()
        while self._events and now - self._events[0][0] > self._window:
            self._sum -= self._events.popleft()[1]
        if not self._events:
            return 0.0
        span = max(now - self._events[0][0], self._min_span)
        return self._sum / span


class RateMeter:
    """Cost per second recorded over a fixed trailing window (shorter while the meter is
    younger than the window, never shorter than one second). ``watched_since``: when it began
    watching (default: now); a meter made on a first arrival but standing for a quiet window
    before it passes a time at least a window back, and then always divides by the window."""

    def __init__(self, clock: Clock, window_s: float, watched_since: float | None = None) -> None:
        self._clock = clock
        self._window = window_s
        self._events: deque[tuple[float, float]] = deque()
        self._sum = 0.0
        self._born = clock() if watched_since is None else watched_since

    def record(self, cost: float) -> None:
        """``cost`` arrived now."""
        now = self._clock()
        self._prune(now)
        self._events.append((now, cost))
        self._sum += cost

    def _prune(self, now: float) -> None:
        while self._events and now - self._events[0][0] > self._window:
            self._sum -= self._events.popleft()[1]

    def rate(self) -> float:
        """Recorded cost per second over the window."""
        now = self._clock()
        self._prune(now)
        if not self._events:
            self._sum = 0.0
            return 0.0
        return self._sum / min(self._window, max(now - self._born, 1.0))


class Admission:
    """Predicts waits over a :class:`FairQueues` and decides admission and shedding."""

    def __init__(
        self,
        queues: FairQueues,
        clock: Clock,
        weight: Callable[[str], float],
        config: AdmissionConfig | None = None,
    ) -> None:
        self.config = config or AdmissionConfig()
        self._queues = queues
        self._clock = clock
        self._weight = weight
        self._admitted: dict[tuple[str, WorkloadClass], RateMeter] = {}
        self._seen: dict[tuple[str, WorkloadClass], dict[str, float]] = {}
        self.calibration = WaitCalibration(clock, stale_s=STALE_WAIT_S)
        """REALTIME waits as they turned out (:meth:`started` records them)."""
        self.first_token_calibration = WaitCalibration(clock)
        """REALTIME times from dispatch to first token as they turned out, against the
        prompt's predicted ``prefill_s`` (:meth:`first_token` records them)."""
        self.first_token_budgets = FirstTokenBudgets(
            clock, self.config.ttft_targets, self.config.first_token_budgets
        )
        """What each first token may take at its node (:meth:`_ttft_refusal` holds them)."""

    def started(self, item: QueuedRequest) -> None:
        """``item`` left the queue for a node: a REALTIME request's wait, against the one
        predicted, calibrates the next predictions."""
        now = item.dispatched_at = self._clock()
        if item.workload_class.is_top and item.predicted_wait_s is not None:
            waited = now - item.enqueued_at
            self.calibration.record(item.model, item.predicted_wait_s, waited)

    def first_token(self, item: QueuedRequest, retried: bool = False) -> None:
        """``item``'s first token arrived: for a REALTIME request held to a TTFT target, the
        time since dispatch, against the one predicted, calibrates the next predictions
        (``docs/decisions/scheduler-first-token-calibration.md``). Counted once; not when
        ``retried`` (sent to another node after a failure: not the node's time)."""
        predicted, item.predicted_first_token_s = item.predicted_first_token_s, None
        if predicted is not None and item.dispatched_at is not None and not retried:
            took = self._clock() - item.dispatched_at
            self.first_token_calibration.record(item.model, predicted, took)

    def record_admitted(self, item: QueuedRequest) -> None:
        """``item`` was admitted: its cost counts against lower classes' rate, and its tenant
        is active in its class."""
        key = (item.model, item.workload_class)
        meter = self._admitted.get(key)
        if meter is None:
            meter = self._admitted[key] = RateMeter(self._clock, self.config.arrival_window_s)
        meter.record(item.cost(self._queues.config.prompt_token_weight))
        self.touch(item)

    def touch(self, item: QueuedRequest) -> None:
        """``item``'s tenant is active in its class now (admitted, or streaming tokens)."""
        self._seen.setdefault((item.model, item.workload_class), {})[item.tenant] = self._clock()

    def class_rate(self, model: str, workload_class: WorkloadClass, rate: float) -> float:
        """The part of ``rate`` a class can count on: what higher classes have recently been
        admitted to use is taken off, down to ``min_class_share``."""
        rank = workload_class.rank
        above = sum(
            m.rate() for (mdl, cls), m in self._admitted.items() if mdl == model and cls.rank < rank
        )
        return max(rate - above, rate * self.config.min_class_share)

    def active(self, model: str, workload_class: WorkloadClass) -> set[str]:
        """Tenants with requests queued in the class for the model, or admitted or streaming
        within ``active_window_s``."""
        seen = self._seen.get((model, workload_class), {})
        horizon = self._clock() - self.config.active_window_s
        for tenant in [t for t, at in seen.items() if at < horizon]:
            del seen[tenant]
        return set(seen) | set(self._queues.tenants_with_cost(workload_class, model))

    def share(self, item: QueuedRequest) -> float:
        """``item``'s tenant's weight over the weights of the tenants active in its class."""
        active = self.active(item.model, item.workload_class) | {item.tenant}
        total = sum(max(self._weight(t), 1e-6) for t in active)
        return max(self._weight(item.tenant), 1e-6) / total

    def cost_ahead(self, item: QueuedRequest) -> float:
        """Weighted tokens that start before ``item`` if it were queued now."""
        q = self._queues
        cls, model = item.workload_class, item.model
        ahead = sum(q.queued_cost(c, model) for c in WorkloadClass if c.rank < cls.rank)
        own = q.queued_cost(cls, model, item.tenant)
        mine = own + item.cost(q.config.prompt_token_weight)
        own_weight = max(self._weight(item.tenant), 1e-6)
        for tenant, cost in q.tenants_with_cost(cls, model).items():
            if tenant != item.tenant:
                ahead += min(cost, mine * self._weight(tenant) / own_weight)
        return ahead + own

    def decide(
        self,
        item: QueuedRequest,
        rate: float,
        room_now: bool,
        *,
        busy_cost: float = 0.0,
        token_s: float = 0.0,
        busy: bool = True,
        prefill_s: float = 0.0,
        room_in_s: float = 0.0,
        idle_prefill_s: float | None = None,
    ) -> Verdict:
        """Admit ``item`` or refuse it now.

        ``rate`` is the service rate of the nodes that can take the model (0 when none can);
        ``room_now`` is True when one of them could take the request this instant. Without
        room, a slot frees when some running request ends: with every slot busy, the next
        end comes after about one average request's cost at the total rate, so ``busy_cost``
        (the average cost of dispatched requests) is added to what is ahead. ``token_s`` is
        the measured time per generated token (0 when unknown): a request must also have time
        left to generate its ``max_new_tokens``, even one that could start at once while the
        nodes are ``busy`` (a full batch decodes slowly: its streams would hit the deadline
        unfinished; on idle nodes ``token_s``, measured under the last load, says nothing).
        A REALTIME ``item`` never starts at once while lower-class work promoted now waits
        (it holds the model until it starts, ``promoted_hold_s`` at most). ``prefill_s``:
        its predicted time from dispatch to first token under the load now (its prompt's
        prefill beside the batch, or the time measured lately when longer), counted with its
        wait against its class's TTFT target, even for a request that would start at once;
        ``idle_prefill_s`` (default ``prefill_s``): its prompt's prefill alone, a request
        whose prompt alone misses the target being admitted all the same (it never could
        meet it). A REALTIME wait counts the calibration margin (:class:`WaitCalibration`)
        there and against the queue bound, and a REALTIME ``prefill_s`` the margin by which
        first tokens came later than predicted lately (an Embed: its class's embed target, its
        call as ``prefill_s``). ``room_in_s``: when no node has room, the least time until one
        takes its prompt (a prefill bucket draining); its wait is at least that. An admitted
        lower-class ``item`` is stamped with its promised ``start_by``.
        """
        ahead, now = self.cost_ahead(item), self._clock()
        usable = (item.deadline - now) * (1.0 - self.config.deadline_margin)
        decode = item.decode_s = item.max_new_tokens * token_s
        top = item.workload_class.is_top
        # Lower-class work promoted now goes first and holds the model (queues: promoted_hold_s).
        promised = self._queues.promised_cost(item.model, now) if top else 0.0
        ttft = self._target(item)
        alone = prefill_s if idle_prefill_s is None else idle_prefill_s
        prefill_s = self._first_token_s(item, prefill_s, ttft)
        if room_now and ahead <= 0 and promised <= 0:
            if busy and decode > usable:  # starts now, but cannot end in time
                retry = busy_cost / rate if rate > 0 else self.config.min_retry_s
                detail = (
                    f"at {token_s:.3f}s per token on the loaded nodes, {item.max_new_tokens} "
                    f"new tokens need {decode:.1f}s"
                )
                return Verdict(False, retry, OVERLOADED, detail)
            if ttft > 0 and alone <= ttft < prefill_s:  # the load there would miss it
                return self._ttft_refusal(item, 0.0, prefill_s, ttft)
            return self._admit(item, 0.0, now + usable - decode)
        if not room_now or promised > 0:  # it starts once a running request ends
            ahead += busy_cost
        if rate <= 0:
            return Verdict(False, math.inf, NO_CAPACITY)
        rate = self.class_rate(item.model, item.workload_class, rate)
        own = self._queues.queued_cost(item.workload_class, item.model, item.tenant)
        wait = max(ahead / rate, own / (rate * self.share(item)), room_in_s)
        if top:  # lower-class items promoted while it waits go first (queues: promises)
            wait = self._with_promises(item.model, now, wait, rate)
            item.predicted_wait_s = wait
            wait += self.calibration.margin(item.model)
        padded = wait if top else wait * self.config.lower_class_wait_factor
        if padded + decode > usable:
            return Verdict(False, wait, OVERLOADED)
        if ttft > 0 and alone <= ttft < wait + prefill_s:  # its wait or the load would miss it
            return self._ttft_refusal(item, wait, prefill_s, ttft)
        limit = self.config.realtime_max_wait_s
        if top and limit > 0 and wait > limit:
            detail = f"predicted wait {wait:.3f}s is over the {limit:g}s REALTIME queue bound"
            return Verdict(False, wait, OVERLOADED, detail, past_deadline=False)
        return self._admit(item, wait, now + usable - decode)

    def _target(self, item: QueuedRequest) -> float:
        """``item``'s class's TTFT target, or its embed target for an Embed (0: none)."""
        targets = self.config.embed_targets if item.embed else self.config.ttft_targets
        return targets.get(item.workload_class, 0.0)

    def _first_token_s(self, item: QueuedRequest, prefill_s: float, ttft: float) -> float:
        """``prefill_s`` padded by the first-token calibration margin for a REALTIME ``item``
        held to a TTFT target and predicted at :data:`FIRST_TOKEN_CALIBRATED_FROM` of it or
        more (its prediction is kept to calibrate by); else unchanged."""
        top = item.workload_class.is_top and not item.embed  # (an Embed has no first token)
        if not top or ttft <= 0 or prefill_s < FIRST_TOKEN_CALIBRATED_FROM * ttft:
            return prefill_s
        item.predicted_first_token_s = prefill_s
        return prefill_s + self.first_token_calibration.margin(item.model)

    def _ttft_refusal(
        self, item: QueuedRequest, wait: float, prefill_s: float, ttft: float
    ) -> Verdict:
        """Refused now: its first token would come past its class's TTFT target; retry once
        the wait or the load ahead of its prompt had time to shrink by the excess."""
        what, work, target = (
            ("answer", "call", "embed") if item.embed else ("first token", "prompt", "TTFT")
        )
        detail = (
            f"predicted {what} in {wait + prefill_s:.3f}s (wait {wait:.3f}s, {work} "
            f"{prefill_s:.3f}s) is over the {ttft:g}s {item.workload_class.label} {target} target"
        )
        retry = max(wait, wait + prefill_s - ttft, self.config.min_retry_s)
        if not item.embed:
            self.first_token_budgets.refused(item)
        return Verdict(False, retry, OVERLOADED, detail, past_deadline=False)

    def _with_promises(self, model: str, now: float, wait: float, rate: float) -> float:
        """``wait`` plus the lower-class work promoted before the request would start, to a
        fixed point: each promise that falls due within the longer wait delays it further
        (one pass counted only those due within the first guess, and REALTIME queued 3-6 s
        against 0.6-1.5 s predicted behind BATCH promoted meanwhile: bench-slo, overload 4x,
        2026-12-04)."""
        longer = wait
        for _ in range(8):
            nxt = wait + self._queues.promised_cost(model, now + longer) / rate
            if nxt <= longer + 1e-3:
                return max(nxt, longer)
            longer = nxt
        return longer

    def _admit(self, item: QueuedRequest, wait: float, latest_start: float) -> Verdict:
        """Admit ``item``; below REALTIME, stamp the start the queue promises it: the
        admission test's own budget, the slack before ``latest_start`` divided by
        ``lower_class_wait_factor`` (the rest absorbs a batch that decodes slower)."""
        if not item.workload_class.is_top:
            now = self._clock()
            slack = max(0.0, latest_start - now)
            item.start_by = now + slack / max(1.0, self.config.lower_class_wait_factor)
        return Verdict(True, wait)

    def shed(
        self, rate_of: Callable[[str], float], token_s_of: Callable[[str], float] | None = None
    ) -> list[Shed]:
        """Remove and return queued requests that can no longer finish before their deadline.

        Each model's queue is walked in service order (promoted items, then class rank, then
        arrival): a request whose predicted start (cost kept ahead of it / rate, or for a
        lower-class request the time it is promoted, when sooner) plus its own decode time
        (``max_new_tokens`` x ``token_s_of(model)``, at most what its admission counted: a
        queued request is shed for a wait that grew, not for the inter-token time swinging
        with the prompts the node prefills) is past its deadline is dropped and no
        longer counts for those behind it. Lower classes sit behind higher ones, so when
        capacity shrinks they are the ones dropped first. A model that no node can serve
        keeps its requests for ``no_capacity_grace_s`` (a node may be restarting), then sheds
        them.
        """
        now = self._clock()
        weight = self._queues.config.prompt_token_weight
        by_model: dict[str, list[QueuedRequest]] = {}
        for item in self._queues.items():
            by_model.setdefault(item.model, []).append(item)
        dropped: list[Shed] = []
        promoted = {i.request_id for i in self._queues.promoted()}
        lead = self._queues.config.promote_lead_s
        for model, items in by_model.items():
            rate = rate_of(model)
            token_s = token_s_of(model) if token_s_of is not None else 0.0
            items.sort(
                key=lambda i: (
                    (0, i.start_by, 0, 0)
                    if i.request_id in promoted
                    else (1, 0.0, i.workload_class.rank, i.seq)
                )
            )
            ahead = 0.0
            for item in items:
                if rate <= 0:
                    if now - item.enqueued_at >= self.config.no_capacity_grace_s:
                        dropped.append(Shed(item, math.inf, NO_CAPACITY))
                    continue
                wait = ahead / rate
                if item.request_id not in promoted:  # promoted by then, it goes first
                    wait = min(wait, max(0.0, item.start_by - lead - now))
                decode = item.max_new_tokens * token_s
                if item.decode_s > 0:
                    decode = min(decode, item.decode_s)
                if now + wait + decode > item.deadline:
                    dropped.append(Shed(item, wait, OVERLOADED))
                else:
                    ahead += item.cost(weight)
        for shed in dropped:
            self._queues.cancel(shed.item.request_id)
        return dropped
