"""Model pieces that load without importing transformers.

A Llama-family checkpoint is a ``config.json``, safetensors weights that
:class:`~inference_node.engine.llama.LlamaRunner` reads directly, and a ``tokenizer.json`` the
Rust ``tokenizers`` library runs (:class:`FastTokenizer`); the MiniLM embedder is the BERT
encoder below. transformers stays the path for everything else (other architectures, the GGUF
conversion, the benchmark's baselines), imported only when one of those is used
(docs/decisions/node-native-loading.md).

Equivalence with transformers is pinned by tests: same token ids, same chat rendering, same
greedy tokens, same embeddings.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import torch
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors.torch import load_file
from tokenizers import Tokenizer

from inference_node.row_buckets import mm

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})


def read_json(path: Path) -> dict[str, Any]:
    """``path`` parsed as a JSON object, ``{}`` when the file is absent."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def rope_settings(config: Mapping[str, Any]) -> tuple[str, float]:
    """``(rope type, theta)`` from either config layout (``rope_parameters`` in transformers 5,
    ``rope_theta`` + ``rope_scaling`` before)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = str(params.get("rope_type") or params.get("type") or "default")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return kind, float(theta)


def llama_unsupported_reason(config: Mapping[str, Any]) -> str | None:
    """Why :class:`LlamaRunner` cannot drive a model with this config, or ``None`` if it can."""
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        return f"model_type {model_type!r} is not Llama-family"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r} is not silu"
    if config.get("mlp_bias", False):
        return "MLP biases are not supported"
    sliding = config.get("sliding_window") and config.get("use_sliding_window", True)
    if sliding and model_type != "llama":
        return "sliding-window attention is not supported"
    return None


def native_rope_reason(config: Mapping[str, Any]) -> str | None:
    """Why the rotary tables cannot be computed here (scaled RoPE variants), or ``None``."""
    kind, _ = rope_settings(config)
    return None if kind == "default" else f"rope type {kind!r} needs transformers"


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse rotary frequencies, computed exactly as transformers' default RoPE does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (theta**exponent)


def load_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``directory``'s ``*.safetensors`` files (sharded checkpoints too)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {directory}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file), device="cpu"))
    return weights


def _token_text(value: Any) -> str | None:
    """A special token from ``tokenizer_config.json``: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop spaces before punctuation/contractions."""
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class FastTokenizer:
    """A ``tokenizer.json`` run by the ``tokenizers`` library, with the model's chat template.

    Follows transformers' fast tokenizers: no special tokens added on ``encode``, special tokens
    skipped on ``decode``, the chat template rendered by a sandboxed Jinja environment with
    ``trim_blocks``/``lstrip_blocks`` and the special tokens as variables.
    """

    def __init__(self, directory: Path) -> None:
        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = read_json(directory / "tokenizer_config.json")
        self._specials = {
            key: text
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(key))) is not None
        }
        eos = self._specials.get("eos_token")
        eos_id = self._tok.token_to_id(eos) if eos else None
        self.eos_token_id: int | None = int(eos_id) if eos_id is not None else None
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False))
        template = config.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if not template and template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        self._template = _compile_template(template) if isinstance(template, str) else None

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template."""
        return self._template is not None

    def token_id(self, token: str) -> int | None:
        """Id of a vocabulary token, ``None`` if absent."""
        found = self._tok.token_to_id(token)
        return int(found) if found is not None else None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without added special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens skipped."""
        text = self._tok.decode(list(ids), skip_special_tokens=True)
        return _clean_up_tokenization(text) if self._cleanup else text

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Render with the model's template and the generation prompt; ``ValueError`` if none."""
        if self._template is None:
            raise ValueError("this model has no chat template")
        rendered = self._template.render(
            messages=[{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=True,
            tools=None,
            documents=None,
            **self._specials,
        )
        return self.encode(rendered)


def _compile_template(source: str) -> Any:
    """A chat template compiled the way transformers compiles it (minus its ``generation`` tag,
    which only marks assistant spans for training masks)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class BertEncoder:
    """A BERT encoder (post-LayerNorm, absolute positions, GELU) over a safetensors state dict,
    as used by sentence-transformers' MiniLM models. ``__call__`` returns the last hidden state.

    Q/K/V are fused into one transposed matrix per layer, as in the Llama runner.
    """

    def __init__(
        self, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor], dtype: torch.dtype
    ) -> None:
        self.hidden_size = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.max_positions = int(config.get("max_position_embeddings", 512))
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported BERT activation {config.get('hidden_act')!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""

        def w(name: str) -> torch.Tensor:
            return weights[prefix + name].to(dtype)

        self.word = w("embeddings.word_embeddings.weight")
        self.position = w("embeddings.position_embeddings.weight")
        self.token_type = w("embeddings.token_type_embeddings.weight")[0]
        self.embed_norm = (w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"))
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            attn = p + "attention.self."
            self.layers.append(
                {
                    "qkv_t": torch.cat(
                        [w(attn + "query.weight"), w(attn + "key.weight"), w(attn + "value.weight")]
                    )
                    .t()
                    .contiguous(),
                    "qkv_b": torch.cat(
                        [w(attn + "query.bias"), w(attn + "key.bias"), w(attn + "value.bias")]
                    ),
                    "o_t": w(p + "attention.output.dense.weight").t().contiguous(),
                    "o_b": w(p + "attention.output.dense.bias"),
                    "ln1_w": w(p + "attention.output.LayerNorm.weight"),
                    "ln1_b": w(p + "attention.output.LayerNorm.bias"),
                    "up_t": w(p + "intermediate.dense.weight").t().contiguous(),
                    "up_b": w(p + "intermediate.dense.bias"),
                    "down_t": w(p + "output.dense.weight").t().contiguous(),
                    "down_b": w(p + "output.dense.bias"),
                    "ln2_w": w(p + "output.LayerNorm.weight"),
                    "ln2_b": w(p + "output.LayerNorm.bias"),
                }
            )

    def to(self, device: torch.device) -> BertEncoder:
        """Move every weight to ``device`` (in place); returns ``self``."""
        self.word, self.position = self.word.to(device), self.position.to(device)
        self.token_type = self.token_type.to(device)
        self.embed_norm = (self.embed_norm[0].to(device), self.embed_norm[1].to(device))
        self.layers = [{k: v.to(device) for k, v in layer.items()} for layer in self.layers]
        return self

    def products(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The (transposed weight, bias) of each matmul of a layer (every layer's are of the
        same shapes), as :func:`~inference_node.row_buckets.warm` takes them."""
        layer = self.layers[0]
        return [(layer[f"{name}_t"], layer[f"{name}_b"]) for name in ("qkv", "o", "up", "down")]

    def parameter_count(self) -> int:
        """Number of weights held."""
        tensors = [self.word, self.position, self.token_type, *self.embed_norm]
        tensors += [t for layer in self.layers for t in layer.values()]
        return sum(t.numel() for t in tensors)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[batch, tokens, hidden]`` of token ids with attention mask 1/0."""
        batch, length = ids.shape
        size, heads = self.hidden_size, self.heads
        x = F.embedding(ids, self.word) + self.position[:length] + self.token_type
        x = F.layer_norm(x, (size,), *self.embed_norm, eps=self.eps)
        keys_valid = mask.bool()[:, None, None, :]
        for layer in self.layers:
            qkv = mm(x.view(-1, size), layer["qkv_t"], layer["qkv_b"])
            q, k, v = (
                t.view(batch, length, heads, size // heads).transpose(1, 2)
                for t in torch.split(qkv, size, dim=-1)
            )
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keys_valid)
            ctx = ctx.transpose(1, 2).reshape(-1, size)
            attended = mm(ctx, layer["o_t"], layer["o_b"]).view(batch, length, size)
            x = F.layer_norm(x + attended, (size,), layer["ln1_w"], layer["ln1_b"], self.eps)
            inner = F.gelu(mm(x.view(-1, size), layer["up_t"], layer["up_b"]))
            out = mm(inner, layer["down_t"], layer["down_b"]).view(batch, length, size)
            x = F.layer_norm(x + out, (size,), layer["ln2_w"], layer["ln2_b"], self.eps)
        return x

    @torch.inference_mode()
    def packed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[tokens, hidden]`` of the real tokens only (mask 1, in order) of
        right-padded ``ids``: the same values as :meth:`__call__`'s at those positions (within
        rounding: in bf16 padded row counts and attention spans round differently), but
        every dense layer runs on the real tokens alone, so a batch of texts of unequal
        lengths pays for padding only inside attention, and there only up to the longest
        text of its group: attention runs on up to :data:`ATTENTION_GROUPS` runs of rows,
        each padded to its own longest (:func:`attention_groups`; rows sorted by length,
        as :meth:`Embedder.embed_each` passes them, make those runs tight)."""
        length = ids.shape[1]
        size, heads = self.hidden_size, self.heads
        # The real tokens' flat positions and each text's length, found once (two host
        # syncs): every layer then gathers and scatters by index, never by boolean mask (a
        # sync per use on a GPU).
        idx = mask.reshape(-1).nonzero().squeeze(1)
        lengths = mask.sum(dim=1).tolist()
        groups: list[_AttentionGroup] = []
        for start, end in attention_groups(len(lengths)):
            first = groups[-1].first + groups[-1].tokens if groups else 0
            span, tokens = max(lengths[start:end]), sum(lengths[start:end])
            real = idx[first : first + tokens]  # this run's tokens, as flat positions
            groups.append(
                _AttentionGroup(
                    rows=end - start,
                    span=span,
                    first=first,
                    tokens=tokens,
                    where=(real // length - start) * span + real % length,
                    keys_valid=mask[start:end, None, None, :span].bool(),
                    buffer=self.word.new_zeros((end - start) * span, 3 * size),
                )
            )
        x = F.embedding(ids.reshape(-1).index_select(0, idx), self.word)
        x = x + self.position.index_select(0, idx % length)
        x = F.layer_norm(x + self.token_type, (size,), *self.embed_norm, eps=self.eps)
        for layer in self.layers:
            qkv = mm(x, layer["qkv_t"], layer["qkv_b"])
            ctx = torch.cat([g.attend(qkv, heads) for g in groups]) if groups else qkv[:, :size]
            attended = mm(ctx, layer["o_t"], layer["o_b"])
            x = F.layer_norm(x + attended, (size,), layer["ln1_w"], layer["ln1_b"], self.eps)
            inner = F.gelu(mm(x, layer["up_t"], layer["up_b"]))
            out = mm(inner, layer["down_t"], layer["down_b"])
            x = F.layer_norm(x + out, (size,), layer["ln2_w"], layer["ln2_b"], self.eps)
        return x


ATTENTION_GROUPS = 4
"""Most runs of rows a packed batch's attention is split into (each its own call)."""

MIN_GROUP_ROWS = 4
"""Fewest rows in one of those runs: a call costs about as much as a few rows."""


def attention_groups(rows: int) -> list[tuple[int, int]]:
    """Runs ``[start, end)`` of ``rows`` rows, of equal count (at most
    :data:`ATTENTION_GROUPS`, each of at least :data:`MIN_GROUP_ROWS` rows where there are
    that many) covering every row; none for no rows. On CPU attention costs about its padded
    tokens, not their square, so splitting rows sorted by length cuts the padding it
    computes."""
    count = max(1, min(ATTENTION_GROUPS, rows // MIN_GROUP_ROWS)) if rows else 0
    bounds = [round(i * rows / count) for i in range(count + 1)] if count else []
    return list(itertools.pairwise(bounds))


@dataclass(frozen=True)
class _AttentionGroup:
    """A run of rows of a packed batch, padded to its longest: its real tokens' first row in
    the packed tokens and where they sit in the padding, its key mask, and a zeroed padded
    Q/K/V buffer that every layer reuses (only the real tokens' rows are ever written, so the
    padding stays zero)."""

    rows: int
    span: int
    first: int
    tokens: int
    where: torch.Tensor
    keys_valid: torch.Tensor
    buffer: torch.Tensor

    def attend(self, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        """The attention output ``[tokens, hidden]`` of this group's real tokens, from the
        packed fused Q/K/V ``qkv`` of the whole batch."""
        size = qkv.shape[1] // 3
        padded = self.buffer.index_copy_(0, self.where, qkv[self.first : self.first + self.tokens])
        q, k, v = (
            t.view(self.rows, self.span, heads, size // heads).transpose(1, 2)
            for t in torch.split(padded.view(self.rows, self.span, 3 * size), size, dim=-1)
        )
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keys_valid)
        return ctx.transpose(1, 2).reshape(-1, size).index_select(0, self.where)
