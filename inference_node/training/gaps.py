"""When a training unit may run on the engine thread: the gap policy.

The engine loop asks :meth:`GapPolicy.decide` whenever it would otherwise block for work, and
between decode steps. The rule, in order:

1. Never while inference requests wait to be admitted (``waiting > 0``): they go first.
2. Never a unit predicted to take longer than ``yield_bound_s``: the most a real-time request
   can wait for training is one unit, so the bound caps every unit, idle or not.
3. With sequences running, only a unit that fits their inter-token allowance: the yield
   bound, and the lesser of

   - the **share**: training beside sequences adds on average at most ``itl_share`` of their
     decode time to the gaps between their tokens. Each decode step earns ``itl_share`` times
     its seconds of credit (banked up to the yield bound), each unit run beside sequences
     spends its measured seconds;
   - the **tail**: a gap (the decode step's average, the training since that step, the unit)
     stays within the node's own long gap, the ``tail_quantile`` of its last ``tail_steps``
     decode steps: a stretched gap is no longer than what the model's steps already take
     now and then (or the step's average stretched by the share, when its steps hardly
     vary), so the inter-token tail follows the model's own, not a fixed number;

   or, when the deployment sets an inter-token target ``itl_budget_s`` (> 0), what the gap
   leaves of it instead of those two: an explicit target lets training stretch every gap up
   to it.

   A unit never measured is refused here (it is measured when the node is idle).
4. Idle (nothing running or waiting), units run back to back up to ``idle_slice_s``; then one
   refusal (``slice_over``) hands the loop a turn to look for work, and a new slice starts.

Predictions come from the last ``PREDICTION_RUNS`` runs of each unit kind, their seconds and
work (tokens of the micro-batch for a layer unit, rows for a loss chunk): the median time of
those of at least the unit's work (never a smaller run's, scaled: a loss chunk pays the LM
head's read whatever its rows), or of all scaled up when it is larger than any, times
``safety``. A median, not an average: one slow run (a collection, a burst of load from another
process) would lift an average over the bound, and under load a kind refused over the bound
never runs beside sequences to be measured again, so the fine-tune would stall for good while
the node serves. A kind whose runs really are slow stays refused; on an idle engine, one whose
last measurement is older than ``remeasure_after_s`` runs once more (``remeasure``) and its
runs restart from that one: the bound then holds as it does for a kind's first run, which is
measured the same way.

A unit that takes far longer than predicted is the failure mode: the bound then holds only as
well as the prediction, which is why every run is measured (:meth:`GapPolicy.unit_finished`)
and the waits it caused are recorded (:attr:`GapPolicy.admission_waits`,
:attr:`GapPolicy.decode_delays`) for the p99 the benchmark reports against the bound.

Pure and synchronous: it takes a clock and does no I/O; the engine thread owns it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class GapReason(StrEnum):
    """Why a unit may or may not run now."""

    IDLE = "idle"
    SLACK = "slack"
    INFERENCE_WAITING = "inference_waiting"
    OVER_BOUND = "over_bound"
    NO_SLACK = "no_slack"
    UNMEASURED = "unmeasured"
    SLICE_OVER = "slice_over"
    REMEASURE = "remeasure"


@dataclass(frozen=True)
class GapConfig:
    """Settings of the gap policy. Validated on construction."""

    yield_bound_s: float = 0.05
    """Longest a training unit may be predicted to take: the most real-time work may wait."""
    itl_share: float = 0.15
    """Training beside running sequences adds at most this share of their decode time to their
    inter-token gaps, on average (rule 3's share)."""
    tail_quantile: float = 0.9
    """A gap with training stays within this quantile of the recent decode steps (rule 3)."""
    tail_steps: int = 256
    """Decode steps the tail is read from (the newest)."""
    itl_budget_s: float = 0.0
    """Inter-token target of running requests: a gap (decode step plus training) may stretch
    up to it; 0: none, the share and the tail bound training instead (rule 3)."""
    idle_slice_s: float = 0.25
    """Training run back to back on an idle engine before it looks for work again."""
    ewma_alpha: float = 0.3
    """Weight of the newest decode step in the decode step's average."""
    safety: float = 1.25
    """Factor on every prediction."""
    max_recorded_waits: int = 10_000
    """Waits kept for quantiles (the newest)."""
    remeasure_after_s: float = 5.0
    """An idle engine runs a kind refused over the bound again once its last measurement is
    this old, to measure it afresh."""
    concurrent: bool = False
    """Train on a thread and CUDA stream of its own beside decode instead of in the engine
    thread's gaps (inference_node/engine/concurrent_training.py); the rules above then do
    not apply."""
    duty: float = 0.5
    """With ``concurrent``: the most of its time the training thread is busy while the
    engine has sequences running or requests waiting."""

    def __post_init__(self) -> None:
        for name in ("yield_bound_s", "idle_slice_s", "remeasure_after_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.itl_budget_s < 0 or not 0 <= self.itl_share <= 1:
            raise ValueError("itl_budget_s must be >= 0 and itl_share in [0, 1]")
        if not 0 < self.tail_quantile <= 1 or self.tail_steps < 1:
            raise ValueError("tail_quantile must be in (0, 1] and tail_steps >= 1")
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {self.ewma_alpha}")
        if self.safety < 1:
            raise ValueError(f"safety must be >= 1, got {self.safety}")
        if self.max_recorded_waits < 1:
            raise ValueError("max_recorded_waits must be >= 1")
        if not 0 < self.duty <= 1:
            raise ValueError(f"duty must be in (0, 1], got {self.duty}")


@dataclass(frozen=True)
class GapDecision:
    """The policy's answer for one unit."""

    run: bool
    reason: GapReason
    predicted_s: float | None
    """The unit's predicted time (safety included), ``None`` if its kind is unmeasured."""
    allowance_s: float
    """The time it had to fit in (0 when refused outright)."""


@dataclass
class _Running:
    kind: str
    work: int
    started: float
    seen: float
    """When the engine last looked for work before the unit: an arrival after it waited."""
    beside_sequences: bool
    arrivals: list[float]
    fresh: bool
    """Its measurement restarts the kind's runs (a remeasure)."""


PREDICTION_RUNS = 7
"""Runs of a kind its prediction is the median of: one slow run (a collection, another
process's burst) does not lift it over the bound, four slow runs in seven do."""

WaitListener = Callable[[str, float], None]
"""Told every wait recorded: ``("admission" | "decode", seconds)``."""


class GapPolicy:
    """Decides when training runs on an engine thread, and records what it cost inference."""

    def __init__(
        self,
        config: GapConfig,
        clock: Callable[[], float],
        *,
        on_wait: WaitListener | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.on_wait = on_wait
        """Told every recorded wait (for a metric), besides the deques below."""
        self._seen: dict[str, deque[tuple[float, float]]] = {}  # kind: last runs (s, work)
        self._measured_at: dict[str, float] = {}
        self._remeasure: str | None = None
        self._decode_s: float | None = None
        self._since_decode = 0.0
        self._steps: deque[float] = deque(maxlen=config.tail_steps)
        self._tail_s: float | None = None
        self._credit = 0.0
        """Seconds training may still add beside running sequences (rule 3's share)."""
        self._slice_used = 0.0
        self._running: _Running | None = None
        self._last: tuple[float, float] | None = None
        self.admission_waits: deque[float] = deque(maxlen=config.max_recorded_waits)
        """Seconds each request that arrived during a unit waited for it to end."""
        self.decode_delays: deque[float] = deque(maxlen=config.max_recorded_waits)
        """Seconds each unit run beside running sequences held back their next token."""
        self.training_seconds = 0.0
        """Time spent in training units."""

    # -- predictions --------------------------------------------------------------------------

    def observe(self, kind: str, work: int, seconds: float, *, fresh: bool = False) -> None:
        """Add a measured run of a ``kind`` unit of ``work`` to its last runs (``fresh``:
        forget the others)."""
        self._measured_at[kind] = self._clock()
        runs = self._seen.get(kind)
        if runs is None or fresh:
            runs = self._seen[kind] = deque(maxlen=PREDICTION_RUNS)
        runs.append((seconds, float(max(work, 1))))

    def predict(self, kind: str, work: int) -> float | None:
        """Predicted seconds of a ``kind`` unit of ``work``, ``None`` if never measured: the
        median time of the kind's last runs of at least that work (a smaller unit still pays
        fixed costs, such as reading the LM head's weights, so it is never predicted below
        them), or, when it is larger than all of them, the median of their times each scaled
        up linearly to its work."""
        runs = self._seen.get(kind)
        if not runs:
            return None
        work = max(work, 1)
        covering = [seconds for seconds, done in runs if done >= work]
        if covering:
            seconds = statistics.median(covering)
        else:
            seconds = statistics.median(seconds * work / done for seconds, done in runs)
        return seconds * self.config.safety

    def decode_step(self, seconds: float) -> None:
        """A decode step of the running sequences took ``seconds``: fold it into the decode
        step time, and start a new inter-token gap."""
        config = self.config
        previous, alpha = self._decode_s, config.ewma_alpha
        self._decode_s = seconds if previous is None else previous + alpha * (seconds - previous)
        self._since_decode = 0.0
        self._credit = min(config.yield_bound_s, self._credit + config.itl_share * seconds)
        self._steps.append(seconds)
        if len(self._steps) < 16 or len(self._steps) % 16 == 0:  # sorted now and then
            ordered = sorted(self._steps)
            self._tail_s = ordered[min(len(ordered) - 1, int(config.tail_quantile * len(ordered)))]

    def allowance(self) -> float | None:
        """Seconds a unit may take beside running sequences now (rule 3), ``None`` before a
        decode step was measured."""
        if self._decode_s is None or self._tail_s is None:
            return None
        config, gap = self.config, self._decode_s + self._since_decode
        if config.itl_budget_s > 0:
            return min(config.yield_bound_s, config.itl_budget_s - gap)
        tail = max(self._tail_s, (1 + config.itl_share) * self._decode_s)
        return min(config.yield_bound_s, self._credit, tail - gap)

    # -- the decision -------------------------------------------------------------------------

    def decide(self, kind: str, work: int, *, waiting: int, running: int) -> GapDecision:
        """May a ``kind`` unit of ``work`` run now, with ``waiting`` requests not yet admitted
        and ``running`` sequences decoding?"""
        predicted = self.predict(kind, work)
        bound = self.config.yield_bound_s
        if waiting > 0:
            self._slice_used = 0.0
            return GapDecision(False, GapReason.INFERENCE_WAITING, predicted, 0.0)
        if predicted is not None and predicted > bound:
            if running == 0 and self._stale(kind):
                self._remeasure = kind
                return GapDecision(True, GapReason.REMEASURE, predicted, bound)
            return GapDecision(False, GapReason.OVER_BOUND, predicted, bound)
        if running > 0:
            self._slice_used = 0.0
            allowance = self.allowance()
            if predicted is None or allowance is None:
                return GapDecision(False, GapReason.UNMEASURED, predicted, 0.0)
            reason = GapReason.SLACK if predicted <= allowance else GapReason.NO_SLACK
            return GapDecision(predicted <= allowance, reason, predicted, max(allowance, 0.0))
        left = self.config.idle_slice_s - self._slice_used
        if self._slice_used > 0 and (predicted or 0.0) > left:
            self._slice_used = 0.0
            return GapDecision(False, GapReason.SLICE_OVER, predicted, max(left, 0.0))
        return GapDecision(True, GapReason.IDLE, predicted, min(bound, max(left, 0.0)))

    def _stale(self, kind: str) -> bool:
        measured = self._measured_at.get(kind)
        return measured is not None and self._clock() - measured >= self.config.remeasure_after_s

    # -- measuring runs and their cost --------------------------------------------------------

    def unit_started(
        self, kind: str, work: int, *, running: int, seen: float | None = None
    ) -> None:
        """A ``kind`` unit of ``work`` starts now, ``running`` sequences decoding beside it;
        ``seen``: when the engine last found no new request (an arrival since then waits for
        the unit too; default now)."""
        if self._running is not None:
            raise RuntimeError("a training unit is already running")
        now = self._clock()
        fresh, self._remeasure = self._remeasure == kind, None
        seen = now if seen is None else min(seen, now)
        self._running = _Running(kind, work, now, seen, running > 0, [], fresh)

    def request_arrived(self, at: float | None = None) -> None:
        """An inference request arrived at ``at`` (the policy's clock; now if ``None``). If a
        unit was running then, the request waits for it: recorded when the unit ends (or at
        once, if the engine learns of the arrival after the unit ended)."""
        at = self._clock() if at is None else at
        unit = self._running
        if unit is not None and at >= unit.seen:
            unit.arrivals.append(at)
        elif self._last is not None and self._last[0] <= at < self._last[1]:
            self._record("admission", self._last[1] - at)

    def unit_finished(self) -> float:
        """The running unit ended now: measure it, record the waits it caused; returns its
        seconds."""
        unit = self._running
        if unit is None:
            raise RuntimeError("no training unit is running")
        ended = self._clock()
        seconds = ended - unit.started
        self.observe(unit.kind, unit.work, seconds, fresh=unit.fresh)
        for at in unit.arrivals:
            self._record("admission", ended - at)
        if unit.beside_sequences:
            self._record("decode", seconds)
            self._since_decode += seconds
            self._credit -= seconds
        else:
            self._slice_used += seconds
        self.training_seconds += seconds
        self._last = (unit.seen, ended)
        self._running = None
        return seconds

    def _record(self, wait: str, seconds: float) -> None:
        (self.admission_waits if wait == "admission" else self.decode_delays).append(seconds)
        if self.on_wait is not None:
            self.on_wait(wait, seconds)

    def wait_quantile(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank) of the recorded admission waits and decode
        delays together, ``None`` if there are none."""
        waits = sorted([*self.admission_waits, *self.decode_delays])
        if not waits:
            return None
        return waits[min(len(waits) - 1, max(0, math.ceil(q * len(waits)) - 1))]
