"""Model-side helpers shared by the engine benchmark's workers: loading, workload, facts."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from bench.engine.common import BenchRequest, JobSpec, build_workload, random_prompt, token_pool
from inference_node.engine.text import kv_bytes_per_token  # reported with each run
from inference_node.models import LanguageModel, load_language_model

WARMUP_PROMPT_TOKENS = 8
WARMUP_NEW_TOKENS = 4


def load_model(spec: JobSpec) -> LanguageModel:
    """The model the job names, on its device and dtype (load time is never measured)."""
    return load_language_model(
        spec.model, device=spec.device, dtype=spec.dtype, cache_dir=Path(spec.cache_dir)
    )


def special_ids(lm: LanguageModel) -> set[int]:
    """BOS, EOS and PAD ids from the config and tokenizer (kept out of prompts)."""
    ids: set[int] = set()
    config = lm.config
    for value in (
        config.get("bos_token_id"),
        config.get("eos_token_id"),
        config.get("pad_token_id"),
        lm.tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def vocab_size(lm: LanguageModel) -> int:
    """Rows of the input embedding (what the engine validates prompt ids against)."""
    return lm.vocab_size


def workload_for(lm: LanguageModel, spec: JobSpec) -> list[BenchRequest]:
    """The job's full seeded workload for this model's vocabulary."""
    return build_workload(spec.seed, spec.workload_requests, vocab_size(lm), special_ids(lm))


def warmup_request(lm: LanguageModel) -> BenchRequest:
    """A tiny request served (untimed) before each measurement."""
    pool = token_pool(vocab_size(lm), special_ids(lm))
    prompt = random_prompt(random.Random(0), pool, WARMUP_PROMPT_TOKENS)
    return BenchRequest(-1, prompt, WARMUP_NEW_TOKENS)


def pad_id(lm: LanguageModel) -> int:
    """The id left padding uses: EOS, else 0."""
    eos = lm.tokenizer.eos_token_id
    return int(eos) if eos is not None else 0


def model_facts(lm: LanguageModel) -> dict[str, Any]:
    """Parameter count, weight and KV sizes, torch threads: context for every run record."""
    weights = lm.weight_bytes()
    return {
        "parameter_count": lm.parameter_count(),
        "weight_bytes": int(weights),
        "kv_bytes_per_token": kv_bytes_per_token(lm),
        "threads": torch.get_num_threads(),
    }


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
