"""Continuous (iteration-level) batching on one model-owning thread.

Every engine step:

1. new requests move from the inbox to the waiting heap, ordered by (workload class, arrival);
   cancelled requests leave (a running one frees its slot now);
2. admission: while the step's token budget (``max_batched_tokens`` minus one token per
   decoding sequence) and a free slot last (within the batch the sequences' step budgets
   allow, :mod:`sluice.itl`), the best waiting request gets a slot and a prefill chunk. With
   every slot taken, it preempts running sequences of a lower class that can afford a pause
   before their deadline (:mod:`~inference_node.engine.promises`: lowest class, latest
   arrival first), as many as free one slot (several when a fine-tune took slots); each goes
   back to wait with its generated tokens appended to its prompt, recomputed when readmitted
   (its stream pauses; nothing sent is lost or repeated), first once its deadline nears;
3. one forward pass (:class:`LlamaRunner.step`) runs the decode token of every running sequence
   and every prefill chunk together;
4. each row's token is sampled and streamed at once; finished sequences free their slots (the
   last running sequence moves into the hole so running slots stay ``0..B-1``), and sequences
   whose prefill completed join the running batch for the next step.

So a request never waits for another's generation to end: it joins at the next step.

Adapters (multi-LoRA, :mod:`inference_node.engine.lora_rows`): a request may name a LoRA
adapter of the model, held in the node's :class:`AdapterCache` from intake until it ends; it
waits outside the batch while the adapter loads (on the cache's thread), and ends alone with
an :class:`~inference_node.adapters.AdapterError` if it cannot. Sequences of different
adapters and of the base model share every step.

Fine-tuning (:mod:`~inference_node.engine.gap_training`): a :class:`TrainingRun` runs unit
by unit on this thread in the gaps its policy allows (docs/decisions/node-training-units.md),
or on a thread and CUDA stream of its own (:mod:`~inference_node.engine.concurrent_training`;
decode then runs on a high-priority stream). Its memory takes whole KV slots while it runs,
and its units wait while more sequences than the rest run.

Failure isolation: the work for one sequence alone (its sampler and text stream, sampling
its row, detokenizing, its stop strings) runs under its own ``try``: an exception there ends
that request with :class:`RequestFaultError` and the batch goes on. Only a failure of the
shared step (the forward pass, the slot bookkeeping) ends every running sequence, with
:class:`EngineFaultError`; waiting requests stay queued and the engine keeps serving.
"""

from __future__ import annotations

import heapq
import queue
import time
from typing import TYPE_CHECKING

import structlog
import torch

from inference_node.adapters import AdapterCache, AdapterError
from inference_node.engine.base import WAKE, Job, JobState, ThreadedEngine
from inference_node.engine.concurrent_training import use_decode_stream
from inference_node.engine.gap_training import GapTrainer, TrainingMemoryError, TrainingRun
from inference_node.engine.llama import LlamaRunner, Prefill
from inference_node.engine.lora_rows import EngineAdapters
from inference_node.engine.promises import Costs, pin_due, victims
from inference_node.engine.sequences import BatchingConfig, BatchSequence
from inference_node.engine.text import SamplingError, TextStream, make_generator, sample
from inference_node.engine.types import (
    EngineClosedError,
    EngineFaultError,
    FinishReason,
    RequestFaultError,
    RequestTooLargeError,
    TokenDelta,
)
from inference_node.model_types import LanguageModel
from inference_node.training import GapConfig
from sluice.itl import fitted_limit

if TYPE_CHECKING:  # the metrics module imports this package
    from inference_node.metrics import TrainingMetrics

log = structlog.get_logger(__name__)

MIN_SLOT_TOKENS = 64
ADAPTER_POLL_S = 0.005
"""How often an otherwise idle engine looks whether an adapter it waits for has loaded."""


