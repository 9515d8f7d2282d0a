"""The interface between an inference node's servicers and its generation engine.

Servicers tokenize, build an :class:`EngineRequest` and iterate the stream that
:meth:`Engine.submit` returns; how the engine schedules the model behind it (one request at a
time, continuous batching, ...) is its own business.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from inference_node.engine.step_model import StepCost
from inference_node.engine.step_times import StepSnapshot
from sluice.contract import WorkloadClass


class FinishReason(enum.Enum):
    """Why a request stopped producing tokens."""

    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` is greedy; otherwise tokens are sampled with temperature and nucleus
    (``top_p``) filtering from a generator seeded with ``seed`` (random when ``None``).
    Generation stops at EOS (unless ``ignore_eos``), after ``max_new_tokens``, or when the text
    contains one of ``stop`` (the stop string itself is never streamed). Submit refuses values
    that are not numerically safe (:func:`inference_node.engine.text.sampling_violations`):
    temperature 0 or in [0.01, 2], top_p a normal float in (0, 1], at most 8 stop strings of
    1 to 64 characters.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class EngineRequest:
    """One generation request: an already tokenized prompt and its sampling parameters.

    ``workload_class`` is a wire value of :class:`~sluice.contract.WorkloadClass` (a member or
    a plain int): 0, unspecified, is served as REALTIME; a value the contract does not define is
    refused at submit with ``ValueError``. Higher-priority classes are served first.

    ``adapter`` names a LoRA adapter of the engine's model as ``"<tenant>/<adapter_name>"``
    (:func:`inference_node.adapters.parse_reference`); empty for the base model. An engine
    that serves no adapters, or a malformed name, is refused at submit
    (:class:`InvalidRequestError`, field ``adapter``); an adapter that cannot be loaded ends
    the stream with an :class:`~inference_node.adapters.AdapterError` before any token.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    workload_class: int = WorkloadClass.REALTIME
    adapter: str = ""
    step_budget_s: float = 0.0
    """The longest decode step the request's inter-token target allows; 0: none
    (:mod:`sluice.itl`)."""
    time_left_s: float = 0.0
    """Seconds before its caller's deadline when it was submitted; 0: none
    (:mod:`inference_node.engine.promises`)."""
    first_token_budget_s: float = 0.0
    """Seconds its first token may take under its class's TTFT target; 0: none (read by the
    vLLM engine's ordering, :func:`inference_node.engine.vllm_mapping.placement`)."""


