"""LoRA fine-tuning on an inference node, in the gaps inference leaves.

:mod:`.staged` splits a micro-step into units of one decoder layer (or one loss chunk) each, so
the engine thread can serve inference between any two; :mod:`.trainer` runs a whole fine-tune
(data order, accumulation, AdamW and its schedule) unit by unit and checkpoints it
(:mod:`.checkpoint`, safetensors and JSON, never pickle); :mod:`.gaps` decides when a unit may
run; :mod:`.memory` estimates what training holds on the device. The batching engine runs a
fine-tune's units on its thread (:mod:`inference_node.engine.gap_training`), ``Node.Train``
drives it (:mod:`inference_node.train_service`); see ``docs/decisions/node-training-units.md``.
"""

from inference_node.training.checkpoint import (
    CheckpointError,
    CheckpointStore,
    DirectoryCheckpointStore,
    TrainerState,
)
from inference_node.training.data import (
    ChatEncoder,
    Cursor,
    DataOrder,
    ExampleError,
    TrainExample,
    encode_prompt_completion,
    make_train_batch,
)
from inference_node.training.gaps import GapConfig, GapDecision, GapPolicy, GapReason
from inference_node.training.memory import TrainingMemory, layer_graph_bytes_per_token
from inference_node.training.optim import OptimizerConfig, Schedule, learning_rate, lr_multiplier
from inference_node.training.staged import (
    StagedStep,
    Unit,
    UnitKind,
    UnitTiming,
    balanced_loss_rows,
)
from inference_node.training.trainer import StepReport, Trainer, TrainingConfig

__all__ = [
    "ChatEncoder",
    "CheckpointError",
    "CheckpointStore",
    "Cursor",
    "DataOrder",
    "DirectoryCheckpointStore",
    "ExampleError",
    "GapConfig",
    "GapDecision",
    "GapPolicy",
    "GapReason",
    "OptimizerConfig",
    "Schedule",
    "StagedStep",
    "StepReport",
    "TrainExample",
    "Trainer",
    "TrainerState",
    "TrainingConfig",
    "TrainingMemory",
    "Unit",
    "UnitKind",
    "UnitTiming",
    "balanced_loss_rows",
    "encode_prompt_completion",
    "layer_graph_bytes_per_token",
    "learning_rate",
    "lr_multiplier",
    "make_train_batch",
]
