"""Turning checkpoints into a :class:`LanguageModel`: natively, through transformers, or from a
GGUF file converted once.

A Llama-family checkpoint in safetensors with a ``tokenizer.json`` loads natively (weights
straight into a state dict, the Rust tokenizer, no transformers import); anything else loads
through transformers, imported only then. A GGUF conversion writes a complete safetensors
directory or nothing: it is renamed into place only once marked complete.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
import torch

from inference_node.model_types import LanguageModel, prepare_for_inference
from inference_node.native import (
    FastTokenizer,
    default_inv_freq,
    llama_unsupported_reason,
    load_safetensors,
    native_rope_reason,
    read_json,
    rope_settings,
)
from inference_node.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

log = structlog.get_logger(__name__)

CACHE_MARKER = ".sluice-complete"
"""File a finished conversion leaves in its directory; a directory without it is not used."""
_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DEFAULT_CONTEXT = 2048


AUTO = "auto"
"""The dtype setting that picks per device (:func:`dtype_name`)."""
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX, from Linux's
    ``/proc/cpuinfo`` flags, or ``cpuinfo``'s text); False where they cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(_CPU_BF16_FLAGS & set(line.partition(":")[2].split()))
    return False


def dtype_name(device: str, dtype: str) -> str:
    """``dtype``, or for ``auto`` what a generator runs in on ``device``: bfloat16 where the
    hardware computes in it (a CUDA device that supports it; a CPU with AVX-512 BF16 or AMX),
    float32 elsewhere; embedders follow the same rule. bfloat16 about doubles the built-in
    engine's tokens/s on such CPUs and halves prefill, and on AMX an embedding forward of 16-32
    texts runs 1.7-1.9x as many texts a second (docs/decisions/node-dtype-auto.md)."""
    if dtype != AUTO:
        return dtype
    if device == "cuda":
        # Emulated bf16 (compute capability below 8) is slow, and vLLM refuses it.
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False
        )
        return "bfloat16" if native else "float32"
    return "bfloat16" if cpu_has_bf16() else "float32"


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype named (``auto`` as :func:`dtype_name` picks it);
    ``ValueError`` for unknown ones or CUDA without a GPU."""
    if dtype != AUTO and dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use auto, float32 or bfloat16")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return torch.device(device), _DTYPES[dtype_name(device, dtype)]


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(f"package {module!r} is not installed")
    return Path(os.path.dirname(spec.origin))


def is_converted(target: Path) -> bool:
    """Whether ``target`` holds a finished conversion."""
    return (target / CACHE_MARKER).is_file()


def _context_length(config: dict[str, Any]) -> int:
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else _DEFAULT_CONTEXT


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


def load_directory(
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


def from_hf(
    name: str, model: Any, tokenizer: ByteTokenizer | HFTokenizer, device: torch.device
) -> LanguageModel:
    """Wrap a transformers causal LM (already in its dtype) as a :class:`LanguageModel`."""
    model = prepare_for_inference(model.to(device))
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
    return from_hf(name, model, HFTokenizer(tokenizer), device)


def convert_gguf(folder: Path, gguf_file: str, target: Path, *, name: str) -> None:
    """Dequantize ``folder/gguf_file`` and write it atomically as a safetensors directory at
    ``target`` (float32, with the tokenizer and chat template).

    The copy is written into a temporary sibling directory, marked complete, then renamed into
    place, so a crash never leaves a directory that looks usable. A concurrent converter that
    wins the rename is accepted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 (slow import)

    started = time.monotonic()
    log.info("gguf_conversion_started", model=name, gguf=gguf_file, target=str(target))
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    template = getattr(tokenizer, "chat_template", None)
    # save_pretrained refuses GGUF-loaded models: copy the weights into a plain model.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(gguf_model.state_dict())
    del gguf_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if template and not (tmp / _CHAT_TEMPLATE_FILE).is_file():
            (tmp / _CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
        (tmp / CACHE_MARKER).write_text("ok\n", encoding="utf-8")
        _move_into_place(tmp, target, name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "gguf_conversion_finished",
        model=name,
        target=str(target),
        chat_template=bool(template),
        seconds=round(time.monotonic() - started, 3),
    )


def _move_into_place(tmp: Path, target: Path, name: str) -> None:
    """Rename the finished ``tmp`` to ``target``; another converter's finished copy wins."""
    if target.exists() and not is_converted(target):
        shutil.rmtree(target)  # left over from an older, unmarked layout
    try:
        tmp.rename(target)
    except OSError:
        if not is_converted(target):
            raise
        log.info("gguf_conversion_raced", model=name, target=str(target))
