"""Generation engines: the :class:`Engine` interface and its implementations."""

from inference_node.engine.serial import SerialEngine
from inference_node.engine.types import (
    WORKLOAD_BATCH,
    WORKLOAD_CLASSES,
    WORKLOAD_FINETUNE,
    WORKLOAD_REALTIME,
    DeltaStream,
    Engine,
    EngineClosedError,
    EngineFullError,
    EngineRequest,
    EngineStats,
    FinishReason,
    SamplingParams,
    TokenDelta,
)

__all__ = [
    "WORKLOAD_BATCH",
    "WORKLOAD_CLASSES",
    "WORKLOAD_FINETUNE",
    "WORKLOAD_REALTIME",
    "DeltaStream",
    "Engine",
    "EngineClosedError",
    "EngineFullError",
    "EngineRequest",
    "EngineStats",
    "FinishReason",
    "SamplingParams",
    "SerialEngine",
    "TokenDelta",
]