@dataclass(frozen=True)
class TokenDelta:
    """Output produced since the previous delta of the same request.

    ``token_ids`` are the newly generated ids (an EOS id included) and ``text`` the newly
    stable text, which may be empty while bytes of a character or a possible stop string are
    held back. Concatenating every ``text`` gives the final completion. The last delta has
    ``finish_reason`` set; counts are cumulative.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


def joined(deltas: Sequence[TokenDelta]) -> TokenDelta:
    """Consecutive deltas of one request as one (the last one's finish and counts)."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    return TokenDelta(
        "".join(d.text for d in deltas),
        tuple(i for d in deltas for i in d.token_ids),
        last.finish_reason,
        last.prompt_tokens,
        last.completion_tokens,
    )


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load.

    ``running`` and ``waiting`` count requests per workload class (every class present, zero
    when idle). ``kv_used_bytes`` is the size of the live KV cache, ``kv_budget_bytes`` what
    the engine may use for it.
    ``decode_tokens_per_s`` is a moving average of the decode rate while busy and
    ``queued_tokens`` an estimate of the tokens of work not yet done.
    ``adapter_bytes`` is the memory LoRA adapters take for this model (the loaded and loading
    adapters of its cache, plus the current batch's stacked copy), next to the KV cache;
    ``adapter_budget_bytes`` the cache's bound (0: no adapters served).
    """

    running: dict[WorkloadClass, int]
    waiting: dict[WorkloadClass, int]
    kv_used_bytes: int
    kv_budget_bytes: int
    decode_tokens_per_s: float
    queued_tokens: int
    adapter_bytes: int = 0
    adapter_budget_bytes: int = 0
    steps: StepSnapshot | None = None
    """The durations of its decode steps so far (None: the engine does not time them)."""
    step_cost: StepCost | None = None
    """What a step costs, fitted on its recent steps (None: not enough steps yet)."""
    pinned: int = 0
    """Lower-class sequences no class may preempt or pass, running or waiting
    (:mod:`~inference_node.engine.promises`)."""
    realtime_ahead_tokens: int | None = None
    """Prompt tokens a REALTIME prompt submitted now would wait for before its own prefill
    starts: the prefills under way that go on before it, then the waiting prompts it cannot
    pass (None: the engine does not tell)."""
    prefix_hit_ratio: float | None = None
    """The share of new prompts' tokens found in the engine's prefix cache lately, which it
    does not compute again (None: it has no prefix cache)."""


class DeltaStream(AsyncIterator[TokenDelta], abc.ABC):
    """The stream :meth:`Engine.submit` returns: an async iterator of deltas that can be closed.

    ``aclose`` (like dropping the stream or cancelling the task awaiting it) cancels the
    request if it is still in flight, so ``contextlib.aclosing`` works with it.
    """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop iterating and cancel the request if it has not finished."""


class InvalidRequestError(ValueError):
    """Raised by :meth:`Engine.submit` for a request that breaks a rule; ``violations`` name
    each offending field as ``(field, why)`` (fields as in ``GenerateRequest``)."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{field}: {why}" for field, why in self.violations))


class DuplicateRequestError(Exception):
    """Raised by :meth:`Engine.submit` when a live request already holds the request id."""


class RequestFaultError(Exception):
    """Raised from one request's stream when processing *its* tokens failed (sampling,
    detokenization, stop handling, setting it up): that request alone ends; the engine and
    every other request go on. ``stage`` says where: ``setup`` (its sampler and text
    stream), ``sampling`` (NaN or infinite logits or probabilities, ...) or ``decoding``
    (detokenization and stop strings)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class EngineFaultError(Exception):
    """Raised from the stream of every request of a batch when the shared step itself failed
    (the batched forward pass): a fault of the node, not of any one request."""


class EngineFullError(Exception):
    """Raised by :meth:`Engine.submit` when the waiting queue is at its bound."""


class RequestTooLargeError(Exception):
    """Raised by :meth:`Engine.submit` when a request can never fit the engine's memory budget."""


class EngineClosedError(Exception):
    """Raised by :meth:`Engine.submit` once the engine is draining or closed."""


class Engine(Protocol):
    """A generation engine that owns a model and streams tokens to asyncio callers."""

    @property
    def paces_prompts(self) -> bool:
        """True when it caps each step's lower-class prompt tokens to keep its decoding
        streams at their pace (published as ``ModelInfo.paces_prompts``)."""
        ...

    def submit(self, request: EngineRequest) -> DeltaStream:
        """Queue ``request`` and return its delta stream; call it on the event loop thread.

        Validation happens here: :class:`InvalidRequestError` (a ``ValueError``) for an
        invalid request (for example a prompt plus ``max_new_tokens`` longer than the context,
        or sampling parameters that are not numerically safe), :class:`DuplicateRequestError`
        when a live request has the same id, :class:`EngineFullError` when the waiting queue
        is full, :class:`EngineClosedError` after ``drain`` or ``close``.
        Deltas arrive as soon as each token is decoded; the last has ``finish_reason`` set.
        Closing the stream (``aclose``), dropping it, or cancelling the task awaiting it
        cancels the request and frees its slot at the engine's next step. An error inside the
        engine is raised from the stream's ``__anext__``: :class:`RequestFaultError` when
        only this request failed, :class:`EngineFaultError` when the shared step did.
        """
        ...

    def cancel(self, request_id: str) -> None:
        """Cancel a request; its stream ends with a ``CANCELLED`` delta. Unknown ids are ignored."""
        ...

    def stats(self) -> EngineStats:
        """Current load; safe to call from any thread."""
        ...

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - deadline is the contract
        """Stop accepting requests, wait up to ``timeout`` seconds for in-flight ones to
        finish, then cancel the rest."""
        ...

    def start(self) -> None:
        """Start serving on the engine's own thread."""
        ...

    def serve(self) -> None:
        """Serve on the calling thread (instead of ``start``) until ``close``."""
        ...

    def close(self) -> None:
        """Stop serving: cancel whatever is left, stop the engine thread and join it."""
        ...