class BatchingEngine(ThreadedEngine):
    """Continuous batching over :class:`LlamaRunner` (Llama-family models). ``adapters``, the
    node's cache of ``lm``'s LoRA adapters (closed with the engine), lets requests name one
    (``EngineRequest.adapter``); without it a request naming one is refused at submit."""

    _thread_name = "batching-engine"

    def __init__(
        self,
        lm: LanguageModel,
        config: BatchingConfig | None = None,
        adapters: AdapterCache | None = None,
    ) -> None:
        config = config or BatchingConfig()
        super().__init__(lm, max_waiting=config.max_waiting, kv_budget_bytes=config.kv_budget_bytes)
        self.config = config
        per_token = self._kv_per_token
        slots = max(1, config.max_sequences)
        max_len = min(lm.max_context_tokens, config.kv_budget_bytes // (slots * per_token))
        if max_len < MIN_SLOT_TOKENS:
            raise ValueError(
                f"KV budget {config.kv_budget_bytes} B is too small for {slots} sequences "
                f"(each needs at least {MIN_SLOT_TOKENS * per_token} B)"
            )
        self.slot_tokens = int(max_len)
        self._runner = LlamaRunner(lm, slots=slots, max_len=self.slot_tokens)
        self._slots: list[BatchSequence | None] = [None] * slots
        self._ready = 0  # slots 0.._ready-1 hold sequences that decode this step
        self._waiting: list[tuple[tuple[int, int], BatchSequence]] = []
        self._kv_budget = slots * self.slot_tokens * per_token
        self._adapters: EngineAdapters[BatchSequence] = EngineAdapters(lm, adapters)
        self.training = GapTrainer(lm.name)
        """The fine-tune on this engine, and the gap policy it runs by."""
        log.info(
            "batching_engine_ready",
            model=lm.name,
            slots=slots,
            slot_tokens=self.slot_tokens,
            kv_bytes=self._kv_budget,
            adapter_cache_bytes=adapters.capacity_bytes if adapters is not None else 0,
        )

    def _check_fits(self, total_tokens: int) -> None:
        if total_tokens > self.slot_tokens:
            raise RequestTooLargeError(
                f"request needs {total_tokens} tokens of KV cache; with a budget of "
                f"{self.config.kv_budget_bytes} B over {len(self._slots)} sequences a sequence "
                f"holds at most {self.slot_tokens}"
            )

    def _adapter_violations(self, reference: str) -> list[tuple[str, str]]:
        return self._adapters.violations(reference)

    def _adapter_bytes(self) -> tuple[int, int]:
        cache = self._adapters.cache
        return self._adapters.nbytes(), cache.capacity_bytes if cache is not None else 0

    def _kv_budget_now(self) -> int:
        return self._slot_limit() * self.slot_tokens * self._kv_per_token

    def _slot_limit(self) -> int:
        """Slots sequences may hold: all of them, less those a fine-tune's memory takes."""
        return len(self._slots) - self.training.reserved_slots

    def training_slots(self, memory_bytes: int) -> int:
        """KV slots a fine-tune holding ``memory_bytes`` takes from inference;
        :class:`TrainingMemoryError` when that would leave none."""
        slot_bytes = self.slot_tokens * self._kv_per_token
        needed = max(1, -(-memory_bytes // slot_bytes))
        if needed > len(self._slots) - 1:
            raise TrainingMemoryError(
                f"training needs {memory_bytes} bytes: {needed} of the node's "
                f"{len(self._slots)} KV slots of {slot_bytes} bytes, and at most "
                f"{(len(self._slots) - 1) * slot_bytes} bytes can go to training beside "
                "one sequence"
            )
        return needed

    def start_training(
        self, run: TrainingRun, gaps: GapConfig, metrics: TrainingMetrics | None = None
    ) -> None:
        """Hand ``run`` to the engine thread (call it on the event loop). Its memory takes
        whole KV slots (:meth:`training_slots`) from now until it leaves;
        :class:`TrainingBusyError` while another runs, :class:`EngineClosedError` once
        draining."""
        needed = self.training_slots(run.memory_bytes)
        with self._lock:
            if self._closed:
                raise EngineClosedError("engine is not accepting work")
        run.reserved_slots = needed
        self.training.offer(run, gaps, metrics)
        self.wake()

    def wake(self) -> None:
        """Make the engine thread look at its fine-tune now (after a stop request)."""
        self._inbox.put(WAKE)

    def close(self) -> None:
        """Stop the engine (see :meth:`ThreadedEngine.close`), then its adapter cache."""
        super().close()
        if self._adapters.cache is not None:
            self._adapters.cache.close()

    # -- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        use_decode_stream(self._lm.device)
        log.info("engine_started", model=self._lm.name)
        while not self._stopping.is_set():
            if not self._intake():
                break
            try:
                self._drop_cancelled()
                self._step()
            except Exception as exc:
                log.exception("engine_step_failed", model=self._lm.name)
                self._fail_all(exc)
            self._train()
        self._fail_all(None)
        self.training.close(EngineClosedError("the engine stopped"))
        log.info("engine_stopped", model=self._lm.name)

    def _active(self) -> list[BatchSequence]:
        return [s for s in self._slots if s is not None]

    def _intake(self) -> bool:
        """Move new jobs to the waiting heap (or, while their adapter loads, aside); block
        while there is nothing to do."""
        wait = self._idle_wait() if not self._waiting and not self._active() else 0.0
        while True:
            try:
                job = self._inbox.get(wait != 0.0, wait)
            except queue.Empty:
                self._take_loaded()
                return True
            if job is None:
                return False
            wait = 0.0
            if not isinstance(job, Job):  # a wake-up: look at the fine-tune
                continue
            self.training.request_arrived(job.arrived)
            params = job.request.params
            try:
                seq = BatchSequence(
                    job,
                    TextStream(self._lm, params, len(job.request.prompt_token_ids), self._eos_ids),
                    make_generator(params, self._lm.device),
                )
            except Exception as exc:
                self._finish(job, self._request_fault(job, "setup", exc))
                continue
            try:
                ready = self._adapters.begin(seq, job.request.adapter)
            except AdapterError as exc:
                self._finish(job, exc)
                continue
            if ready:
                heapq.heappush(self._waiting, (seq.key, seq))

    def _idle_wait(self) -> float | None:
        """How long an engine with no sequence may sleep waiting for work (``None``: until
        some comes): briefly while an adapter loads, not at all while training may run."""
        waits = [w for w in (self.training.idle_wait(),) if w is not None]
        if self._adapters.loading:
            waits.append(ADAPTER_POLL_S)
        return min(waits) if waits else None

    def _train(self) -> None:
        """Run fine-tune units while the gap policy allows, stopping as soon as a request
        arrives (docs/decisions/node-training-units.md)."""
        while self.training.run is not None and not self._stopping.is_set():
            seen = time.perf_counter()
            if not self._inbox.empty():
                return
            admitted = len(self._active())
            if not self.training.run_unit(
                waiting=len(self._waiting) + int(self._adapters.loading),
                running=admitted,
                memory_free=admitted <= self._slot_limit(),
                seen=seen,
            ):
                return

    def _take_loaded(self) -> None:
        """Queue the sequences whose adapter has loaded; end those whose adapter failed."""
        for seq, error in self._adapters.poll():
            if seq.job.state is JobState.DONE:  # cancelled while its adapter loaded
                self._adapters.release(seq)
            elif error is not None:
                self._finish(seq.job, error)
            else:
                heapq.heappush(self._waiting, (seq.key, seq))

    def _drop_cancelled(self) -> None:
        for seq in sorted(self._active(), key=lambda s: -s.slot):
            if seq.job.cancel_requested or self._stopping.is_set():
                self._release(seq)
                self._adapters.release(seq)
                self._finish(seq.job, seq.text.final(FinishReason.CANCELLED))

    def _release(self, seq: BatchSequence) -> None:
        """Free ``seq``'s slot, keeping running sequences in slots 0.._ready-1."""
        slot = seq.slot
        if slot < self._ready:
            last = self._ready - 1
            if slot != last:
                moved = self._slots[last]
                assert moved is not None
                self._runner.move(last, slot, moved.computed)
                moved.slot = slot
                self._slots[slot] = moved
            self._slots[last] = None
            self._ready -= 1
        else:
            self._slots[slot] = None
        seq.slot = -1

    def _make_ready(self, seq: BatchSequence) -> None:
        """Move a freshly prefilled sequence into slot ``_ready`` and count it as running."""
        target = self._ready
        if seq.slot != target:
            other = self._slots[target]
            if other is not None:  # a sequence still prefilling: the two trade slots (every
                # slot may be taken, so none is free to park it in)
                self._runner.swap(target, seq.slot, other.computed, seq.computed)
                other.slot = seq.slot
                self._slots[other.slot] = other
            else:
                self._runner.move(seq.slot, target, seq.computed)
                self._slots[seq.slot] = None
            seq.slot = target
            self._slots[target] = seq
        self._ready += 1

    def _admit(self, budget: int) -> list[Prefill]:
        """Continue partial prefills, then admit waiting requests (preempting if needed)."""
        prefills: list[Prefill] = []
        for seq in self._active():
            if seq.slot >= self._ready and budget > 0:
                budget -= self._plan_prefill(seq, budget, prefills)
        pin_due(self._waiting, self._active(), self._costs)
        while self._waiting and budget > 0:
            _, candidate = self._waiting[0]
            if candidate.job.state is JobState.DONE:
                heapq.heappop(self._waiting)
                self._adapters.release(candidate)
                continue
            if not self._room_for(candidate):
                break
            heapq.heappop(self._waiting)
            with self._lock:
                if candidate.job.state is not JobState.WAITING or candidate.job.cancel_requested:
                    self._adapters.release(candidate)
                    continue
                candidate.job.state = JobState.RUNNING
            slot = self._slots.index(None, self._ready)
            candidate.slot = slot
            self._slots[slot] = candidate
            budget -= self._plan_prefill(candidate, budget, prefills)
        return prefills

    def _plan_prefill(self, seq: BatchSequence, budget: int, prefills: list[Prefill]) -> int:
        start = seq.computed
        n = min(len(seq.tokens) - start, budget)
        prefills.append(
            Prefill(
                slot=seq.slot,
                tokens=seq.tokens[start : start + n],
                start=start,
                wants_logits=start + n == len(seq.tokens),
            )
        )
        return n

    def _room_for(self, candidate: BatchSequence) -> bool:
        """Whether ``candidate`` gets a slot: a free one within :meth:`_slot_limit` and the
        batch the tightest step budget among it and those it cannot preempt allows, else as
        many preempted as bring the sequences under the limit (several after a fine-tune)."""
        active, rank = self._active(), candidate.job.workload_class.rank
        kept = [s for s in [*active, candidate] if s.job.workload_class.rank <= rank]
        fit = fitted_limit(self.step_model.cost, (s.job.request.step_budget_s for s in kept))
        over = len(active) - min(self._slot_limit(), fit or self._slot_limit()) + 1
        return over <= 0 or self._preempt_for(candidate, over)

    def _costs(self) -> Costs:
        active, fit, prefill = self._active(), self.step_model.cost, self.prefill_per_step
        budgets = (s.job.request.step_budget_s for s in [*active, *(s for _, s in self._waiting)])
        return Costs.of(fit, self._slot_limit(), budgets, prefill, active)

    def _preempt_for(self, candidate: BatchSequence, count: int) -> bool:
        """Free ``count`` slots for ``candidate`` by preempting lower-class sequences (its own
        class too, for a pinned one) that :func:`.promises.pin_due` left unpinned."""
        rank = candidate.job.workload_class.rank - int(candidate.pinned)
        running = (s for s in self._slots[: self._ready] if s is not None)
        chosen = victims(running, rank, count)
        if chosen is None:
            return False
        for victim in chosen:
            self._release(victim)
            victim.computed = 0
            with self._lock:
                if victim.job.state is JobState.RUNNING:
                    victim.job.state = JobState.WAITING
            heapq.heappush(self._waiting, (victim.key, victim))
            log.info(
                "sequence_preempted",
                request_id=victim.job.request.request_id,
                by=candidate.job.request.request_id,
                generated=len(victim.text.generated),
            )
        return True

    def _step(self) -> None:
        prefills = self._admit(self.config.max_batched_tokens - self._ready)
        ready = self._slots[: self._ready]
        if not ready and not prefills:
            return
        rows: list[BatchSequence] = [s for s in ready if s is not None]
        decode_tokens = [s.tokens[-1] for s in rows]
        decode_positions = [len(s.tokens) - 1 for s in rows]
        lora = self._adapters.rows(rows, [(self._sequence(p), len(p.tokens)) for p in prefills])
        started = time.perf_counter()
        logits = self._runner.step(decode_tokens, decode_positions, prefills, lora)
        elapsed = time.perf_counter() - started
        if decode_tokens:
            prefilled = sum(len(p.tokens) for p in prefills)
            self._record_decode_step(elapsed, len(decode_tokens), prefilled)
            self.training.decode_step(elapsed)
        for seq in rows:
            seq.computed += 1
        for p in prefills:
            seq = self._sequence(p)
            seq.computed += len(p.tokens)
            if p.wants_logits:
                rows.append(seq)
        self._kv_used = sum(s.computed for s in self._active()) * self._kv_per_token
        self._emit(rows, self._sample(logits, rows))

    def _sequence(self, prefill: Prefill) -> BatchSequence:
        seq = self._slots[prefill.slot]
        assert seq is not None
        return seq

    def _emit(self, rows: list[BatchSequence], tokens: list[int | RequestFaultError]) -> None:
        """Stream each row's token; end those that finished or faulted; run the prefilled."""
        ended: list[tuple[BatchSequence, TokenDelta | RequestFaultError]] = []
        newly_ready: list[BatchSequence] = []
        for seq, token in zip(rows, tokens, strict=True):
            item = token if isinstance(token, RequestFaultError) else self._push(seq, token)
            if isinstance(item, RequestFaultError) or item.finish_reason is not None:
                ended.append((seq, item))
                continue
            seq.job.deliver(item)
            if seq.slot >= self._ready:
                newly_ready.append(seq)
        for seq, _ in ended:
            self._release(seq)
            self._adapters.release(seq)
        self._kv_used = sum(s.computed for s in self._active()) * self._kv_per_token
        for seq, item in ended:
            self._finish(seq.job, item)
        for seq in sorted(newly_ready, key=lambda s: s.slot):
            self._make_ready(seq)

    def _push(self, seq: BatchSequence, token: int) -> TokenDelta | RequestFaultError:
        """Add ``token`` to ``seq``: detokenize, check stop strings (its own work, isolated)."""
        try:
            delta = seq.text.push(token)
        except Exception as exc:
            return self._request_fault(seq.job, "decoding", exc)
        seq.tokens.append(token)
        seq.job.generated = len(seq.text.generated)
        return delta

    def _sample(
        self, logits: torch.Tensor, rows: list[BatchSequence]
    ) -> list[int | RequestFaultError]:
        """One token per row, or the fault that ends that row's request alone.

        A row whose largest logit is not finite (a NaN propagates into it) is that request's
        fault; every row of a batch of several being so points at the node (weights,
        device), so that raises :class:`EngineFaultError` instead."""
        if not rows:
            return []
        broken = (~torch.isfinite(logits.max(dim=-1).values)).tolist()
        if len(rows) > 1 and all(broken):
            raise EngineFaultError(f"the logits of all {len(rows)} rows are not finite")
        greedy = torch.argmax(logits, dim=-1).tolist()
        out: list[int | RequestFaultError] = []
        for i, seq in enumerate(rows):
            try:
                if broken[i]:
                    raise SamplingError("the model's logits for this request are not finite")
                token = greedy[i]
                if seq.generator is not None:
                    token = sample(logits[i], seq.text.params, seq.generator)
                out.append(int(token))
            except Exception as exc:
                out.append(self._request_fault(seq.job, "sampling", exc))
        return out

    def _fail_all(self, exc: BaseException | None) -> None:
        """End every active sequence: with an :class:`EngineFaultError` caused by ``exc``
        (the shared step failed), or cancelled (``None``: the engine is stopping)."""
        for seq in self._active():
            self._slots[seq.slot] = None
            self._adapters.release(seq)
            item: TokenDelta | BaseException = seq.text.final(FinishReason.CANCELLED)
            if exc is not None:
                item = EngineFaultError(
                    str(exc)
                    if isinstance(exc, EngineFaultError)
                    else f"the engine step failed ({type(exc).__name__})"
                )
                item.__cause__ = exc
            self._finish(seq.job, item)
        self._ready = 0
        self._kv_used = 0
