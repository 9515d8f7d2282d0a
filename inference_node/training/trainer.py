"""One LoRA fine-tune on a node: its examples, their order, micro-batches, gradient
accumulation and AdamW, driven one bounded unit at a time.

A :class:`Trainer` is a state machine the engine thread steps with :meth:`Trainer.run_next`
(one :class:`~inference_node.training.staged.Unit` per call, each a decoder layer's forward or
backward of a micro-batch, a loss chunk, or the optimizer update), asking the gap policy
before each one with :attr:`Trainer.next_unit`'s kind and work. An optimizer step is
``accumulation_steps`` micro-batches of ``micro_batch_size`` examples, the loss divided by the
step's target tokens (so accumulation equals one big batch), then clipping and AdamW at the
scheduled rate.

Everything random comes from the job's seed: the adapter's initialisation, each epoch's
shuffle (:class:`~inference_node.training.data.DataOrder`) and the dropout generator.
:meth:`Trainer.state` between optimizer steps captures the adapter, AdamW's state, the data
cursor, the dropout generator's state and the step; a fresh trainer that
:meth:`Trainer.restore`\\ s it continues with the same loss at every later step as a run that
never stopped (bit for bit on one machine).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inference_node.lora.config import LoraConfig
from inference_node.lora.train import Batch, FrozenLlama
from inference_node.lora.weights import LoraAdapter
from inference_node.model_types import LanguageModel
from inference_node.training.checkpoint import CheckpointError, TrainerState
from inference_node.training.data import (
    Cursor,
    DataOrder,
    ExampleError,
    TrainExample,
    make_train_batch,
    stream_seed,
)
from inference_node.training.optim import (
    OptimizerConfig,
    clip_and_step,
    join_state,
    learning_rate,
    make_optimizer,
    split_state,
)
from inference_node.training.staged import (
    Clock,
    StagedStep,
    Unit,
    UnitKind,
    UnitTiming,
    balanced_loss_rows,
)

ADAPTER_PREFIX = "adapter."
DROPOUT_RNG = "rng.dropout"


@dataclass(frozen=True)
class TrainingConfig:
    """What a fine-tune trains and how. Validated on construction."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter's rank, alpha, dropout and target modules."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW, the learning-rate schedule and clipping."""
    micro_batch_size: int = 4
    """Examples per micro-batch: the tokens of one unit of work (and so the yield bound)."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    epochs: int = 1
    """Passes over the examples, unless ``max_steps`` is set."""
    max_steps: int | None = None
    """Optimizer steps to run, reading as many epochs as that takes; overrides ``epochs``."""
    max_seq_len: int = 1024
    """Longest example accepted, in tokens (prompt and completion)."""
    seed: int = 0
    """Seeds the adapter's initialisation, the shuffles and the dropout masks."""
    loss_chunk_rows: int | None = None
    """Target rows per loss unit; ``None``: as many as cost about one layer unit
    (:func:`~inference_node.training.staged.balanced_loss_rows`)."""

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("micro_batch_size", "accumulation_steps", "epochs", "max_seq_len")
            if getattr(self, name) < 1
        ]
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.loss_chunk_rows is not None and self.loss_chunk_rows < 1:
            problems.append(f"loss_chunk_rows must be >= 1, got {self.loss_chunk_rows}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class StepReport:
    """One finished optimizer step."""

    step: int
    """Optimizer steps done, this one included (1 for the first)."""
    loss: float
    """Mean cross-entropy per target token over the step's micro-batches."""
    learning_rate: float
    """The rate the update used."""
    grad_norm: float
    """Total L2 norm of the gradients before clipping."""
    tokens: int
    """Target tokens the step learned from."""
    sequence_tokens: int
    """Tokens of its examples, prompts included (what training tokens per second counts)."""
    epoch: int
    """The epoch the next example comes from."""


@dataclass
class _StepInProgress:
    batches: list[Batch]
    normalizer: int
    sequence_tokens: int
    after: Cursor
    micro: int = 0
    loss: float = 0.0
    staged: StagedStep | None = None


class Trainer:
    """A fine-tune of ``lm`` with ``config`` on ``examples``, one unit at a time."""

    def __init__(
        self,
        lm: LanguageModel,
        examples: Sequence[TrainExample],
        config: TrainingConfig,
        *,
        clock: Clock = time.perf_counter,
    ) -> None:
        _validate(examples, min(config.max_seq_len, lm.max_context_tokens))
        self.config = config
        self.model = FrozenLlama(lm)
        self.examples = list(examples)
        self.adapter = LoraAdapter.for_model(lm, config.lora, seed=config.seed).requires_grad_()
        self._params = list(self.adapter.parameters())
        self.optimizer = make_optimizer(self._params, config.optimizer)
        self.order = DataOrder(len(self.examples), config.micro_batch_size, config.seed)
        self.generator = torch.Generator(device=lm.device)
        self.generator.manual_seed(stream_seed(config.seed, "dropout"))
        self._clock = clock
        self._device = lm.device
        self._fingerprint = _fingerprint(lm, config, self.examples)
        per_epoch = self.order.micro_batches_per_epoch
        self._micro_limit = None if config.max_steps else config.epochs * per_epoch
        self.total_steps = config.max_steps or -(
            -config.epochs * per_epoch // config.accumulation_steps
        )
        """Optimizer steps the fine-tune runs."""
        self.step = 0
        """Optimizer steps done."""
        self.cursor = Cursor()
        """The data order's position at the start of the next optimizer step."""
        self.last_timing: UnitTiming | None = None
        """The unit :meth:`run_next` ran last, and how long it took."""
        self._current: _StepInProgress | None = None

    @property
    def device(self) -> torch.device:
        """Where the model and the adapter being trained are."""
        return self._device

    @property
    def done(self) -> bool:
        """Whether every optimizer step has run."""
        return self.step >= self.total_steps

    @property
    def next_unit(self) -> Unit | None:
        """The unit :meth:`run_next` runs next (its kind and work, for a time prediction),
        ``None`` when done; calling it is :meth:`run_next`. Looking draws nothing random."""
        if self.done:
            return None
        current = self._current or self._begin_step()
        staged = current.staged.next_unit if current.staged is not None else None
        if staged is None:
            return Unit(UnitKind.OPTIMIZER, 1, self._run_unit)
        return Unit(staged.kind, staged.work, self._run_unit)

    def run_next(self) -> StepReport | None:
        """Run one unit; the optimizer step's report when this unit finished one."""
        unit = self.next_unit
        if unit is None:
            return None
        current = self._current
        assert current is not None
        started = self._clock()
        report = None
        if unit.kind is UnitKind.OPTIMIZER:
            report = self._optimize()
        else:
            assert current.staged is not None
            if current.staged.run_next():
                self._finish_micro_batch(current)
        self.last_timing = UnitTiming(unit.kind, unit.work, self._clock() - started)
        return report

    def _run_unit(self) -> None:
        self.run_next()

    def train_step(self) -> StepReport:
        """Run units until the next optimizer step is done; ``RuntimeError`` when done."""
        while True:
            if self.done:
                raise RuntimeError("the fine-tune has run all its steps")
            report = self.run_next()
            if report is not None:
                return report

    # -- checkpoints --------------------------------------------------------------------------

    @property
    def between_steps(self) -> bool:
        """Whether no unit of the next optimizer step has run (when :meth:`state` works)."""
        current = self._current
        return current is None or (
            current.micro == 0 and (current.staged is None or not current.staged.timings)
        )

    def state(self, *, copy: bool = True) -> TrainerState:
        """The state to resume from; only between optimizer steps (``RuntimeError`` else).
        Its tensors are CPU copies; with ``copy=False`` the adapter's and AdamW's live tensors
        (the next unit changes them), for a caller that copies them itself (a checkpoint
        taken in bounded units, :mod:`inference_node.engine.gap_training`)."""
        if not self.between_steps:
            raise RuntimeError("a trainer's state is taken between optimizer steps")
        tensors = {
            ADAPTER_PREFIX + k: v.detach().to("cpu", copy=True) if copy else v.detach()
            for k, v in self.adapter.state_dict().items()
        }
        optimizer_tensors, optimizer_scalars = split_state(self.optimizer, copy=copy)
        tensors |= optimizer_tensors
        tensors[DROPOUT_RNG] = self.generator.get_state()
        scalars = {
            "step": self.step,
            "cursor": {"epoch": self.cursor.epoch, "position": self.cursor.position},
            "optimizer": optimizer_scalars,
            "fingerprint": self._fingerprint,
        }
        return TrainerState(tensors=tensors, scalars=scalars)

    def restore(self, state: TrainerState) -> None:
        """Continue from ``state`` (:meth:`state` of a trainer of the same job: same model,
        examples and configuration, else :class:`CheckpointError`)."""
        scalars = state.scalars
        if scalars.get("fingerprint") != self._fingerprint:
            raise CheckpointError("the checkpoint belongs to another model, dataset or config")
        saved = {
            k[len(ADAPTER_PREFIX) :]: v
            for k, v in state.tensors.items()
            if k.startswith(ADAPTER_PREFIX)
        }
        ours = self.adapter.state_dict()
        if saved.keys() != ours.keys() or DROPOUT_RNG not in state.tensors:
            raise CheckpointError("the checkpoint's tensors do not match this adapter")
        with torch.no_grad():
            # state_dict and parameters() share one order: per module, A then B.
            for key, tensor in zip(ours, self._params, strict=True):
                tensor.copy_(saved[key])
        join_state(self.optimizer, state.tensors, scalars["optimizer"])
        self.generator.set_state(state.tensors[DROPOUT_RNG])
        self.step = int(scalars["step"])
        self.cursor = Cursor(int(scalars["cursor"]["epoch"]), int(scalars["cursor"]["position"]))
        self.optimizer.zero_grad(set_to_none=True)
        self._current = None

    # -- internals ----------------------------------------------------------------------------

    def _begin_step(self) -> _StepInProgress:
        cursor, batches, sequence_tokens = self.cursor, [], 0
        for _ in range(self.config.accumulation_steps):
            if self._micro_limit is not None and self._consumed(cursor) >= self._micro_limit:
                break
            indices, cursor = self.order.micro_batch(cursor)
            chosen = [self.examples[i] for i in indices]
            batches.append(make_train_batch(chosen, device=self._device))
            sequence_tokens += sum(len(e.tokens) for e in chosen)
        current = _StepInProgress(
            batches=batches,
            normalizer=sum(b.target_tokens for b in batches),
            sequence_tokens=sequence_tokens,
            after=cursor,
        )
        current.staged = self._staged(current)
        self._current = current
        return current

    def _staged(self, current: _StepInProgress) -> StagedStep:
        batch = current.batches[current.micro]
        return StagedStep(
            self.model,
            self.adapter,
            batch,
            generator=self.generator,
            loss_normalizer=current.normalizer,
            loss_chunk_rows=self.config.loss_chunk_rows
            or balanced_loss_rows(self.model, batch.input_ids.numel()),
            clock=self._clock,
        )

    def _finish_micro_batch(self, current: _StepInProgress) -> None:
        assert current.staged is not None and current.staged.loss is not None
        current.loss += float(current.staged.loss)
        current.micro += 1
        current.staged = self._staged(current) if current.micro < len(current.batches) else None

    def _optimize(self) -> StepReport:
        current = self._current
        assert current is not None and current.staged is None
        rate = learning_rate(self.config.optimizer, self.step, self.total_steps)
        norm = clip_and_step(self.optimizer, self._params, self.config.optimizer, rate)
        self.step += 1
        self.cursor = current.after
        self._current = None
        return StepReport(
            step=self.step,
            loss=current.loss,
            learning_rate=rate,
            grad_norm=norm,
            tokens=current.normalizer,
            sequence_tokens=current.sequence_tokens,
            epoch=self.cursor.epoch,
        )

    def _consumed(self, cursor: Cursor) -> int:
        """Micro-batches read before ``cursor``."""
        per_epoch = self.order.micro_batches_per_epoch
        return cursor.epoch * per_epoch + -(-cursor.position // self.config.micro_batch_size)


def _validate(examples: Sequence[TrainExample], max_tokens: int) -> None:
    if not examples:
        raise ExampleError("a fine-tune needs at least one example")
    for index, example in enumerate(examples):
        if len(example.tokens) > max_tokens:
            raise ExampleError(
                f"example {index} has {len(example.tokens)} tokens, over {max_tokens}"
            )
        if example.target_tokens < 1:
            raise ExampleError(f"example {index} has no token to learn")


def _fingerprint(lm: LanguageModel, config: TrainingConfig, examples: list[TrainExample]) -> str:
    """What a checkpoint must share with the trainer restoring it: model, data and config."""
    data = hashlib.sha256()
    for example in examples:
        data.update(json.dumps([example.tokens, example.learned]).encode())
    described: dict[str, Any] = {
        "model": lm.name,
        "layers": int(lm.config["num_hidden_layers"]),
        "config": dataclasses.asdict(config),
        "data": data.hexdigest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
