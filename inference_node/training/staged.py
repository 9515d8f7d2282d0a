"""One training micro-step (forward, loss, backward of one micro-batch) split into units the
engine thread can run one at a time, serving inference between any two of them.

The split is activation checkpointing by hand: the forward runs decoder layer by layer under
``no_grad``, keeping only each layer's input; the loss head then runs over chunks of the rows
that predict a learned token, each chunk forward and backward at once, giving the gradient of
the final hidden states; the backward then walks the layers in reverse, recomputing each one
with gradients on from its kept input and calling ``torch.autograd.backward(output,
grad_output)``, which accumulates the adapter's gradients of that layer and yields the
gradient of its input for the layer below.

So no unit is longer than one decoder layer's forward plus backward (or one loss chunk) of the
micro-batch, whatever the depth of the model: the yield bound is set by the micro-batch's
tokens, which the trainer chooses. The result is exactly :meth:`FrozenLlama.forward` then
``loss.backward()`` on the same batch: the same layer code, the same dropout seeds drawn from
the same generator in the same order, the same loss chunks summed in the same order (pinned by
tests to 1e-6).

Memory between units: one hidden state per layer (``[rows, tokens, hidden]`` each), the final
hidden state's gradient, and during a backward unit one layer's graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import partial

import torch
import torch.nn.functional as F

from inference_node.lora.train import IGNORE_INDEX, Batch, FrozenLlama
from inference_node.lora.weights import LoraAdapter

Clock = Callable[[], float]


class UnitKind(StrEnum):
    """What a unit computes; the gap policy predicts each kind's time separately."""

    FORWARD = "forward"
    """One decoder layer under ``no_grad`` (the first also embeds the tokens)."""
    LOSS = "loss"
    """Final norm, LM head and cross-entropy of one chunk of rows, forward and backward."""
    BACKWARD = "backward"
    """One decoder layer recomputed with gradients, then its backward."""
    OPTIMIZER = "optimizer"
    """Gradient clipping and the optimizer's update (run by the trainer, not here)."""


@dataclass(frozen=True)
class Unit:
    """One bounded piece of training work. Calling it runs it."""

    kind: UnitKind
    work: int
    """Its size in the unit of its kind's cost: tokens of the micro-batch (rows × padded
    length) for layer units, rows of the chunk for a loss unit, 1 for the optimizer."""
    run: Callable[[], None]

    def __call__(self) -> None:
        """Run the unit."""
        self.run()


@dataclass(frozen=True)
class UnitTiming:
    """How long one unit took, measured by the step's clock."""

    kind: UnitKind
    work: int
    seconds: float


def balanced_loss_rows(model: FrozenLlama, layer_tokens: int) -> int:
    """Rows per loss unit that cost at most about what a layer unit of ``layer_tokens`` tokens
    costs: a loss row multiplies by the LM head (``vocab × hidden``) forward and backward, a
    token of a backward layer unit by the layer's matrices forward (recompute) and backward;
    the loss's softmax over the vocabulary is counted as much again (measured on SmolLM2:
    without it a loss unit took 1.5 layer units). Never more than the training forward's own
    chunk (its memory bound)."""
    prefix = "model.layers.0."
    layer = sum(
        int(tensor.numel())
        for name, tensor in model.weights.items()
        if name.startswith(prefix) and tensor.dim() == 2
    )
    rows = layer_tokens * layer // (2 * int(model.lm_head.numel()))
    return max(1, min(model.loss_chunk_rows(), rows))


