"""Generation engines: the :class:`Engine` interface and its implementations."""

from inference_node.adapters import AdapterCache
from inference_node.engine.batching import BatchingEngine
from inference_node.engine.hosting import run_with_engine
from inference_node.engine.llama import supports
from inference_node.engine.sequences import BatchingConfig
from inference_node.engine.serial import SerialEngine
from inference_node.engine.types import (
    DeltaStream,
    DuplicateRequestError,
    Engine,
    EngineClosedError,
    EngineFaultError,
    EngineFullError,
    EngineRequest,
    EngineStats,
    FinishReason,
    InvalidRequestError,
    RequestFaultError,
    RequestTooLargeError,
    SamplingParams,
    TokenDelta,
)
from inference_node.model_types import LanguageModel

__all__ = [
    "BatchingConfig",
    "BatchingEngine",
    "DeltaStream",
    "DuplicateRequestError",
    "Engine",
    "EngineClosedError",
    "EngineFaultError",
    "EngineFullError",
    "EngineRequest",
    "EngineStats",
    "FinishReason",
    "InvalidRequestError",
    "RequestFaultError",
    "RequestTooLargeError",
    "SamplingParams",
    "SerialEngine",
    "TokenDelta",
    "build_engine",
    "run_with_engine",
]


def build_engine(
    lm: LanguageModel,
    *,
    max_sequences: int = 32,
    max_batched_tokens: int = 512,
    kv_budget_bytes: int = 2 * 1024**3,
    max_waiting: int = 256,
    adapters: AdapterCache | None = None,
) -> Engine:
    """The best engine for ``lm``: continuous batching for Llama-family models, else serial.
    ``adapters`` (the cache of ``lm``'s LoRA adapters) goes to the batching engine, which
    closes it; the serial engine serves no adapters and closes it at once."""
    if supports(lm):
        return BatchingEngine(
            lm,
            BatchingConfig(
                max_sequences=max_sequences,
                max_batched_tokens=max_batched_tokens,
                kv_budget_bytes=kv_budget_bytes,
                max_waiting=max_waiting,
            ),
            adapters,
        )
    if adapters is not None:
        adapters.close()
    return SerialEngine(lm, max_waiting=max_waiting, kv_budget_bytes=kv_budget_bytes)
