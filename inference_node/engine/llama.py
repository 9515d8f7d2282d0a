"""A batched forward pass for Llama-family causal LMs over a static, slot-based KV cache.

:meth:`LlamaRunner.step` runs the decode token of every running sequence and the prefill chunks
of new ones through each layer together (fused Q/K/V and gate/up matmuls, one read of the
weights per step), in place of Hugging Face's forward (docs/decisions/node-batched-runner.md).

Invariants:

- the KV cache is one pre-allocated tensor per K and V, ``[layers, slots, kv_heads, max_len,
  head_dim]``, sized from the memory budget: ``slots * max_len * bytes_per_token <= budget``;
  the engine admits no sequence longer than ``max_len``;
- running sequences occupy slots ``0..B-1`` (the engine keeps them compact), so decode
  attention reads ``cache[l, :B, :, :T]`` as a view, without a gather;
- logits are computed only for the rows that sample a token (the last prompt token of a
  finished prefill, every decode token);
- grouped-query attention repeats no K/V: a decode query ``[B, H, D]`` is viewed as
  ``[B, KVH, H/KVH, D]`` so each KV head serves its group in one batched matmul;
- LoRA (:mod:`inference_node.engine.lora_rows`) is added to a projection's output only when
  the step is given :class:`LoraRows`, i.e. when some row uses an adapter: a base-model step
  runs exactly the operations it runs without adapters.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference_node.engine.lora_rows import GATE_UP, QKV, LoraRows
from inference_node.model_types import LanguageModel
from inference_node.native import llama_unsupported_reason


def supports(lm: LanguageModel) -> bool:
    """True when ``lm`` is a Llama-family causal LM this runner can drive."""
    return lm.inv_freq is not None and llama_unsupported_reason(lm.config) is None


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On CPU it is backed by an anonymous mmap, which the kernel zero-fills
    page by page on first touch: allocating a 2 GiB cache costs nothing at start-up, and
    resident memory grows with the tokens actually cached, not with the reservation."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    size = count * torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(size, 1))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights, stored transposed (``[in, out]``, contiguous)."""

    ln1: torch.Tensor
    qkv_t: torch.Tensor
    qkv_b: torch.Tensor | None
    o_t: torch.Tensor
    ln2: torch.Tensor
    gate_up_t: torch.Tensor
    down_t: torch.Tensor


def _transposed(*weights: torch.Tensor) -> torch.Tensor:
    """``weights`` (each ``[out_i, in]``) stacked along ``out`` and stored transposed, as one
    contiguous ``[in, sum(out_i)]`` tensor, written in a single copy; every product is then
    ``x @ w_t``, not ``F.linear`` (docs/decisions/node-transposed-weights.md)."""
    return torch.cat([w.detach().t() for w in weights], dim=1)


def _mm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


@dataclass(frozen=True)
class Prefill:
    """A chunk of one sequence's prompt to run this step."""

    slot: int
    tokens: list[int]
    start: int
    """Position of ``tokens[0]``; > 0 when continuing a chunked prefill."""
    wants_logits: bool
    """True when this chunk ends the prompt, so its last position samples a token."""


