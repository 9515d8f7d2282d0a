"""LoRA adapters for the node's Llama-family models: settings (:mod:`.config`), weights in
peft's on-disk format (:mod:`.weights`), a differentiable training forward over the node's
frozen base weights (:mod:`.train`) and multi-adapter deltas for serving mixed batches
(:mod:`.batched`). The batching engine serves adapters (:mod:`inference_node.engine.lora_rows`)
and trains them (:mod:`inference_node.training`)."""

from inference_node.lora.batched import StackedLora, lora_delta
from inference_node.lora.config import (
    DEFAULT_TARGET_MODULES,
    TARGET_MODULES,
    AdapterConfigError,
    LoraConfig,
    module_path,
)
from inference_node.lora.train import (
    IGNORE_INDEX,
    Batch,
    Example,
    FrozenLlama,
    TrainOutput,
    make_batch,
)
from inference_node.lora.weights import (
    AdapterFormatError,
    LoraAdapter,
    LoraPair,
    target_shapes,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "IGNORE_INDEX",
    "TARGET_MODULES",
    "AdapterConfigError",
    "AdapterFormatError",
    "Batch",
    "Example",
    "FrozenLlama",
    "LoraAdapter",
    "LoraConfig",
    "LoraPair",
    "StackedLora",
    "TrainOutput",
    "lora_delta",
    "make_batch",
    "module_path",
    "target_shapes",
]
