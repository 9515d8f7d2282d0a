"""What maps between Sluice and vLLM for :mod:`inference_node.engine.vllm_engine`: sampling
parameters, finish reasons, where a prompt goes in vLLM's priority queue, the checkpoint
directory vLLM loads, and a stat logger that keeps vLLM's own scheduler stats for the node's
load reports. vLLM is imported inside functions only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_node.engine.step_model import StepCost, StepModel
from inference_node.engine.step_times import StepTimes
from inference_node.engine.types import FinishReason, SamplingParams
from inference_node.loading import is_converted
from sluice.contract import WorkloadClass

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
        self._last_at: float | None = None

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


_KEY_GAP_S = 1e-6
"""How far before the waiting prompt it goes ahead of a placed prompt's key is."""


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
) -> Placement:
    """Where a prompt goes among ``waiting`` (BATCH's rank, sorted by key; behind
    ``ahead_tokens`` of prompts waiting at a higher rank): its class's rank at ``now``, but
    REALTIME keeps first come, first served among REALTIME (a later one cannot take the time
    a placed one counted on). A REALTIME prompt with a first-token ``budget_s`` under a fit
    with a prompt term goes as late among the waiting BATCH prompts as its first token is
    still predicted within the budget (:func:`_latest_fit`; behind fewer than ``seats``
    less the ``rows`` running, the sequences vLLM may run beside them: a prompt beyond
    waits for one to end); one without, or with no such place, right behind the last
    waiting REALTIME prompt. Ahead of every prompt there, it
    takes REALTIME's rank (vLLM then also preempts it last); elsewhere BATCH's, with a key
    between its neighbours'. Always overtaking cost BATCH what REALTIME did not need
    (``docs/decisions/node-vllm-realtime-placement.md``)."""
    rank = workload_class.rank
    if workload_class is not WorkloadClass.REALTIME:
        return Placement(rank, now)
    first = max((i + 1 for i, w in enumerate(waiting) if w.realtime), default=0)
    position = first
    if budget_s > 0 and cost is not None and cost.per_prefill_token_s > 0:
        free = len(waiting) if seats is None else max(0, seats - rows - 1)
        tokens = [ahead_tokens + prompt_tokens, *(w.tokens for w in waiting[:free])]
        position = max(first, _latest_fit(tokens, budget_s, rows, step_tokens, cost))
    if position == 0:
        return Placement(rank, now)
    band = WorkloadClass.BATCH.rank
    last = Placement(band, max(now, waiting[-1].key + _KEY_GAP_S))
    if position == len(waiting):
        return last
    after, before = waiting[position].key, waiting[position - 1].key
    key = after - min(_KEY_GAP_S, max(after - before, 0.0) / 2)
    return Placement(band, key) if before < key < after else last


def _latest_fit(
    tokens: Sequence[int], budget_s: float, rows: int, step_tokens: int, cost: StepCost
) -> int:
    """How many of the waiting prompts (``tokens[1:]``, in order) a prompt can wait behind
    with its first token predicted within ``budget_s`` (``tokens[0]``: its own and those
    always ahead); 0 when none. Predicted: the tokens ahead and its own, prefilled in steps of
    ``step_tokens`` less the ``rows`` decoding beside them at the fitted ``cost``, plus one
    whole step in flight."""
    room = max(1, step_tokens - rows)
    rows_s = cost.base_s + cost.per_sequence_s * rows
    in_flight = cost.predict(rows, room)
    total = sum(tokens)
    for position in range(len(tokens) - 1, 0, -1):
        predicted = max(1.0, total / room) * rows_s + cost.per_prefill_token_s * total
        if predicted + in_flight <= budget_s:
            return position
        total -= tokens[position]
    return 0


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


def vllm_sampling(params: SamplingParams, eos_ids: frozenset[int]) -> Any:
    """vLLM ``SamplingParams`` for Sluice's, streaming deltas."""
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
    )


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
