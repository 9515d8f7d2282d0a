"""What a batching engine is configured with, and its engine-thread state of one request."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inference_node.adapters import AdapterRef
from inference_node.engine.base import Job
from inference_node.engine.text import TextStream
from inference_node.lora import LoraAdapter


@dataclass(frozen=True)
class BatchingConfig:
    """Limits of a batching engine."""

    max_sequences: int = 32
    """Most sequences decoding at once (KV slots)."""
    max_batched_tokens: int = 512
    """Most tokens one step processes (decode tokens plus prefill chunks): bounds the time a
    running stream waits while newcomers are prefilled."""
    kv_budget_bytes: int = 2 * 1024**3
    """Bytes of KV cache; with ``max_sequences`` it sets the longest sequence a slot holds."""
    max_waiting: int = 256
    """Requests waiting beyond which ``submit`` raises ``EngineFullError``."""


class BatchSequence:
    """Engine-thread state of one admitted (or preempted) request."""

    def __init__(self, job: Job, text: TextStream, generator: torch.Generator | None) -> None:
        self.job = job
        self.text = text
        self.generator = generator
        self.tokens: list[int] = list(job.request.prompt_token_ids)
        """Prompt plus generated tokens; the cache holds the first ``computed`` of them."""
        self.computed = 0
        self.slot = -1
        self.adapter_ref: AdapterRef | None = None
        self.adapter: LoraAdapter | None = None

    @property
    def pinned(self) -> bool:
        """Its deadline nears: it waits before every other request and is never preempted
        (:mod:`inference_node.engine.promises`)."""
        return self.job.pinned

    @pinned.setter
    def pinned(self, value: bool) -> None:
        self.job.pinned = value

    @property
    def deadline(self) -> float:
        """Its caller's deadline (``time.monotonic``; infinite: none)."""
        return self.job.deadline

    @property
    def key(self) -> tuple[int, int]:
        """Waiting order: pinned first, then class rank, then arrival."""
        return (-1 if self.pinned else self.job.workload_class.rank, self.job.seq)