class LlamaRunner:
    """Owns the weights (the model's state dict, fused copies for QKV and gate/up) and the KV
    cache; ``step`` runs one engine iteration. Not thread-safe: one engine thread uses it."""

    def __init__(self, lm: LanguageModel, *, slots: int, max_len: int) -> None:
        if lm.inv_freq is None:
            raise ValueError(f"{lm.name} has no rotary frequencies; not a Llama-family model")
        config, weights = lm.config, lm.weights
        self.device = lm.device
        self.dtype = lm.dtype
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // self.heads)
        self.group = self.heads // self.kv_heads
        self.eps = float(config["rms_norm_eps"])
        self.scale = self.head_dim**-0.5
        self.slots = slots
        self.max_len = max_len
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head_t = _transposed(weights.get("lm_head.weight", self.embed))
        self.layers = [
            self._fuse(weights, f"model.layers.{i}.")
            for i in range(int(config["num_hidden_layers"]))
        ]
        shape = (len(self.layers), slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = _zeros(shape, self.dtype, self.device)
        self.v_cache = _zeros(shape, self.dtype, self.device)
        # Rotary tables as transformers computes them: float32 angles, then the model's dtype.
        positions = torch.arange(max_len, device=self.device, dtype=torch.float32)
        angles = positions[:, None] * lm.inv_freq.to(self.device, torch.float32)[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        self.cos = (angles.cos() * lm.attention_scaling).to(self.dtype).contiguous()
        self.sin = (angles.sin() * lm.attention_scaling).to(self.dtype).contiguous()

    @staticmethod
    def _fuse(weights: Mapping[str, torch.Tensor], prefix: str) -> _Layer:
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        qkv_b = None
        if f"{attn}q_proj.bias" in weights:
            qkv_b = torch.cat([weights[f"{attn}{p}_proj.bias"] for p in "qkv"]).contiguous()
        return _Layer(
            ln1=weights[prefix + "input_layernorm.weight"],
            qkv_t=_transposed(*(weights[f"{attn}{p}_proj.weight"] for p in "qkv")),
            qkv_b=qkv_b,
            o_t=_transposed(weights[attn + "o_proj.weight"]),
            ln2=weights[prefix + "post_attention_layernorm.weight"],
            gate_up_t=_transposed(
                weights[mlp + "gate_proj.weight"], weights[mlp + "up_proj.weight"]
            ),
            down_t=_transposed(weights[mlp + "down_proj.weight"]),
        )

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first ``length`` KV positions from slot ``src`` to ``dst``."""
        if src != dst and length > 0:
            self.k_cache[:, dst, :, :length].copy_(self.k_cache[:, src, :, :length])
            self.v_cache[:, dst, :, :length].copy_(self.v_cache[:, src, :, :length])

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange two sequences' KV positions: the first ``length_a`` of slot ``a`` with the
        first ``length_b`` of slot ``b``."""
        n = max(length_a, length_b)
        if a != b and n > 0:
            for cache in (self.k_cache, self.v_cache):
                held = cache[:, a, :, :n].clone()
                cache[:, a, :, :n].copy_(cache[:, b, :, :n])
                cache[:, b, :, :n].copy_(held)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.eps) * weight

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [N, heads, D]; cos/sin [N, 1, D]; HF's rotate_half convention.
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def step(
        self,
        decode_tokens: list[int],
        decode_positions: list[int],
        prefills: list[Prefill],
        lora: LoraRows | None = None,
    ) -> torch.Tensor:
        """Run one iteration; returns logits ``[rows, vocab]`` (float32).

        Decode row ``i`` is the sequence in slot ``i`` (slots ``0..B-1``), feeding the token
        at ``decode_positions[i]``. Then one row per prefill with ``wants_logits``, in order.
        ``lora`` gives every input row (decode tokens, then each prefill's tokens) its
        adapter; None: the base model for all.
        """
        batch = len(decode_tokens)
        tokens = list(decode_tokens)
        positions = list(decode_positions)
        offsets: list[int] = []
        for p in prefills:
            offsets.append(len(tokens))
            tokens.extend(p.tokens)
            positions.extend(range(p.start, p.start + len(p.tokens)))
        dev = self.device
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        x = F.embedding(torch.tensor(tokens, dtype=torch.long, device=dev), self.embed)
        cos = self.cos.index_select(0, pos)[:, None, :]
        sin = self.sin.index_select(0, pos)[:, None, :]
        decode = _DecodeBatch.build(pos[:batch], decode_positions) if batch else None
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            normed = self._rms(x, layer.ln1)
            qkv = _mm(normed, layer.qkv_t, layer.qkv_b)
            if lora is not None:
                lora.add(index, QKV, normed, qkv)
            q = self._rope(qkv[:, :q_size].view(-1, self.heads, self.head_dim), cos, sin)
            k = self._rope(
                qkv[:, q_size : q_size + kv_size].view(-1, self.kv_heads, self.head_dim), cos, sin
            )
            v = qkv[:, q_size + kv_size :].view(-1, self.kv_heads, self.head_dim)
            out = torch.empty_like(q)
            if decode is not None:
                out[:batch] = self._decode_attention(index, q[:batch], k[:batch], v[:batch], decode)
            for p, row in zip(prefills, offsets, strict=True):
                rows = slice(row, row + len(p.tokens))
                out[rows] = self._prefill_attention(index, p, q[rows], k[rows], v[rows])
            attended = out.view(-1, q_size)
            projected = _mm(attended, layer.o_t)
            if lora is not None:
                lora.add(index, ("o_proj",), attended, projected)
            x = x + projected
            x = x + self._mlp(index, layer, x, lora)
        rows_out = list(range(batch)) + [
            row + len(p.tokens) - 1
            for p, row in zip(prefills, offsets, strict=True)
            if p.wants_logits
        ]
        if not rows_out:
            return torch.empty(0, self.lm_head_t.shape[1])
        picked = x.index_select(0, torch.tensor(rows_out, device=dev))
        return _mm(self._rms(picked, self.norm), self.lm_head_t).float()

    def _mlp(
        self, index: int, layer: _Layer, x: torch.Tensor, lora: LoraRows | None
    ) -> torch.Tensor:
        """The gated MLP's output for ``x`` (before the residual), with LoRA when given."""
        normed = self._rms(x, layer.ln2)
        gate_up = _mm(normed, layer.gate_up_t)
        if lora is not None:
            lora.add(index, GATE_UP, normed, gate_up)
        inter = gate_up.shape[-1] // 2
        hidden = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = _mm(hidden, layer.down_t)
        if lora is not None:
            lora.add(index, ("down_proj",), hidden, down)
        return down

    def _decode_attention(
        self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: _DecodeBatch
    ) -> torch.Tensor:
        """Write the new K/V at each sequence's position, attend over its cache slot (a view)."""
        n = q.shape[0]
        k_layer, v_layer = self.k_cache[index], self.v_cache[index]
        k_layer[batch.slots, :, batch.positions] = k
        v_layer[batch.slots, :, batch.positions] = v
        grouped = q.view(n, self.kv_heads, self.group, self.head_dim)
        attn = F.scaled_dot_product_attention(
            grouped,
            k_layer[:n, :, : batch.span],
            v_layer[:n, :, : batch.span],
            attn_mask=batch.mask,
            scale=self.scale,
        )
        return attn.reshape(n, self.heads, self.head_dim)

    def _prefill_attention(
        self, index: int, p: Prefill, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Write a prompt chunk's K/V into its slot; causal attention over the slot so far."""
        n, dev = len(p.tokens), self.device
        k_layer, v_layer = self.k_cache[index], self.v_cache[index]
        kp, vp = k.transpose(0, 1), v.transpose(0, 1)  # [KVH, n, D]
        k_layer[p.slot, :, p.start : p.start + n] = kp
        v_layer[p.slot, :, p.start : p.start + n] = vp
        if p.start == 0:
            # A whole prompt: the fused causal kernel with grouped-query heads; an explicit
            # mask would fall back to the math path (docs/decisions/node-prefill-causal-kernel.md).
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                kp[None],
                vp[None],
                is_causal=True,
                enable_gqa=True,
                scale=self.scale,
            )
            return attn[0].transpose(0, 1)
        keys = k_layer[p.slot, :, : p.start + n]
        values = v_layer[p.slot, :, : p.start + n]
        causal = (
            torch.arange(p.start + n, device=dev)[None, :]
            <= torch.arange(p.start, p.start + n, device=dev)[:, None]
        )
        # A later chunk: queries of one KV head's group stacked along the sequence axis, rows
        # ordered (group, token), with the causal mask offset by the chunk's start.
        grouped = q.transpose(0, 1).reshape(self.kv_heads, self.group * n, self.head_dim)
        attn = F.scaled_dot_product_attention(
            grouped, keys, values, attn_mask=causal.repeat(self.group, 1), scale=self.scale
        )
        return (
            attn.view(self.kv_heads, self.group, n, self.head_dim)
            .permute(2, 0, 1, 3)
            .reshape(n, self.heads, self.head_dim)
        )


@dataclass(frozen=True)
class _DecodeBatch:
    """Per-step tensors of the decoding sequences (slots ``0..B-1``), shared by every layer."""

    slots: torch.Tensor
    positions: torch.Tensor
    span: int
    mask: torch.Tensor

    @classmethod
    def build(cls, positions: torch.Tensor, plain: list[int]) -> _DecodeBatch:
        span = max(plain) + 1
        steps = torch.arange(span, device=positions.device)
        valid = steps[None, :] <= positions[:, None]
        return cls(
            slots=torch.arange(len(plain), device=positions.device),
            positions=positions,
            span=span,
            mask=valid[:, None, None, :],
        )
