"""What maps between Sluice and vLLM for :mod:`inference_node.engine.vllm_engine`: sampling
parameters, finish reasons, where a prompt goes in vLLM's priority queue, which lower-class
sequence gives its seat to a REALTIME prompt, the checkpoint directory vLLM loads, and a stat
logger that keeps vLLM's own scheduler stats for the node's load reports. vLLM is imported
inside functions only.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from inference_node.engine.pace import PACE_KEY
from inference_node.engine.promises import MARGIN_S, SAFETY
from inference_node.engine.step_model import StepCost, StepModel
from inference_node.engine.step_times import StepTimes
from inference_node.engine.types import FinishReason, SamplingParams
from inference_node.loading import is_converted
from inference_node.model_types import LanguageModel
from sluice.contract import WorkloadClass

T = TypeVar("T")
_EWMA_ALPHA = 0.2
_STEP_GAP_CAP_S = 5.0
"""Gaps between vLLM's outputs longer than this are idle time, not a step."""


class VllmStats:
    """A vLLM per-engine stat logger (duck-typed ``StatLoggerBase``) keeping the latest
    scheduler stats, a decode-rate average, the step-time histogram and the step-time fit
    (each step's engine time against its decode rows and prefilled prompt tokens, as the
    built-in engine's: the scheduler's inter-token guard counts a vLLM node's batch with it)
    for ``stats()``. Called on the engine thread after each batch of engine-core outputs."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.decode_rate = 0.0
        self.steps = StepTimes()
        self.step_model = StepModel()
        self.prefix_hits = PrefixHits()
        self._last_at: float | None = None
        self.on_step: Callable[[], None] | None = None
        """Called after each record (on the engine thread): the engine's seat check."""

    def __call__(self, _vllm_config: Any, _engine_index: int = 0) -> VllmStats:
        return self  # the factory vLLM calls: one engine, this sink

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        now = time.monotonic()
        busy_before = self.running > 0
        self._fit_step(scheduler_stats)
        if scheduler_stats is not None:
            self.running = int(scheduler_stats.num_running_reqs)
            self.waiting = int(scheduler_stats.num_waiting_reqs) + int(
                getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            )
            self.kv_usage = float(scheduler_stats.kv_cache_usage)
        if self.on_step is not None and scheduler_stats is not None:
            self.on_step()
        tokens = int(iteration_stats.num_generation_tokens) if iteration_stats else 0
        last, self._last_at = self._last_at, now
        if last is None or not busy_before or tokens == 0:
            return
        gap = now - last
        if 0 < gap < _STEP_GAP_CAP_S:
            self.steps.observe(gap)
            rate = tokens / gap
            previous = self.decode_rate
            self.decode_rate = rate if not previous else previous + _EWMA_ALPHA * (rate - previous)

    def _fit_step(self, scheduler_stats: Any) -> None:
        """One engine step's time against its decode rows and the prompt tokens it prefilled
        (chunks counted as scheduled), as vLLM's iteration details give them (the engine is
        built with ``enable_logging_iteration_details``)."""
        details = getattr(scheduler_stats, "iteration_details", None)
        if details is None or getattr(details, "is_dummy", False) or details.elapsed_ms <= 0:
            return
        self.step_model.observe(
            details.elapsed_ms / 1000, details.num_generation_requests, details.num_ctx_tokens
        )

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def record_admission_rejection(self, _reason: str) -> None:
        pass


