"""What a loaded model is: a :class:`LanguageModel` for generation, an :class:`Embedder` for
embeddings. Both hold weights already on their device with gradients off; neither loads
anything (:mod:`inference_node.models` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inference_node import row_buckets
from inference_node.native import BertEncoder
from inference_node.tokenizer import Tokenizer

EMBED_BATCH = 32


def prepare_for_inference(model: Any) -> Any:
    """``model`` in eval mode with gradients off; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass(kw_only=True)
class LanguageModel:
    """A causal LM ready for inference: weights on ``device`` in ``dtype``, gradients off.

    ``weights`` is the checkpoint's state dict under transformers' parameter names (a tied LM
    head appears once, as the input embedding). ``inv_freq``/``attention_scaling`` are the
    rotary tables' inputs for Llama-family models. ``_hf`` is the transformers module when one
    was built (loaded through transformers, or by :meth:`hf_model`), else ``None``.
    """

    name: str
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    max_context_tokens: int
    chat: bool
    eos_token_ids: frozenset[int]
    inv_freq: torch.Tensor | None = None
    attention_scaling: float = 1.0
    _hf: Any = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        """``config.json``'s ``model_type`` (``llama``, ``qwen2``, ...)."""
        return str(self.config.get("model_type", ""))

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding."""
        embed = self.weights.get("model.embed_tokens.weight")
        return int(embed.shape[0]) if embed is not None else int(self.config["vocab_size"])

    def parameter_count(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        seen: set[int] = set()
        total = 0
        for tensor in self.weights.values():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel()
        return total

    def weight_bytes(self) -> int:
        """Bytes held by the distinct weight tensors."""
        seen: dict[int, int] = {}
        for tensor in self.weights.values():
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return sum(seen.values())

    def hf_model(self) -> Any:
        """The equivalent transformers module, built once on first use and sharing ``weights``.

        Imports transformers (seconds); the batching engine never calls this.
        """
        if self._hf is None:
            from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 (slow import)

            settings = {k: v for k, v in self.config.items() if k != "model_type"}
            config = AutoConfig.for_model(self.model_type, **settings)
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)  # type: ignore[no-untyped-call]
            model.load_state_dict(self.weights, strict=False, assign=True)
            model.tie_weights()
            self._hf = prepare_for_inference(model.to(self.device))
        return self._hf


class Embedder:
    """A sentence embedder: mean pooling over the attention mask, L2-normalised."""

    def __init__(
        self,
        name: str,
        encoder: BertEncoder,
        tokenizer: Any,
        *,
        device: torch.device,
        max_tokens: int,
        pad_id: int,
        batch_size: int = EMBED_BATCH,
    ) -> None:
        self.name = name
        self.encoder = encoder
        self.device = device
        self.dimensions: int = encoder.hidden_size
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self._tok = tokenizer
        self._tok.enable_truncation(max_length=max_tokens)
        self._tok.enable_padding(pad_id=pad_id)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and attention mask ``[len(texts), longest]`` with [CLS]/[SEP] added."""
        encodings = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=self.device)
        mask = torch.tensor(
            [e.attention_mask for e in encodings], dtype=torch.long, device=self.device
        )
        return ids, mask

    def warm(self) -> int:
        """Build the encoder's matmul kernels for every bucketed row count a forward of up to
        :data:`~inference_node.row_buckets.WARM_ROWS` tokens runs at, where they are built
        per shape (bfloat16 on CPU); returns the products run. Blocking, as :meth:`embed`."""
        return row_buckets.warm(self.encoder.products())

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Embed ``texts`` in batches, truncating each to ``max_tokens``.

        Returns one unit-length vector per text (in order) and the total number of tokens read.
        Blocking: call it from a worker thread when on an event loop.
        """
        vectors, tokens = self.embed_each(texts)
        return vectors, sum(tokens)

    def embed_each(
        self, texts: Sequence[str], batch_size: int | None = None
    ) -> tuple[list[list[float]], list[int]]:
        """As :meth:`embed`, with the tokens read per text, in forwards of ``batch_size`` texts
        at most (default :attr:`batch_size`). A text's vector does not depend on the texts it
        shares a forward with beyond rounding (in bf16, where padded row counts and attention
        spans change, within bf16 rounding): the dense layers see its real tokens only,
        attention masks the padding out, pooling averages its own tokens."""
        size = batch_size or self.batch_size
        vectors: list[list[float]] = []
        tokens: list[int] = []
        with torch.inference_mode():
            for start in range(0, len(texts), size):
                ids, mask = self.tokenize(texts[start : start + size])
                counts = mask.sum(dim=1)
                tokens.extend(int(n) for n in counts.tolist())
                # shortest first: the encoder's attention pads each run of rows to its longest
                order = torch.argsort(counts, stable=True)
                lengths = counts.index_select(0, order)
                hidden = self.encoder.packed(ids[order], mask[order]).float()  # real tokens only
                owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths.cpu())
                summed = hidden.new_zeros(len(lengths), hidden.shape[-1])
                summed.index_add_(0, owner.to(hidden.device), hidden)
                pooled = summed / lengths.unsqueeze(-1).to(hidden.dtype).clamp(min=1e-9)
                normed = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
                vectors.extend(normed.index_select(0, torch.argsort(order)).cpu().tolist())
        return vectors, tokens
