"""What a fine-tune holds on a node's device, estimated before it starts, so the node can
count it in its memory budget next to the KV cache (and refuse a job that does not fit).

The parts: the adapter's factors (float32), their gradients (the same size), AdamW's two
moments (twice that, plus a step counter per factor), and the activations of one micro-batch
at the longest sequence the job allows. Activations follow :mod:`.staged`'s schedule: one kept
hidden state per decoder layer, the gradient flowing between layers, one layer's autograd graph
at a time (counted twice: the saved tensors plus their gradients at the peak of its backward)
and one chunk of the loss head's float32 logits (logits, log-softmax, their gradient). It is an
estimate from shapes, meant to err high; a test pins it above the bytes autograd actually saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference_node.lora.config import LoraConfig
from inference_node.lora.train import LOSS_CHUNK_BYTES
from inference_node.lora.weights import target_shapes
from inference_node.model_types import LanguageModel

FLOAT32 = 4


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes a fine-tune holds on the device, by part."""

    adapter_bytes: int
    """The factors ``A`` and ``B`` (float32)."""
    gradient_bytes: int
    """Their gradients."""
    optimizer_bytes: int
    """AdamW's moments and step counters."""
    checkpoint_bytes: int
    """The kept input of every decoder layer, for one micro-batch."""
    working_bytes: int
    """One layer's graph in backward, the gradient between layers and one loss chunk."""

    @property
    def activation_bytes(self) -> int:
        """Everything the micro-batch's computation holds."""
        return self.checkpoint_bytes + self.working_bytes

    @property
    def total_bytes(self) -> int:
        """All of it."""
        return (
            self.adapter_bytes + self.gradient_bytes + self.optimizer_bytes + self.activation_bytes
        )

    @classmethod
    def estimate(
        cls,
        lm: LanguageModel,
        lora: LoraConfig,
        *,
        micro_batch_size: int,
        max_seq_len: int,
        loss_chunk_rows: int | None = None,
    ) -> TrainingMemory:
        """The estimate for training ``lora`` on ``lm`` with micro-batches of
        ``micro_batch_size`` sequences of up to ``max_seq_len`` tokens."""
        shapes = target_shapes(lm, lora)
        factors = sum(lora.rank * (out + inp) for out, inp in shapes.values())
        adapter = factors * FLOAT32
        tokens = micro_batch_size * max_seq_len
        size = lm.dtype.itemsize
        hidden = int(lm.config["hidden_size"])
        layers = int(lm.config["num_hidden_layers"])
        vocab = lm.vocab_size
        chunk = loss_chunk_rows or max(1, LOSS_CHUNK_BYTES // (FLOAT32 * vocab))
        loss_rows = min(tokens, chunk)
        working = (
            2 * tokens * layer_graph_bytes_per_token(lm, lora)
            + 3 * tokens * hidden * size  # final hidden, its gradient, a layer input's gradient
            + loss_rows * (3 * vocab * FLOAT32 + 2 * hidden * FLOAT32)
        )
        return cls(
            adapter_bytes=adapter,
            gradient_bytes=adapter,
            optimizer_bytes=2 * adapter + len(shapes) * 2 * FLOAT32,
            checkpoint_bytes=layers * tokens * hidden * size,
            working_bytes=working,
        )


def layer_graph_bytes_per_token(lm: LanguageModel, lora: LoraConfig) -> int:
    """Bytes per token autograd keeps for one decoder layer with ``lora``: the base layer's
    saved activations (in the model's dtype, RMSNorm's float32 copies) and, per adapted
    module, its float32 input (three copies with dropout: input, mask, masked) and the rank."""
    config = lm.config
    size = lm.dtype.itemsize
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    q_dim = heads * head_dim
    kv_dim = int(config.get("num_key_value_heads") or heads) * head_dim
    intermediate = int(config["intermediate_size"])
    base = size * (5 * hidden + 5 * q_dim + 3 * kv_dim + 4 * intermediate) + 2 * hidden * FLOAT32
    inputs = {
        module: hidden for module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    } | {"o_proj": q_dim, "down_proj": intermediate}
    copies = 3 if lora.dropout > 0 else 1
    adapted = sum(FLOAT32 * (copies * inputs[module] + lora.rank) for module in lora.target_modules)
    return base + adapted
