"""Routing decisions, synchronous and I/O-free: load estimates, power of two choices with
affinity and latency-outlier ejection. :mod:`scheduler.nodes` feeds them.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from scheduler.prefill import PrefillBucket, PrefillGuard
from scheduler.queues import Clock
from sluice.contract import WorkloadClass
from sluice.itl import PrefillFit, fitted_limit, full_step_s

DEFAULT_MAX_SEQUENCES = 32
"""Capacity assumed for a node that publishes none."""
DEFAULT_STEP_TOKENS = 512
"""Tokens per engine step assumed for a node that publishes none (the node's default)."""
TOKENS_PER_SEQUENCE = 512
"""Queued tokens counted as one sequence of load in the score."""

TOP_CLASS = min(WorkloadClass, key=lambda c: c.rank)
"""The class no other preempts (REALTIME)."""

T = TypeVar("T")


@dataclass
class LoadBook:
    """One node's load as this scheduler sees it, by workload class: its own requests there,
    counted exactly, plus what the node's reports show beyond them.

    Reports arrive every ~200 ms; a router that trusted them alone would pile every request of
    a burst onto the node that looked idle (the thundering herd of metric-only pickers). So the
    estimate moves with every dispatch and completion of this replica at once, and the reports
    only supply the sequences this replica did not send (other replicas', direct callers').
    That excess is the smaller of the last two reports' own: a report the node built just
    before one of our requests ended can reach us after the end, and would otherwise show a
    phantom sequence (a slot looking busy, a request kept waiting) until the next report.

    Room is counted per class: a request is held back only by the sequences of its own class
    and those above it. The node's engine preempts a lower class's sequence for it when every
    slot is taken, so REALTIME never waits in the queue for a BATCH line to end.

    A fine-tune training on the node holds whole slots (its memory, ``reserved`` in the
    report) that no class may use and no preemption frees: every class's capacity is
    ``max_sequences`` less those, so the node is never sent work it cannot admit (work
    waiting there would keep the training from running at all).

    Inter-token targets (:mod:`sluice.itl`): with the node's fitted step time (``step``, from
    its reports) and each class's step budget, a class's capacity is also the batch whose
    predicted step fits the tightest budget among it and the classes it cannot preempt that
    run there: REALTIME counts its own budget (the node preempts lower classes down to it),
    BATCH the tighter REALTIME one while REALTIME runs there, its own looser one otherwise.
    """

    max_sequences: int = DEFAULT_MAX_SEQUENCES
    paces_prompts: bool = False
    """The node's engines pace their own lower-class prompts (``ModelInfo.paces_prompts``):
    the prefill bucket's measured-time rule waits for ``PrefillGuard.paced_measured_share``."""
    reserved: int = 0
    """Slots a fine-tune on the node holds, from the last report."""
    pinned: int = 0
    """Lower-class sequences the node keeps from preemption (their deadlines near), from the
    last report: REALTIME counts them as its own when it looks for room."""
    reported_tokens: int = 0
    kv_fraction: float = 0.0
    reported_rate: float = 0.0
    own: dict[WorkloadClass, int] = field(default_factory=dict)
    """Requests this scheduler has on the node now, by class."""
    foreign: dict[WorkloadClass, int] = field(default_factory=dict)
    """Sequences on the node that are not this scheduler's, by class, from the reports."""
    last_excess: dict[WorkloadClass, int] = field(default_factory=dict)
    tokens_sent_since_report: float = 0.0
    step: PrefillFit | None = None
    """The node's fitted step time, from its last report (None before it has one): of all
    its models, the costliest per sequence."""
    fits: dict[str, PrefillFit] = field(default_factory=dict)
    """Each model's fitted step time, from the last report."""
    timings: dict[str, PrefillFit] = field(default_factory=dict)
    """Each model's step time with no step clipped below its own work's cost (the fit's
    ``timed`` terms, else the fit), by which first tokens are timed: the fit's median clip
    halves the prompt cost the holds on lower classes are priced at
    (``docs/decisions/scheduler-first-token-timed-fit.md``)."""
    prefill: PrefillBucket = field(default_factory=PrefillBucket)
    """Prompt prefill this scheduler sent and the node has not yet worked off
    (:mod:`scheduler.prefill`)."""
    ahead_tokens: dict[str, int] = field(default_factory=dict)
    """Per model, the prompt tokens a REALTIME prompt sent there now waits for, from the last
    report (a model absent: the node does not tell)."""
    sent_since_report: dict[tuple[str, bool], int] = field(default_factory=dict)
    """Prompt tokens this scheduler sent since that report, per (model, REALTIME or not)."""
    cached: dict[str, float] = field(default_factory=dict)
    """Per model, the share of new prompts' tokens the node's prefix cache held lately, from
    the last report (those it does not compute; a model absent: no such cache)."""

    @property
    def in_flight(self) -> int:
        """Requests this scheduler has on the node now."""
        return sum(self.own.values())

    @property
    def others(self) -> int:
        """Sequences on the node that are not this scheduler's."""
        return sum(self.foreign.values())

    def on_report(
        self,
        sequences: int,
        queued_tokens: int,
        kv_used: int,
        kv_budget: int,
        rate: float,
        by_class: Mapping[WorkloadClass, int] | None = None,
        reserved: int = 0,
        steps: Sequence[PrefillFit] = (),
        pinned: int = 0,
        ahead: Mapping[str, int] | None = None,
        cached: Mapping[str, float] | None = None,
    ) -> None:
        """A fresh load report: the others' sequences (``by_class`` when the report splits
        them, else all counted as the top class), KV use, queued tokens, rate, the slots
        training holds, the fitted step times (the costliest per sequence counts) and the
        prompt tokens ahead of a REALTIME prompt and the prefix cache's hit ratio per model
        (``ahead``, ``cached``)."""
        reported = dict(by_class) if by_class is not None else {TOP_CLASS: sequences}
        self.reserved = max(0, reserved)
        self.pinned = max(0, pinned)
        self.step = max(steps, key=lambda f: (f.per_sequence_s, f.base_s), default=None)
        self.fits = {f.model: f for f in steps}
        self.timings = {f.model: _timed(f) for f in steps}
        for cls in WorkloadClass:
            excess = max(0, reported.get(cls, 0) - self.own.get(cls, 0))
            self.foreign[cls] = min(excess, self.last_excess.get(cls, 0))
            self.last_excess[cls] = excess
        self.reported_tokens = queued_tokens
        self.kv_fraction = kv_used / kv_budget if kv_budget > 0 else 0.0
        self.reported_rate = rate
        self.tokens_sent_since_report = 0.0
        self.ahead_tokens = dict(ahead or {})
        self.cached = {m: min(1.0, max(0.0, r)) for m, r in (cached or {}).items()}
        self.sent_since_report.clear()

    def on_dispatch(
        self,
        tokens: float,
        workload_class: WorkloadClass = TOP_CLASS,
        model: str = "",
        prompt_tokens: int = 0,
    ) -> None:
        """This scheduler sent the node a request of ``tokens`` weighted tokens (a prompt of
        ``prompt_tokens`` for ``model``)."""
        self.own[workload_class] = self.own.get(workload_class, 0) + 1
        self.tokens_sent_since_report += tokens
        if model and prompt_tokens > 0:
            key = (model, workload_class.is_top)
            self.sent_since_report[key] = self.sent_since_report.get(key, 0) + prompt_tokens

    def on_finish(self, workload_class: WorkloadClass = TOP_CLASS) -> None:
        """A request of ``workload_class`` this scheduler sent there ended."""
        self.own[workload_class] = self.own.get(workload_class, 0) - 1

    def sequences(self, workload_class: WorkloadClass | None = None) -> int:
        """Estimated sequences on the node (our own in flight plus the others'): all of them,
        or those ``workload_class`` cannot preempt (its own class and the ones above; for
        REALTIME, the pinned lower-class ones too)."""
        pinned = self.pinned if workload_class is not None and workload_class.is_top else 0
        return pinned + sum(
            self.own.get(cls, 0) + self.foreign.get(cls, 0)
            for cls in WorkloadClass
            if workload_class is None or cls.rank <= workload_class.rank
        )

    def running(self) -> set[WorkloadClass]:
        """Classes with sequences on the node (estimated as :meth:`sequences`)."""
        return {c for c in WorkloadClass if self.own.get(c, 0) + self.foreign.get(c, 0) > 0}

    def prefill_cost(self, model: str, prompt_tokens: float) -> float:
        """Seconds the node is predicted to spend prefilling ``prompt_tokens`` of ``model``
        (its fitted cost per prompt token, less the share its prefix cache holds; 0 without
        one)."""
        fit = self.fits.get(model)
        if fit is None or not fit.per_prefill_token_s > 0:
            return 0.0
        return fit.per_prefill_token_s * self.computed(model, max(0, prompt_tokens))

    def computed(self, model: str, prompt_tokens: float) -> float:
        """Of ``prompt_tokens`` new to ``model`` there, those the node is expected to compute:
        less the share its prefix cache held lately (:attr:`cached`), at least one."""
        if prompt_tokens <= 0:
            return 0.0
        return max(1.0, prompt_tokens * (1.0 - self.cached.get(model, 0.0)))

    def first_token_s(self, model: str, prompt_tokens: int, step_tokens: int) -> float:
        """Seconds from dispatch to the first token of a REALTIME prompt of ``prompt_tokens``
        of ``model`` sent now (0 without a fit): the node's engine prefills the prompts ahead
        of it, then this one, in chunks of ``step_tokens`` less the sequences decoding beside
        them, each step paying its fixed and per-sequence cost, every prompt token its
        own (less the share its prefix cache holds). Ahead of it: where the node tells
        (:meth:`tells_ahead`), the tokens its last report named, the REALTIME prompts sent
        since and at most a step of the others sent since, behind the step under way; else
        the bucket's debt. Call :meth:`settle_prefill` first."""
        fit, timed = self.fits.get(model), self.timings.get(model)
        if fit is None or timed is None or not fit.per_prefill_token_s > 0:
            return 0.0
        rows, reported = self.sequences(), self.ahead_tokens.get(model)
        if reported is None:  # the bucket's debt (at the fit's price): less the cache already
            ahead, under_way = self.prefill.debt_s / fit.per_prefill_token_s, 0
        else:
            lower = self.sent_since_report.get((model, False), 0)
            ahead = reported + self.sent_since_report.get((model, True), 0)
            ahead, under_way = self.computed(model, ahead + min(lower, step_tokens)), 1
        tokens = ahead + self.computed(model, max(1, prompt_tokens))
        steps = math.ceil(tokens / max(1, step_tokens - rows)) + under_way
        step_s = timed.base_s + timed.per_sequence_s * rows
        return steps * step_s + tokens * timed.per_prefill_token_s

    def tells_ahead(self, model: str) -> bool:
        """The node reports the prompt tokens ahead of a REALTIME prompt of ``model`` and has
        a fit to time them by: :meth:`first_token_s` follows its queue, not the bucket."""
        fit = self.fits.get(model)
        return model in self.ahead_tokens and fit is not None and fit.per_prefill_token_s > 0

    def full_step_s(self, model: str, budget_s: float) -> float:
        """Seconds of a decode step of ``model`` with the node full: every usable slot taken,
        or the batch ``budget_s`` allows when that is fewer (0 without a fit)."""
        fit = self.fits.get(model)
        return 0.0 if fit is None else full_step_s(fit, self.usable, [budget_s])

    def settle_prefill(self, guard: PrefillGuard, now: float, measured_s: float = 0.0) -> float:
        """Drain the prefill bucket up to ``now`` at the share the batch running there
        leaves to prompts (``measured_s``: its REALTIME streams' time per token lately, 0
        when none ran; read against the target as :attr:`paces_prompts` says); returns that
        share."""
        step = self.step
        step_s = step.base_s + step.per_sequence_s * self.sequences() if step is not None else 0.0
        share = guard.drain_share(step_s, self.running(), measured_s, paced=self.paces_prompts)
        self.prefill.settle(now, share)
        return share

    def prefill_wait(
        self,
        workload_class: WorkloadClass,
        cost_s: float,
        guard: PrefillGuard,
        now: float,
        measured_s: float = 0.0,
        ahead_s: float = 0.0,
    ) -> float:
        """Seconds until a prompt of ``cost_s`` of ``workload_class``, behind ``ahead_s`` of
        prompts queued for the node, may start there (0: now): none while no stream of its
        class or a higher one runs there."""
        share = self.settle_prefill(guard, now, measured_s)
        if not any(c.rank <= workload_class.rank for c in self.running()):
            return 0.0
        return self.prefill.wait(cost_s, guard.allowance(workload_class), share, ahead_s)

    def on_prefill(
        self, cost_s: float, guard: PrefillGuard, now: float, measured_s: float = 0.0
    ) -> None:
        """A prompt of ``cost_s`` prefill seconds was sent (before its sequence is booked)."""
        self.settle_prefill(guard, now, measured_s)
        self.prefill.add(cost_s)

    @property
    def usable(self) -> int:
        """Slots sequences may use: ``max_sequences`` less those training holds (at least
        one: a node never lends training its last slot)."""
        return max(1, self.max_sequences - self.reserved)

    def score(self) -> float:
        """Lower is better: sequence occupancy, KV use and queued tokens, each about 0..1."""
        cap = self.usable
        tokens = self.reported_tokens + self.tokens_sent_since_report
        return self.sequences() / cap + self.kv_fraction + tokens / (cap * TOKENS_PER_SEQUENCE)

    def has_room(
        self,
        workload_class: WorkloadClass,
        headroom: float,
        kv_limit: float = 0.95,
        budgets: Mapping[WorkloadClass, float] | None = None,
    ) -> bool:
        """True when one more sequence of ``workload_class`` fits: fewer sequences it cannot
        preempt than its capacity, and KV cache left unless lower classes hold some to give
        up. Lower classes leave ``headroom`` (a fraction of the node's sequences, at least one)
        to REALTIME: they only fill capacity REALTIME is not using, and the node's engine
        preempts them if REALTIME arrives anyway."""
        blocking = self.sequences(workload_class)
        if self.kv_fraction >= kv_limit and blocking >= self.sequences():
            return False
        return blocking < self.capacity(workload_class, headroom, budgets)

    def capacity(
        self,
        workload_class: WorkloadClass,
        headroom: float,
        budgets: Mapping[WorkloadClass, float] | None = None,
    ) -> int:
        """Sequences ``workload_class`` may fill on the node: all :attr:`usable` ones for
        REALTIME, less ``headroom`` below it (at least one slot when above 0); at most the
        batch its step budget and those of the classes above it running there allow
        (``budgets``, see the class doc)."""
        cap = self.usable
        if not workload_class.is_top and headroom > 0:
            cap -= max(1, math.ceil(cap * headroom)) if cap > 1 else 0
        if budgets:
            rank = workload_class.rank
            tight = [
                budgets.get(c, 0.0)
                for c in WorkloadClass
                if c == workload_class
                or (c.rank < rank and self.own.get(c, 0) + self.foreign.get(c, 0) > 0)
            ]
            fit = fitted_limit(self.step, tight)
            cap = cap if fit is None else max(1, min(cap, fit))
        return cap


def power_of_two(
    candidates: Sequence[T],
    score: Callable[[T], float],
    rng: random.Random,
    preferred: T | None = None,
    tie: float = 0.05,
) -> T:
    """Power of two choices (Mitzenmacher): sample two candidates, keep the less loaded.

    Guarantee: the maximum load grows like log log n instead of log n for random choice,
    without every router herding onto the one node a stale report shows as least loaded.
    ``preferred`` (the node that served this session or prompt prefix last, whose KV prefix
    cache may still be warm) wins when its score is within ``tie`` of the winner's.
    Failure mode: two samples can both be busy while an idle node exists; the caller only
    passes nodes that have room, so the choice is between acceptable nodes.
    """
    if not candidates:
        raise ValueError("no candidates")
    if len(candidates) == 1:
        best = candidates[0]
    else:
        a, b = rng.sample(list(candidates), 2)
        best = a if score(a) <= score(b) else b
    if preferred is not None and preferred in candidates and score(preferred) <= score(best) + tie:
        return preferred
    return best


class AffinityTable:
    """Affinity key (session id or prompt-prefix digest) → node that served it last (LRU)."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._map: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        """The node that served ``key`` last, if remembered."""
        if not key:
            return None
        node = self._map.get(key)
        if node is not None:
            self._map.move_to_end(key)
        return node

    def put(self, key: str, node_id: str) -> None:
        """Remember that ``node_id`` served ``key``."""
        if not key:
            return
        self._map[key] = node_id
        self._map.move_to_end(key)
        while len(self._map) > self._size:
            self._map.popitem(last=False)


@dataclass(frozen=True)
class OutlierConfig:
    """When a node counts as a latency outlier, and for how long it is ejected."""

    factor: float = 3.0
    """Ejected when its moving average exceeds this multiple of the peers' median..."""
    min_excess_s: dict[str, float] = field(default_factory=lambda: {"ttft": 0.25, "itl": 0.05})
    """...and exceeds it by at least this much per signal (tiny absolute gaps are noise)."""
    min_samples: int = 5
    """Observations a node (and each peer compared) needs first."""
    min_peers: int = 2
    """Peers with enough samples a node is compared against at least (Envoy's minimum hosts):
    with one peer, that peer alone is the "median", and a healthy node was ejected whenever
    the other ran fast (docs/decisions/scheduler-outlier-min-peers.md)."""
    eject_s: float = 15.0
    """Ejection time."""
    max_ejected_fraction: float = 0.5
    """Never eject more than this share of the known nodes at once."""
    alpha: float = 0.2
    """Weight of a new observation in the moving average."""


@dataclass
class _LatencyStats:
    ewma: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    ejected_until: float = 0.0


class OutlierDetector:
    """Ejects nodes whose time-to-first-token or inter-token latency is far above their peers'.

    Errors open a node's circuit breaker; a node that answers, but slowly (a gray failure:
    thermal throttling, a noisy neighbour, swapping), would keep its share of traffic. Each
    node keeps a moving average per signal; a node whose average exceeds ``factor`` times the
    median of its peers' (and by ``min_excess_s``) is ejected for ``eject_s``, like Envoy's
    outlier detection, but on latency. Bounded by ``max_ejected_fraction`` so a fleet-wide
    slowdown ejects nobody's majority. Failure mode: with fewer than three measured nodes there
    is no meaningful median, so nothing is ejected (the breaker and the stall detector still
    take a failing or frozen node out).
    """

    def __init__(self, clock: Clock, config: OutlierConfig | None = None) -> None:
        self.config = config or OutlierConfig()
        self._clock = clock
        self._nodes: dict[str, _LatencyStats] = {}

    def observe(self, node: str, signal: str, seconds: float) -> bool:
        """Record one observation; True when it got the node ejected."""
        stats = self._nodes.setdefault(node, _LatencyStats())
        old = stats.ewma.get(signal)
        a = self.config.alpha
        stats.ewma[signal] = seconds if old is None else a * seconds + (1 - a) * old
        stats.samples[signal] = stats.samples.get(signal, 0) + 1
        if self.ejected(node) or stats.samples[signal] < self.config.min_samples:
            return False
        peers = [
            s.ewma[signal]
            for n, s in self._nodes.items()
            if n != node and s.samples.get(signal, 0) >= self.config.min_samples
        ]
        if len(peers) < self.config.min_peers:
            return False
        median = statistics.median(peers)
        excess = self.config.min_excess_s.get(signal, 0.0)
        value = stats.ewma[signal]
        if value <= self.config.factor * median or value - median < excess:
            return False
        ejected_now = sum(self.ejected(n) for n in self._nodes)
        if ejected_now + 1 > self.config.max_ejected_fraction * len(self._nodes):
            return False
        stats.ejected_until = self._clock() + self.config.eject_s
        stats.ewma[signal] = median  # start the next round from the peers' level
        return True

    def ejected(self, node: str) -> bool:
        """True while ``node`` is ejected."""
        stats = self._nodes.get(node)
        return stats is not None and self._clock() < stats.ejected_until

    def latency(self, node: str, signal: str) -> float:
        """The node's moving average for ``signal`` (0 when unknown)."""
        stats = self._nodes.get(node)
        return stats.ewma.get(signal, 0.0) if stats else 0.0

    def forget(self, node: str) -> None:
        """Drop a node that left the registry."""
        self._nodes.pop(node, None)


def _timed(fit: PrefillFit) -> PrefillFit:
    """``fit``'s ``timed`` terms where its node sent them (a prompt cost above 0), else
    ``fit``."""
    timed = getattr(fit, "timed", None)
    return timed if timed is not None and timed.per_prefill_token_s > 0 else fit