class StagedStep:
    """Forward, loss and backward of one micro-batch as a sequence of :class:`Unit`.

    Drive it with :meth:`run_next` until it returns ``True``, or call the units of
    :meth:`units` in order; :attr:`next_unit` shows the unit that runs next (for the gap
    policy's prediction) without running it. Gradients accumulate into the adapter's factors'
    ``.grad``, as ``loss.backward()`` would; :attr:`loss` is set once the loss units ran.

    ``generator`` draws the dropout seeds (as :meth:`FrozenLlama.forward` does), in the first
    unit, so building a step consumes nothing from it. ``loss_normalizer`` divides the summed
    loss instead of the batch's target-token count (gradient accumulation). ``loss_chunk_rows``
    is the rows per loss unit; ``None`` takes the training forward's chunk, which sums the loss
    in the same order (bit for bit the same result); :func:`balanced_loss_rows` makes loss
    units no longer than layer units (the same result within float32 rounding).
    """

    def __init__(
        self,
        model: FrozenLlama,
        adapter: LoraAdapter,
        batch: Batch,
        *,
        generator: torch.Generator | None = None,
        loss_normalizer: int | None = None,
        loss_chunk_rows: int | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        if adapter.num_layers != model.num_layers:
            raise ValueError(f"adapter has {adapter.num_layers} layers, model {model.num_layers}")
        if batch.labels.shape != batch.input_ids.shape:
            raise ValueError("labels and input_ids differ in shape")
        self.model, self.adapter, self.batch = model, adapter, batch
        self.generator = generator
        self._clock = clock
        self._on_gpu = batch.input_ids.device.type == "cuda"
        targets = batch.labels[:, 1:]
        self._picked = targets != IGNORE_INDEX
        self._targets = targets[self._picked]
        self.tokens = int(self._targets.numel())
        """Target tokens of the micro-batch."""
        self._normalizer = loss_normalizer if loss_normalizer is not None else max(self.tokens, 1)
        self._chunk = loss_chunk_rows or model.loss_chunk_rows()
        rows, length = batch.input_ids.shape
        self._layer_work = int(rows * length)
        self._seeds: list[int | None] = []
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._inputs: list[torch.Tensor | None] = []
        self._hidden: torch.Tensor | None = None
        self._grad: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None
        self._plan = self._build_plan()
        self._position = 0
        self.loss: torch.Tensor | None = None
        """The micro-batch's loss (detached float32 scalar), once the loss units ran."""
        self.timings: list[UnitTiming] = []
        """Every unit run so far, in order."""

    # -- driving ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether every unit has run."""
        return self._position >= len(self._plan)

    @property
    def next_unit(self) -> Unit | None:
        """The unit :meth:`run_next` runs next, ``None`` when done. Calling it runs it (once,
        and only while it is still the next one)."""
        if self.done:
            return None
        kind, work, _ = self._plan[self._position]
        return Unit(kind, work, partial(self._run_at, self._position))

    def run_next(self) -> bool:
        """Run the next unit (timed into :attr:`timings`); ``True`` once the step is done."""
        if self.done:
            return True
        kind, work, run = self._plan[self._position]
        started = self._clock()
        run()
        if self._on_gpu:  # a unit's time is its kernels' (the next decode step would wait)
            torch.cuda.current_stream(self.batch.input_ids.device).synchronize()
        self.timings.append(UnitTiming(kind, work, self._clock() - started))
        self._position += 1
        return self.done

    def units(self) -> Iterator[Unit]:
        """The remaining units in order; call each before asking for the next."""
        while (unit := self.next_unit) is not None:
            position = self._position
            yield unit
            if self._position == position:
                raise RuntimeError("a staged unit was skipped")

    def _run_at(self, position: int) -> None:
        if self._position != position:
            raise RuntimeError("staged units run once each, in order")
        self.run_next()

    def run_all(self) -> torch.Tensor:
        """Run every remaining unit back to back; returns :attr:`loss`."""
        while not self.run_next():
            pass
        assert self.loss is not None
        return self.loss

    # -- the units ----------------------------------------------------------------------------

    def _build_plan(self) -> list[tuple[UnitKind, int, Callable[[], None]]]:
        layers = range(self.model.num_layers)
        plan: list[tuple[UnitKind, int, Callable[[], None]]] = [
            (UnitKind.FORWARD, self._layer_work, partial(self._forward, i)) for i in layers
        ]
        for start in range(0, max(self.tokens, 1), self._chunk):
            rows = min(self._chunk, max(self.tokens - start, 1))
            plan.append((UnitKind.LOSS, rows, partial(self._loss, start)))
        plan += [
            (UnitKind.BACKWARD, self._layer_work, partial(self._backward, i))
            for i in reversed(layers)
        ]
        return plan

    def _forward(self, index: int) -> None:
        with torch.no_grad():
            if index == 0:
                self._seeds = self.model.dropout_seeds(self.adapter, self.generator)
                self._rotary = self.model.rotary(self.batch.input_ids.shape[1])
                self._hidden = F.embedding(self.batch.input_ids, self.model.embed)
            assert self._hidden is not None and self._rotary is not None
            self._inputs.append(self._hidden)
            cos, sin = self._rotary
            self._hidden = self.model.layer(
                self._hidden, index, cos, sin, self.adapter, self._seeds[index]
            )

    def _loss(self, start: int) -> None:
        """One chunk of the loss head; the first chunk gathers the rows that predict a target
        (as :meth:`FrozenLlama.forward` does) and the last scatters their gradient back."""
        assert self._hidden is not None
        if start == 0:
            self._hidden = self._hidden[:, :-1][self._picked]
            self._grad = torch.zeros_like(self._hidden)
            self._loss_sum = self._hidden.new_zeros((), dtype=torch.float32)
        assert self._grad is not None and self._loss_sum is not None
        rows = self._hidden[start : start + self._chunk].detach().requires_grad_(True)
        with torch.enable_grad():
            if rows.shape[0] == 0:
                chunk = rows.float().sum()  # no target at all: zero loss, zero gradients
            else:
                chunk = self.model.chunk_loss(rows, self._targets[start : start + self._chunk])
            # d(sum / n)/d(chunk) is 1/n, computed as autograd's division backward computes it.
            scale = torch.ones((), dtype=chunk.dtype, device=chunk.device) / self._normalizer
            torch.autograd.backward(chunk, scale)
        assert rows.grad is not None
        self._grad[start : start + self._chunk] = rows.grad
        self._loss_sum = self._loss_sum + chunk.detach()
        if start + self._chunk >= self.tokens:
            self.loss = self._loss_sum / self._normalizer
            last = self._inputs[-1]
            assert last is not None
            full = torch.zeros_like(last)
            full[:, :-1][self._picked] = self._grad
            self._grad, self._hidden = full, None

    def _backward(self, index: int) -> None:
        kept = self._inputs[index]
        assert kept is not None and self._grad is not None and self._rotary is not None
        cos, sin = self._rotary
        with torch.enable_grad():
            x = kept.detach().requires_grad_(index > 0)
            out = self.model.layer(x, index, cos, sin, self.adapter, self._seeds[index])
            torch.autograd.backward(out, self._grad)
        self._inputs[index] = None
        self._grad = x.grad if index > 0 else None
