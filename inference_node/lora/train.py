"""A differentiable Llama-family forward for LoRA training, in plain torch.

:class:`FrozenLlama` runs the node's own base weights (``LanguageModel.weights``, shared, never
copied or given gradients) with a :class:`LoraAdapter` on its target modules, and returns the
causal-LM loss over completion tokens. Autograd tracks only the adapter: the base weights do
not require gradients, so backward computes gradients for ``A`` and ``B`` and for the
activations between them, never for a base matrix.

It computes what transformers' Llama/Qwen2 forward with peft's LoRA layers computes (pinned
by tests against ``peft``): RMSNorm in float32, rotary tables from the model's ``inv_freq``
(so its ``rope_theta``), grouped-query attention, q/k/v/o biases when the checkpoint has them,
a tied or separate LM head, ``delta = scaling * B(A(dropout(x)))`` in float32 added to each
targeted projection.

Memory: attention is the fused causal kernel (no ``T × T`` scores held for the batch); the
loss gathers only the positions that predict a completion token and runs the LM head over
them in chunks that are recomputed in backward, so ``[batch, tokens, vocab]`` logits are never
held. ``checkpoint=True`` also recomputes each decoder layer in backward, keeping one hidden
state per layer instead of all its activations.

Batches are right-padded (:func:`make_batch`): with causal attention a padding token comes
after every real token of its row, so no attention mask is needed, and its label is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as recompute

from inference_node.lora.weights import LoraAdapter
from inference_node.model_types import LanguageModel
from inference_node.native import llama_unsupported_reason

IGNORE_INDEX = -100
"""Label of a position that does not count in the loss (prompt and padding), as in PyTorch's
``cross_entropy`` and transformers."""
LOSS_CHUNK_BYTES = 64 * 1024**2
"""Float32 logits computed at once by the loss; the rows per chunk follow from the vocabulary."""


@dataclass(frozen=True)
class Example:
    """One training sequence: the loss is taken on ``completion`` only."""

    prompt: Sequence[int]
    completion: Sequence[int]


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids and labels ``[rows, tokens]``; labels are the ids themselves on
    completion tokens and :data:`IGNORE_INDEX` elsewhere (transformers' convention: the model
    shifts them, position ``t`` predicts ``labels[t + 1]``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def target_tokens(self) -> int:
        """Tokens the loss is taken on: every completion token (not one at position 0)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def make_batch(
    examples: Sequence[Example], *, pad_id: int, device: torch.device | str = "cpu"
) -> Batch:
    """The right-padded batch of ``examples``, prompt and padding masked out of the labels."""
    if not examples:
        raise ValueError("a batch needs at least one example")
    length = max(len(e.prompt) + len(e.completion) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        tokens = [*example.prompt, *example.completion]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        start = len(example.prompt)
        labels[row, start : len(tokens)] = ids[row, start : len(tokens)]
    return Batch(input_ids=ids.to(device), labels=labels.to(device))


@dataclass(frozen=True)
class TrainOutput:
    """The result of one training forward."""

    loss: torch.Tensor
    """Scalar float32 with a graph to the adapter: the summed cross-entropy of the target
    tokens divided by ``loss_normalizer`` (by default their count, i.e. the mean; 0 when
    there are none)."""
    tokens: int
    """Target tokens in the batch."""
    logits: torch.Tensor | None
    """``[rows, tokens, vocab]`` float32, detached; only when asked for."""


class FrozenLlama:
    """A Llama-family model's frozen weights, read from a :class:`LanguageModel`, and the
    training forward over them. Holds references to ``lm.weights``, no copies."""

    def __init__(self, lm: LanguageModel) -> None:
        reason = llama_unsupported_reason(lm.config)
        if reason is None and lm.inv_freq is None:
            reason = "no rotary frequencies"
        if reason is not None or lm.inv_freq is None:
            raise ValueError(f"{lm.name} cannot be trained with LoRA here: {reason}")
        config = lm.config
        self.weights = lm.weights
        self.device, self.dtype = lm.device, lm.dtype
        self.num_layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // self.heads)
        self.eps = float(config["rms_norm_eps"])
        self.inv_freq = lm.inv_freq.to(self.device, torch.float32)
        self.attention_scaling = lm.attention_scaling
        self.embed = lm.weights["model.embed_tokens.weight"]
        self.norm = lm.weights["model.norm.weight"]
        tied = bool(config.get("tie_word_embeddings", False))
        self.lm_head = self.embed if tied else lm.weights.get("lm_head.weight", self.embed)

    def forward(
        self,
        adapter: LoraAdapter,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        checkpoint: bool = False,
        return_logits: bool = False,
        loss_normalizer: int | None = None,
    ) -> TrainOutput:
        """Loss of ``labels`` (same shape as ``input_ids``, :data:`IGNORE_INDEX` where ignored)
        under the base model with ``adapter``.

        Rows must be right-padded (:func:`make_batch`). ``generator`` (on the model's device)
        draws the LoRA dropout masks; without one no dropout is applied (evaluation), as in an
        ``eval()`` peft model. ``checkpoint`` recomputes each layer in backward; the result is
        the same either way, dropout masks included. ``loss_normalizer`` replaces the
        number of target tokens as the divisor, for gradient accumulation over micro-batches
        that divides by the whole step's token count (transformers' ``num_items_in_batch``).
        """
        if adapter.num_layers != self.num_layers:
            raise ValueError(f"adapter has {adapter.num_layers} layers, model {self.num_layers}")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} ≠ input_ids {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(length)
        seeds = self.dropout_seeds(adapter, generator)
        for index in range(self.num_layers):
            if checkpoint and torch.is_grad_enabled():
                x = recompute(
                    self.layer, x, index, cos, sin, adapter, seeds[index], use_reentrant=False
                )
            else:
                x = self.layer(x, index, cos, sin, adapter, seeds[index])
        targets = labels[:, 1:]
        picked = targets != IGNORE_INDEX
        tokens = int(picked.sum())
        loss_sum = self._loss_sum(x[:, :-1][picked], targets[picked])
        loss = loss_sum / (loss_normalizer if loss_normalizer is not None else max(tokens, 1))
        logits = None
        if return_logits:
            with torch.no_grad():
                logits = F.linear(self._rms(x, self.norm), self.lm_head).float()
        return TrainOutput(loss=loss, tokens=tokens, logits=logits)

    def dropout_seeds(
        self, adapter: LoraAdapter, generator: torch.Generator | None
    ) -> list[int | None]:
        """One dropout seed per decoder layer, drawn from ``generator`` in one call (``None``
        each when there is no generator or the adapter has no dropout). :meth:`forward` draws
        them first, so a caller running the layers itself consumes the generator identically."""
        if generator is None or adapter.config.dropout <= 0:
            return [None] * self.num_layers
        drawn = torch.randint(
            2**62, (self.num_layers,), generator=generator, device=generator.device
        )
        return [int(s) for s in drawn.tolist()]

    def loss_chunk_rows(self) -> int:
        """Rows of final hidden states whose logits the loss computes at once
        (:data:`LOSS_CHUNK_BYTES` of float32 logits)."""
        return max(1, LOSS_CHUNK_BYTES // (4 * int(self.lm_head.shape[0])))

    def rotary(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[length, head_dim]`` as transformers computes them (float32 angles)."""
        positions = torch.arange(length, device=self.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos = (angles.cos() * self.attention_scaling).to(self.dtype)
        sin = (angles.sin() * self.attention_scaling).to(self.dtype)
        return cos, sin

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in float32, as transformers' ``LlamaRMSNorm``."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * normed.to(x.dtype)

    def _linear(
        self,
        x: torch.Tensor,
        path: str,
        adapter: LoraAdapter,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Base projection ``path`` of ``x``, plus the adapter's delta where it has one."""
        out = F.linear(x, self.weights[f"{path}.weight"], self.weights.get(f"{path}.bias"))
        pair = adapter.pair(path)
        if pair is None:
            return out
        lora_in = x.to(pair.a.dtype)
        p = adapter.config.dropout
        if generator is not None and p > 0:
            keep = torch.empty_like(lora_in).bernoulli_(1.0 - p, generator=generator)
            lora_in = lora_in * keep / (1.0 - p)
        delta = F.linear(F.linear(lora_in, pair.a), pair.b) * adapter.config.scaling
        return (out + delta).to(out.dtype)

    def layer(
        self,
        x: torch.Tensor,
        index: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        adapter: LoraAdapter,
        seed: int | None,
    ) -> torch.Tensor:
        """One decoder layer. Dropout masks come from a generator seeded with ``seed`` here,
        so recomputing the layer in backward draws the same masks."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        prefix = f"model.layers.{index}."
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        rows, length, _ = x.shape
        h = self._rms(x, self.weights[prefix + "input_layernorm.weight"])
        q = self._linear(h, attn + "q_proj", adapter, generator)
        k = self._linear(h, attn + "k_proj", adapter, generator)
        v = self._linear(h, attn + "v_proj", adapter, generator)
        q = _rope(q.view(rows, length, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = _rope(k.view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads
        )
        attended = attended.transpose(1, 2).reshape(rows, length, self.heads * self.head_dim)
        x = x + self._linear(attended, attn + "o_proj", adapter, generator)
        h = self._rms(x, self.weights[prefix + "post_attention_layernorm.weight"])
        gate = self._linear(h, mlp + "gate_proj", adapter, generator)
        up = self._linear(h, mlp + "up_proj", adapter, generator)
        return x + self._linear(F.silu(gate) * up, mlp + "down_proj", adapter, generator)

    def _loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of ``targets`` ``[n]`` from final hidden states ``[n, hidden]``,
        the LM head run over chunks of rows that backward recomputes instead of keeping."""
        if hidden.shape[0] == 0:
            return hidden.float().sum()  # zero, with a graph: backward still runs
        total = hidden.new_zeros((), dtype=torch.float32)
        step = self.loss_chunk_rows()
        keep_graph = torch.is_grad_enabled() and hidden.requires_grad
        for start in range(0, hidden.shape[0], step):
            rows, wanted = hidden[start : start + step], targets[start : start + step]
            if keep_graph:
                total = total + recompute(self.chunk_loss, rows, wanted, use_reentrant=False)
            else:
                total = total + self.chunk_loss(rows, wanted)
        return total

    def chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of ``targets`` ``[n]`` from final hidden states ``[n, hidden]``
        (final norm and LM head included), all at once."""
        logits = F.linear(self._rms(hidden, self.norm), self.lm_head).float()
        return F.cross_entropy(logits, targets, reduction="sum")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[rows, heads, tokens, head_dim]`` (``rotate_half``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
