"""A simple engine that serves one request at a time on a dedicated thread.

The thread picks the next request in priority order (lowest workload class first, then first
come first served), prefills its prompt once, then decodes one token per step with the HF
model's own KV cache. It runs any Hugging Face causal LM, so it is the fallback for
architectures the batching engine's runner does not support.
"""

from __future__ import annotations

import heapq
import queue
import time
from typing import Any

import structlog
import torch

from inference_node.engine.base import Job, JobState, ThreadedEngine
from inference_node.engine.text import TextStream, make_generator, sample
from inference_node.engine.types import (
    EngineFaultError,
    FinishReason,
    RequestFaultError,
    TokenDelta,
)

log = structlog.get_logger(__name__)


class SerialEngine(ThreadedEngine):
    """Serves requests one at a time, in priority order, on one model-owning thread."""

    _thread_name = "serial-engine"
    _prefills_beside_decode = False

    def _finish(self, job: Job, item: TokenDelta | BaseException) -> None:
        self._kv_used = 0  # one request at a time: its cache goes with it
        super()._finish(job, item)

    def _run(self) -> None:
        heap: list[tuple[int, int, Job]] = []
        log.info("engine_started", model=self._lm.name, kv_budget_bytes=self._kv_budget)
        while not self._stopping.is_set():
            job = self._next_job(heap)
            if job is not None:
                self._serve(job)
        log.info("engine_stopped", model=self._lm.name)

    def _next_job(self, heap: list[tuple[int, int, Job]]) -> Job | None:
        """Move new arrivals into ``heap`` (blocking while idle) and claim the best one."""
        block = not heap
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                break
            if item is None:
                return None
            block = False
            if isinstance(item, Job):
                heapq.heappush(heap, (item.workload_class.rank, item.seq, item))
        while heap:
            _, _, job = heapq.heappop(heap)
            with self._lock:
                if job.state is not JobState.WAITING:
                    continue
                if not job.cancel_requested:
                    job.state = JobState.RUNNING
                    return job
                self._retire(job)
            job.deliver(job.final(FinishReason.CANCELLED))
        return None

    def _serve(self, job: Job) -> None:
        """Generate ``job``. A fault in its own sampling, detokenization or stop handling ends
        it with :class:`RequestFaultError`; a failed forward pass with
        :class:`EngineFaultError` (the model or device, not the request, is suspect)."""
        try:
            self._generate(job)
        except RequestFaultError as fault:
            self._finish(job, fault)
        except Exception as exc:
            log.exception(
                "engine_request_failed", model=self._lm.name, request_id=job.request.request_id
            )
            error = EngineFaultError(f"the engine step failed ({type(exc).__name__})")
            error.__cause__ = exc
            self._finish(job, error)
        finally:
            self._kv_used = 0

    def _generate(self, job: Job) -> None:
        """Prefill, then decode token by token, streaming stable text until a stop condition."""
        params = job.request.params
        model, device = self._lm.hf_model(), self._lm.device
        try:
            generator = make_generator(params, device)
            text = TextStream(self._lm, params, len(job.request.prompt_token_ids), self._eos_ids)
        except Exception as exc:
            raise self._request_fault(job, "setup", exc) from exc
        cache: Any = None
        with torch.inference_mode():
            input_ids = torch.tensor(
                [job.request.prompt_token_ids], dtype=torch.long, device=device
            )
            while True:
                if job.cancel_requested or self._stopping.is_set():
                    self._finish(job, job.final(FinishReason.CANCELLED))
                    return
                started = time.perf_counter()
                out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
                try:
                    token = sample(out.logits[0, -1].float(), params, generator)
                except Exception as exc:
                    raise self._request_fault(job, "sampling", exc) from exc
                if text.generated:
                    self._record_decode_step(time.perf_counter() - started)
                try:
                    delta = text.push(token)
                except Exception as exc:
                    raise self._request_fault(job, "decoding", exc) from exc
                job.generated = len(text.generated)
                self._kv_used = _cache_bytes(cache, self._kv_per_token)
                if delta.finish_reason is not None:
                    self._finish(job, delta)
                    return
                job.deliver(delta)
                input_ids = torch.tensor([[token]], dtype=torch.long, device=device)


def _cache_bytes(cache: Any, per_token: int) -> int:
    """Bytes held by the live KV cache tensors, or an estimate from its length."""
    total = 0
    for layer in getattr(cache, "layers", None) or ():
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    if total == 0 and cache is not None and hasattr(cache, "get_seq_length"):
        total = per_token * int(cache.get_seq_length())
    return total