class PrefixHits:
    """The share of new prompts' tokens vLLM found in its prefix cache, over the last
    ``window`` prompts sent the first time (a preempted or paused prompt sent again finds its
    own blocks, which says nothing of the next new prompt's), weighted by their length."""

    def __init__(self, window: int = 64) -> None:
        self._prompts: deque[tuple[int, int]] = deque(maxlen=window)

    def observe(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A new prompt of ``prompt_tokens`` began with ``cached_tokens`` of them cached."""
        if prompt_tokens > 0:
            self._prompts.append((prompt_tokens, min(max(0, cached_tokens), prompt_tokens)))

    def ratio(self) -> float:
        """Cached over prompt tokens in the window (0 before any prompt)."""
        total = sum(p for p, _ in self._prompts)
        return sum(c for _, c in self._prompts) / total if total else 0.0


@dataclass(frozen=True)
class Waiting:
    """A prompt handed to vLLM that has not started (no output yet), in BATCH's band of the
    priority queue: its key there (vLLM's ``arrival_time``), whether it is REALTIME, its
    length."""

    key: float
    realtime: bool
    tokens: int


@dataclass(frozen=True)
class Placement:
    """Where a prompt goes in vLLM's queue (lower ``priority`` first, then lower ``key``)."""

    priority: int
    key: float
    predicted_s: float = field(default=0.0, compare=False)
    """A REALTIME prompt's first token predicted there (0: no step fit yet, or another
    class)."""


_BAND = WorkloadClass.BATCH.rank
"""The rank ``waiting`` prompts share (:func:`placement`)."""
KEY_GAP_S = 1e-6
"""How far before the waiting prompt it goes ahead of a placed prompt's key is."""
CALIBRATED_FROM_S = 0.5
"""REALTIME first tokens predicted at least this far off calibrate placement
(:class:`FirstTokenCalibration`): shorter ones are a step or two, whose error says nothing
of a queue's."""


class FirstTokenCalibration:
    """How much later than predicted REALTIME first tokens came lately: the ``quantile`` of
    (took - predicted) over the last ``window`` first tokens predicted
    :data:`CALIBRATED_FROM_S` or more, within ``max_age_s`` (split conformal prediction on a
    sliding window, as the scheduler's ``WaitCalibration``). None until ``min_samples`` are
    recent: :func:`placement` then places no prompt among BATCH ones. The prediction knows
    the prompts ahead and the step fit, not the steps a burst slows, the streams that join
    the batch meanwhile or the CPU the node's other processes take (``make bench-vllm``:
    placement uncalibrated missed REALTIME's 95 % in bursts in each of four runs)."""

    def __init__(
        self, window: int = 64, max_age_s: float = 60.0, quantile: float = 0.9, min_samples: int = 8
    ) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)
        self._max_age = max_age_s
        self._quantile = quantile
        self._min_samples = min_samples

    def record(self, now: float, predicted_s: float, took_s: float) -> None:
        """A REALTIME first token predicted in ``predicted_s`` came in ``took_s``."""
        if predicted_s >= CALIBRATED_FROM_S:
            self._samples.append((now, took_s - predicted_s))

    def margin(self, now: float) -> float | None:
        """Seconds to add to a prediction; None while too few are recent."""
        while self._samples and self._samples[0][0] < now - self._max_age:
            self._samples.popleft()
        if len(self._samples) < self._min_samples:
            return None
        residuals = sorted(r for _, r in self._samples)
        rank = min(len(residuals) - 1, math.ceil(self._quantile * len(residuals)) - 1)
        return max(0.0, residuals[rank])


def placement(
    workload_class: WorkloadClass,
    budget_s: float,
    prompt_tokens: int,
    waiting: Sequence[Waiting],
    ahead_tokens: int,
    rows: int,
    step_tokens: int,
    cost: StepCost | None,
    now: float,
    seats: int | None = None,
    margin_s: float | None = 0.0,
    own_s: float = 0.0,
) -> Placement:
    """Where a prompt goes among ``waiting`` (BATCH's rank, sorted by key; behind
    ``ahead_tokens`` of prompts waiting at a higher rank): its class's rank, keyed by its
    :func:`finish_tag` (``own_s``: its prefill alone at the fitted cost), but no REALTIME
    prompt goes ahead of a REALTIME prompt placed among BATCH ones, nor a BATCH prompt (a
    later one cannot take the time a placed one counted on). A REALTIME prompt with a
    first-token ``budget_s`` under a fit with a prompt term goes as late among the waiting
    BATCH prompts as its first token is still predicted within the budget, ``margin_s`` added
    (:class:`FirstTokenCalibration`; None: not calibrated, no such place) (:func:`_latest_fit`;
    behind fewer than ``seats`` less the ``rows`` running, the sequences vLLM may run beside
    them: a prompt beyond waits for one to end); one without, or with no such place, right
    behind the last REALTIME prompt placed there. Ahead of every prompt there, it takes
    REALTIME's rank (vLLM then also preempts it last); elsewhere BATCH's, with a key between
    its neighbours'. Always overtaking cost BATCH what REALTIME did not need
    (``docs/decisions/node-vllm-realtime-placement.md``)."""
    rank, tag = workload_class.rank, finish_tag(now, own_s)
    if workload_class is not WorkloadClass.REALTIME:
        placed = [w.key + KEY_GAP_S for w in waiting if w.realtime] if rank == _BAND else []
        return Placement(rank, max([tag, *placed]))
    first = max((i + 1 for i, w in enumerate(waiting) if w.realtime), default=0)
    position = first
    free = len(waiting) if seats is None else max(0, seats - rows - 1)
    tokens = [ahead_tokens + prompt_tokens, *(w.tokens for w in waiting[:free])]
    if budget_s > 0 and margin_s is not None and cost is not None and cost.per_prefill_token_s > 0:
        fit = _latest_fit(tokens, budget_s - margin_s, rows, step_tokens, cost)
        position = max(first, fit)

    def predicted(behind: int) -> float:
        if cost is None or not cost.per_prefill_token_s > 0:
            return 0.0
        ahead = ahead_tokens + prompt_tokens + sum(w.tokens for w in waiting[:behind])
        return first_token_s(ahead, rows, step_tokens, cost)

    if position == 0:
        return Placement(rank, tag, predicted(0))
    last = Placement(_BAND, max(now, waiting[-1].key + KEY_GAP_S), predicted(len(waiting)))
    if position == len(waiting):
        return last
    after, before = waiting[position].key, waiting[position - 1].key
    key = after - min(KEY_GAP_S, max(after - before, 0.0) / 2)
    return Placement(_BAND, key, predicted(position)) if before < key < after else last


def finish_tag(arrival_s: float, own_s: float) -> float:
    """A prompt's key at its class's rank: when its prefill would end had it run alone on
    arrival (``own_s``: that prefill at the fitted cost; 0 without a fit), shortest prefill
    first with aging. Within a class a short prompt passes a long one that came less than the
    long one's own prefill time before it, never one that came earlier than that: in a burst,
    one step's chunk then gives more first tokens within a target than first come, first served
    (``docs/decisions/node-vllm-prefill-finish-tags.md``)."""
    return arrival_s + max(0.0, own_s)


def first_token_s(tokens: int, rows: int, step_tokens: int, cost: StepCost) -> float:
    """A first token predicted behind ``tokens`` of prompts (its own included): prefilled in
    steps of ``step_tokens`` less the ``rows`` decoding beside them at the fitted ``cost``,
    plus one whole step in flight."""
    room = max(1, step_tokens - rows)
    rows_s = cost.base_s + cost.per_sequence_s * rows
    prefill = max(1.0, tokens / room) * rows_s + cost.per_prefill_token_s * tokens
    return prefill + cost.predict(rows, room)


def _latest_fit(
    tokens: Sequence[int], budget_s: float, rows: int, step_tokens: int, cost: StepCost
) -> int:
    """How many of the waiting prompts (``tokens[1:]``, in order) a prompt can wait behind
    with its first token predicted within ``budget_s`` (``tokens[0]``: its own and those
    always ahead; :func:`first_token_s`); 0 when none."""
    total = sum(tokens)
    for position in range(len(tokens) - 1, 0, -1):
        if first_token_s(total, rows, step_tokens, cost) <= budget_s:
            return position
        total -= tokens[position]
    return 0


@dataclass(frozen=True)
class Seat:
    """A request handed to vLLM, as :func:`seat_preemptions` sees it: its id, class rank,
    place in vLLM's queue (priority, key), whether it runs (vLLM sent it output), and whether
    it may give its seat up (a lower class, and nothing a restart would change: no stop
    strings, no seeded sampling, slack before its caller's deadline)."""

    request_id: str
    rank: int
    order: tuple[int, float]
    started: bool
    movable: bool = False


def held_by_vllm(unstarted: Sequence[T], waiting: int) -> Sequence[T]:
    """The requests vLLM holds back: the last ``waiting`` of those not started, in queue
    order (vLLM knows no classes; its waiting count is all it reports)."""
    return unstarted[max(0, len(unstarted) - waiting) :] if waiting > 0 else []


def seat_preemptions(
    seats: Sequence[Seat], running: int, waiting: int, max_sequences: int, seating: Collection[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """Pairs (REALTIME request waiting for a seat, running lower-class request to preempt for
    it), and the REALTIME prompts placed among BATCH ones that a held-back BATCH prompt is
    ahead of (to go back at REALTIME's rank: a freed seat would never reach them).

    vLLM preempts only for KV cache; with ``max_sequences`` running, a REALTIME prompt waits,
    whatever its priority, until some sequence ends (``make bench-vllm`` 05:32, overload at
    4x: six REALTIME first tokens of 2.6-2.9 s with every seat taken). Its ``waiting``
    requests are the last of those not started in queue order (the ones vLLM holds back).
    Those of them that are REALTIME with no other class held back ahead of them (a freed seat
    goes to the first held back) and not already ``seating`` (a preemption for them in
    flight) each take the seat of a movable lower-class one: the lowest class, latest in the
    queue first (whom vLLM itself would preempt), which goes back to the queue (behind any
    REALTIME prompt placed among BATCH ones)."""
    if running < max_sequences or waiting <= 0:
        return [], []
    unstarted = sorted((s for s in seats if not s.started), key=lambda s: s.order)
    top = WorkloadClass.REALTIME.rank
    need: list[str] = []
    lifts: list[str] = []
    behind_other = False
    for held in held_by_vllm(unstarted, waiting):
        behind_other = behind_other or held.rank != top
        if held.rank != top:
            continue
        if behind_other:
            lifts.append(held.request_id)
        elif held.request_id not in seating:
            need.append(held.request_id)
    if not need:
        return [], lifts
    victims = sorted(
        (s for s in seats if s.started and s.movable and s.rank > top),
        key=lambda s: (s.rank, s.order),
        reverse=True,
    )
    return list(zip(need, (v.request_id for v in victims), strict=False)), lifts


def may_give_seat(
    params: SamplingParams,
    time_left_s: float,
    elapsed_s: float,
    tokens: tuple[int, int],
    cost: StepCost | None,
    rows: int,
) -> bool:
    """Whether a running sequence may be preempted (:attr:`Seat.movable`, its class aside):
    no stop strings (vLLM holds back text that may start one, which a restart would drop),
    no seeded sampling (a restart draws from a fresh generator), and its slack over
    :data:`~.promises.MARGIN_S`: the ``time_left_s`` its caller gave at submit (0: no
    deadline) less the ``elapsed_s`` since, its remaining tokens (``tokens[0]``) at a step
    of ``rows`` (``SAFETY`` times over) and prefilling again its prompt and output so far
    (``tokens[1]``), as the built-in engine prices it (:mod:`~.promises`)."""
    if params.stop or (params.seed is not None and params.temperature > 0):
        return False
    if time_left_s <= 0:
        return True
    need = 0.0
    if cost is not None:
        step_s = cost.base_s + cost.per_sequence_s * rows
        need = SAFETY * tokens[0] * step_s + cost.per_prefill_token_s * tokens[1]
    return time_left_s - elapsed_s - need > MARGIN_S


def finish_reason(reason: str | None, stop_reason: Any) -> FinishReason | None:
    """vLLM's ``finish_reason``/``stop_reason`` as Sluice's: ``stop`` on a stop string is STOP,
    on EOS or a stop token id EOS; ``length`` LENGTH; ``abort`` CANCELLED."""
    if reason is None:
        return None
    if reason == "length":
        return FinishReason.LENGTH
    if reason == "stop":
        return FinishReason.STOP if isinstance(stop_reason, str) else FinishReason.EOS
    return FinishReason.CANCELLED


def vllm_sampling(
    params: SamplingParams, eos_ids: frozenset[int], pace: dict[str, Any] | None = None
) -> Any:
    """vLLM ``SamplingParams`` for Sluice's, streaming deltas; ``pace``
    (:func:`~inference_node.engine.pace.pace_args`) goes to the engine core's scheduler
    (:mod:`~inference_node.engine.vllm_pace`)."""
    from vllm import SamplingParams as VllmSamplingParams  # type: ignore[import-not-found]  # noqa: PLC0415
    from vllm.sampling_params import RequestOutputKind  # type: ignore[import-not-found]  # noqa: PLC0415

    return VllmSamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=list(params.stop) or None,
        stop_token_ids=None if params.ignore_eos else sorted(eos_ids),
        ignore_eos=params.ignore_eos,
        output_kind=RequestOutputKind.DELTA,
        skip_special_tokens=True,
        extra_args={PACE_KEY: pace} if pace else None,
    )


@dataclass(frozen=True)
class VllmOptions:
    """How the node sets vLLM up (from ``NodeSettings``)."""

    model_dir: Path  # a Hugging Face checkpoint directory (config, safetensors, tokenizer)
    dtype: str = "float32"
    max_sequences: int = 32
    max_batched_tokens: int = 512
    kv_budget_bytes: int = 2 * 1024**3
    max_waiting: int = 256
    enforce_eager: bool = False  # skip torch.compile (faster start, slower steps)
    prefix_caching: bool = True  # and the pauses of lower-class prefills it makes cheap
    pace: bool = True  # cap steps' prompt tokens to keep streams at their pace (vllm_pace)


def engine_args(o: VllmOptions, lm: LanguageModel) -> dict[str, Any]:
    """vLLM's ``AsyncEngineArgs`` for a node serving ``lm`` with ``o``."""
    return {
        "model": str(o.model_dir),
        "served_model_name": [lm.name],
        "dtype": o.dtype,
        "max_model_len": lm.max_context_tokens,
        "max_num_seqs": o.max_sequences,
        "max_num_batched_tokens": o.max_batched_tokens,
        "kv_cache_memory_bytes": o.kv_budget_bytes,
        "scheduling_policy": "priority",
        "enable_prefix_caching": o.prefix_caching,
        "enforce_eager": o.enforce_eager,
        "disable_log_stats": True,  # the node's stat logger only (vllm_engine's doc)
        "enable_logging_iteration_details": True,  # each step's rows and time: the step fit
        **(paced_scheduler() if o.pace else {}),
    }


def paced_scheduler() -> dict[str, Any]:
    """Engine arguments for vLLM's scheduler with the pace cap
    (:mod:`~inference_node.engine.vllm_pace`): its synchronous scheduler on CPU (where vLLM
    turns asynchronous scheduling off), else its asynchronous one, with asynchronous scheduling
    asked for so that the two agree."""
    from vllm.platforms import current_platform  # type: ignore[import-not-found]  # noqa: PLC0415

    if current_platform.is_cpu():
        return {"scheduler_cls": "inference_node.engine.vllm_pace.PacedScheduler"}
    return {
        "scheduler_cls": "inference_node.engine.vllm_pace.PacedAsyncScheduler",
        "async_scheduling": True,
    }


def checkpoint_dir(name: str, model_path: Path | None, cache_dir: Path) -> Path:
    """The Hugging Face directory vLLM loads for generator ``name``: ``model_path`` when given,
    else the node's converted copy of a built-in GGUF model (``<cache_dir>/<name>``, written by
    :func:`inference_node.loading.convert_gguf`: config, safetensors, tokenizer, template).
    ``ValueError`` when there is none (``tiny-random-llama`` is built in-process)."""
    if model_path is not None:
        return Path(model_path)
    target = Path(cache_dir) / name
    if is_converted(target):
        return target
    raise ValueError(
        f"the vLLM engine needs a Hugging Face checkpoint directory for {name!r}: "
        "serve smollm2-135m-instruct or pass --model-path"
    )
