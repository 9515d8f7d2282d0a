"""LoRA math and adapter files against ``peft`` on the transformers model built from the same
weights: logits, loss with prompt masking and every factor's gradient, peft's on-disk format
in both directions, and the multi-adapter delta against a per-row loop."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from inference_node.loading import from_hf
from inference_node.lora import (
    IGNORE_INDEX,
    TARGET_MODULES,
    AdapterConfigError,
    AdapterFormatError,
    Batch,
    Example,
    FrozenLlama,
    LoraAdapter,
    LoraConfig,
    StackedLora,
    lora_delta,
    make_batch,
    target_shapes,
)
from inference_node.lora import batched as batched_module
from inference_node.lora import train as train_module
from inference_node.models import ByteTokenizer, LanguageModel, load_language_model

ROOT = Path(__file__).resolve().parents[1]
LOGITS_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-4  # relative: max |ours - peft| / max |peft| per factor
EXAMPLES = [
    Example(prompt=[72, 101, 108, 108], completion=[111, 32, 119]),
    Example(prompt=[1, 2], completion=[3, 4, 5, 6, 7, 8]),
    Example(prompt=[9, 9, 9, 9, 9], completion=[10]),
]


def _adapter(lm: LanguageModel, config: LoraConfig, *, seed: int = 1) -> LoraAdapter:
    """An adapter whose B is non-zero (a fresh one would leave the model unchanged)."""
    adapter = LoraAdapter.for_model(lm, config, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    for pair in adapter.pairs.values():
        pair.b.copy_(torch.randn(pair.b.shape, generator=generator) * 0.1)
    return adapter


def _peft_model(lm: LanguageModel, adapter: LoraAdapter) -> Any:
    """peft on a fresh transformers model sharing ``lm``'s weights, holding ``adapter``."""
    hf = dataclasses.replace(lm, _hf=None).hf_model()
    config = peft.LoraConfig(
        r=adapter.config.rank,
        lora_alpha=adapter.config.alpha,
        lora_dropout=0.0,
        target_modules=list(adapter.config.target_modules),
    )
    model = peft.get_peft_model(hf, config)
    state = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    result = peft.set_peft_model_state_dict(model, state)
    assert result.unexpected_keys == []
    return model


def _padding_mask(batch: Batch) -> torch.Tensor:
    """1 on real tokens of the right-padded ``EXAMPLES`` batch, 0 on padding."""
    lengths = torch.tensor([len(e.prompt) + len(e.completion) for e in EXAMPLES])
    return (torch.arange(batch.input_ids.shape[1])[None, :] < lengths[:, None]).long()


def _compare_with_peft(lm: LanguageModel, config: LoraConfig) -> tuple[float, float, float]:
    """Run ``EXAMPLES`` through our forward and through peft; returns (max logits difference
    over real tokens, loss difference, worst relative gradient difference over all factors)."""
    adapter = _adapter(lm, config).requires_grad_()
    reference = _peft_model(lm, adapter)
    batch = make_batch(EXAMPLES, pad_id=ByteTokenizer.pad_token_id)
    ours = FrozenLlama(lm).forward(adapter, batch.input_ids, batch.labels, return_logits=True)
    ours.loss.backward()
    mask = _padding_mask(batch)
    theirs = reference(input_ids=batch.input_ids, attention_mask=mask, labels=batch.labels)
    theirs.loss.backward()
    assert ours.logits is not None
    logits_diff = (ours.logits - theirs.logits)[mask.bool()].abs().max().item()
    named = dict(reference.named_parameters())
    worst = 0.0
    for path, pair in adapter.pairs.items():
        for letter, factor in (("A", pair.a), ("B", pair.b)):
            expected = named[f"base_model.model.{path}.lora_{letter}.default.weight"].grad
            assert factor.grad is not None and expected is not None
            relative = (factor.grad - expected).abs().max() / expected.abs().max()
            worst = max(worst, relative.item())
    return logits_diff, abs(ours.loss.item() - theirs.loss.item()), worst


def _variant_lm(model_type: str) -> LanguageModel:
    """A tiny model unlike ``tiny-random-llama``: tied embeddings, attention biases, a
    non-default rope theta and RMS epsilon, head_dim × heads ≠ hidden size (Llama) or
    Qwen2's q/k/v biases."""
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415 (slow import)

    settings: dict[str, Any] = {
        "vocab_size": ByteTokenizer.vocab_size,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": True,
        "pad_token_id": ByteTokenizer.pad_token_id,
    }
    if model_type == "llama":
        settings |= {"attention_bias": True, "head_dim": 8}
    config = AutoConfig.for_model(model_type, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # transformers initialises biases to zero
                torch.nn.init.normal_(parameter, std=0.05)
    return from_hf(f"variant-{model_type}", model, ByteTokenizer(), torch.device("cpu"))


def test_config_reports_every_violation_at_once() -> None:
    """Rank, alpha, dropout and target modules are all checked, and every problem is named."""
    with pytest.raises(AdapterConfigError) as caught:
        LoraConfig(rank=0, alpha=math.inf, dropout=0.6, target_modules=("q_proj", "lm_head"))
    message = str(caught.value)
    for part in ("rank", "alpha", "dropout", "lm_head"):
        assert part in message
    for bad in (
        {"rank": 257},
        {"rank": True},
        {"alpha": 0},
        {"alpha": float("nan")},
        {"dropout": -0.1},
        {"target_modules": ()},
        {"target_modules": ("q_proj", "q_proj")},
        {"target_modules": "q_proj"},
    ):
        with pytest.raises(AdapterConfigError):
            LoraConfig(**bad)


def test_config_scaling_is_alpha_over_rank_and_targets_are_kept_in_module_order() -> None:
    """``scaling`` is peft's ``alpha / r`` (not rsLoRA's); the target order does not matter."""
    config = LoraConfig(rank=8, alpha=32, target_modules=("down_proj", "q_proj"))
    assert config.scaling == 4.0
    assert config.target_modules == ("q_proj", "down_proj")
    assert config == LoraConfig(rank=8, alpha=32.0, target_modules=["q_proj", "down_proj"])
    assert LoraConfig().target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_peft_configs_with_features_served_differently_are_refused() -> None:
    """DoRA, rsLoRA, bias training, per-layer ranks and regex targets are refused."""
    base = LoraConfig().to_peft()
    assert LoraConfig.from_peft(base) == LoraConfig()
    for change in (
        {"use_dora": True},
        {"use_rslora": True},
        {"bias": "all"},
        {"rank_pattern": {"q_proj": 4}},
        {"target_modules": ".*proj"},
        {"peft_type": "IA3"},
        {"modules_to_save": ["lm_head"]},
    ):
        with pytest.raises(AdapterConfigError):
            LoraConfig.from_peft(base | change)


def test_initialisation_is_peft_s_and_follows_the_seed(tiny_lm: LanguageModel) -> None:
    """A is Kaiming-uniform (a=√5: bound 1/√in) and B zero, float32, from the seed alone."""
    config = LoraConfig(rank=4, target_modules=TARGET_MODULES)
    adapter = LoraAdapter.for_model(tiny_lm, config, seed=3)
    assert adapter.num_layers == 2 and len(adapter.pairs) == 14
    for path, (out_features, in_features) in target_shapes(tiny_lm, config).items():
        pair = adapter.pairs[path]
        assert pair.a.shape == (4, in_features) and pair.b.shape == (out_features, 4)
        assert pair.a.dtype == pair.b.dtype == torch.float32
        bound = 1 / math.sqrt(in_features)
        assert 0.5 * bound < pair.a.abs().max().item() <= bound
        assert not pair.b.any()
    again = LoraAdapter.for_model(tiny_lm, config, seed=3)
    other = LoraAdapter.for_model(tiny_lm, config, seed=4)
    assert all(
        torch.equal(x, y) for x, y in zip(adapter.parameters(), again.parameters(), strict=True)
    )
    assert not torch.equal(next(adapter.parameters()), next(other.parameters()))
    shapes = target_shapes(tiny_lm, config).values()
    assert adapter.nbytes() == sum(4 * (i + o) * 4 for o, i in shapes)


def test_logits_loss_and_gradients_match_peft(tiny_lm: LanguageModel) -> None:
    """On the tiny Llama (grouped-query attention) with LoRA on all seven projections and a
    padded batch whose prompts are masked (-100): logits within 1e-4, the same loss, and every
    lora_A/lora_B gradient within 1e-4 relative of peft's."""
    logits, loss, gradient = _compare_with_peft(
        tiny_lm, LoraConfig(rank=4, alpha=8, target_modules=TARGET_MODULES)
    )
    assert logits < LOGITS_TOLERANCE
    assert loss < LOGITS_TOLERANCE
    assert gradient < GRADIENT_TOLERANCE


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_model_config_is_respected(model_type: str) -> None:
    """Tied embeddings, attention biases, rope theta, RMS epsilon, a head_dim that is not
    hidden/heads and one KV head: still peft's logits, loss and gradients."""
    lm = _variant_lm(model_type)
    assert "lm_head.weight" not in lm.weights
    logits, loss, gradient = _compare_with_peft(
        lm, LoraConfig(rank=8, alpha=4, target_modules=("q_proj", "v_proj", "o_proj", "up_proj"))
    )
    assert logits < LOGITS_TOLERANCE
    assert loss < LOGITS_TOLERANCE
    assert gradient < GRADIENT_TOLERANCE


def test_chunked_loss_and_checkpointing_change_nothing(
    tiny_lm: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layer checkpointing and a loss computed two rows at a time give the same loss and
    gradients, dropout included (the masks are redrawn identically when recomputed)."""
    adapter = _adapter(tiny_lm, LoraConfig(rank=4, dropout=0.3)).requires_grad_()
    batch = make_batch(EXAMPLES, pad_id=ByteTokenizer.pad_token_id)
    model = FrozenLlama(tiny_lm)

    def run(checkpoint: bool) -> tuple[float, list[torch.Tensor]]:
        for factor in adapter.parameters():
            factor.grad = None
        generator = torch.Generator().manual_seed(5)
        out = model.forward(
            adapter, batch.input_ids, batch.labels, generator=generator, checkpoint=checkpoint
        )
        out.loss.backward()
        return out.loss.item(), [f.grad.clone() for f in adapter.parameters() if f.grad is not None]

    plain_loss, plain_grads = run(checkpoint=False)
    monkeypatch.setattr(train_module, "LOSS_CHUNK_BYTES", 2 * 4 * tiny_lm.vocab_size)
    chunked_loss, chunked_grads = run(checkpoint=True)
    assert chunked_loss == pytest.approx(plain_loss, abs=1e-6)
    assert len(chunked_grads) == len(plain_grads) == 16
    for ours, theirs in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_dropout_follows_the_generator_and_is_off_without_one(tiny_lm: LanguageModel) -> None:
    """The same seed gives the same dropout masks, another seed others; no generator means
    evaluation (the dropout-free loss)."""
    batch = make_batch(EXAMPLES, pad_id=ByteTokenizer.pad_token_id)
    model = FrozenLlama(tiny_lm)
    with_dropout = _adapter(tiny_lm, LoraConfig(rank=4, dropout=0.5))
    without = LoraAdapter(LoraConfig(rank=4), with_dropout.pairs)

    def loss(adapter: LoraAdapter, seed: int | None) -> float:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            out = model.forward(adapter, batch.input_ids, batch.labels, generator=generator)
        return out.loss.item()

    assert loss(with_dropout, 1) == loss(with_dropout, 1)
    assert loss(with_dropout, 1) != loss(with_dropout, 2)
    assert loss(with_dropout, None) == loss(without, 1)


def test_micro_batches_normalised_by_the_step_s_tokens_add_up_to_the_whole_batch(
    tiny_lm: LanguageModel,
) -> None:
    """Gradient accumulation: each micro-batch's loss divided by the whole step's target
    tokens sums to the full batch's mean loss, and so do the gradients. The base weights
    get no gradient."""
    adapter = _adapter(tiny_lm, LoraConfig(rank=4)).requires_grad_()
    model = FrozenLlama(tiny_lm)
    full = make_batch(EXAMPLES, pad_id=ByteTokenizer.pad_token_id)
    whole = model.forward(adapter, full.input_ids, full.labels)
    whole.loss.backward()
    expected = [f.grad.clone() for f in adapter.parameters() if f.grad is not None]
    assert whole.tokens == full.target_tokens == 3 + 6 + 1
    for factor in adapter.parameters():
        factor.grad = None
    total = 0.0
    for part in (EXAMPLES[:1], EXAMPLES[1:]):
        micro = make_batch(part, pad_id=ByteTokenizer.pad_token_id)
        out = model.forward(adapter, micro.input_ids, micro.labels, loss_normalizer=whole.tokens)
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(whole.loss.item(), rel=1e-6)
    for factor, grad in zip(adapter.parameters(), expected, strict=True):
        torch.testing.assert_close(factor.grad, grad, rtol=1e-5, atol=1e-7)
    assert all(w.grad is None and not w.requires_grad for w in tiny_lm.weights.values())


def test_bfloat16_base_trains_float32_factors(tmp_path: Path) -> None:
    """With bfloat16 base weights the factors and their gradients stay float32, and loss and
    gradients stay close to the float32 model's."""
    results = []
    for dtype in ("float32", "bfloat16"):
        lm = load_language_model("tiny-random-llama", cache_dir=tmp_path, dtype=dtype)
        adapter = _adapter(lm, LoraConfig(rank=4)).requires_grad_()
        batch = make_batch(EXAMPLES, pad_id=ByteTokenizer.pad_token_id)
        out = FrozenLlama(lm).forward(adapter, batch.input_ids, batch.labels)
        out.loss.backward()
        grad = next(adapter.parameters()).grad
        assert out.loss.dtype == torch.float32 and grad is not None
        assert grad.dtype == torch.float32
        results.append((out.loss.item(), grad))
    (loss32, grad32), (loss16, grad16) = results
    assert loss16 == pytest.approx(loss32, abs=1e-2)
    assert ((grad16 - grad32).abs().max() / grad32.abs().max()).item() < 5e-2


def test_a_batch_without_completion_tokens_has_zero_loss_and_gradients(
    tiny_lm: LanguageModel,
) -> None:
    """Nothing to predict: loss 0, backward still runs, every gradient is zero."""
    adapter = _adapter(tiny_lm, LoraConfig(rank=4)).requires_grad_()
    batch = make_batch([Example(prompt=[1, 2, 3], completion=[])], pad_id=0)
    out = FrozenLlama(tiny_lm).forward(adapter, batch.input_ids, batch.labels)
    out.loss.backward()
    assert out.tokens == 0 and out.loss.item() == 0.0
    assert all(f.grad is not None and not f.grad.any() for f in adapter.parameters())


def test_prompt_and_padding_are_masked_out_of_the_labels() -> None:
    """``make_batch`` pads on the right and labels only completion tokens."""
    batch = make_batch(EXAMPLES[:2], pad_id=0)
    assert batch.input_ids.tolist() == [
        [72, 101, 108, 108, 111, 32, 119, 0],
        [1, 2, 3, 4, 5, 6, 7, 8],
    ]
    i = IGNORE_INDEX
    assert batch.labels.tolist() == [
        [i, i, i, i, 111, 32, 119, i],
        [i, i, 3, 4, 5, 6, 7, 8],
    ]


def test_our_saved_adapter_loads_in_peft(tiny_lm: LanguageModel, tmp_path: Path) -> None:
    """``save`` writes what ``PeftModel.from_pretrained`` loads: the same tensors, settings
    and logits."""
    config = LoraConfig(rank=4, alpha=12, dropout=0.1, target_modules=("k_proj", "gate_proj"))
    adapter = _adapter(tiny_lm, config)
    adapter.save(tmp_path, base_model="tiny-random-llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    hf = dataclasses.replace(tiny_lm, _hf=None).hf_model()
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path)
    settings = loaded.peft_config["default"]
    assert (settings.r, settings.lora_alpha, settings.lora_dropout) == (4, 12, 0.1)
    assert settings.target_modules == {"k_proj", "gate_proj"}
    named = dict(loaded.named_parameters())
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(named[key.replace(".weight", ".default.weight")], tensor)
    ids = make_batch(EXAMPLES[1:2], pad_id=0)
    out = FrozenLlama(tiny_lm).forward(adapter, ids.input_ids, ids.labels, return_logits=True)
    with torch.no_grad():
        theirs = loaded(input_ids=ids.input_ids).logits
    assert out.logits is not None
    assert (out.logits - theirs).abs().max().item() < LOGITS_TOLERANCE


def test_peft_saved_adapter_loads_here(tiny_lm: LanguageModel, tmp_path: Path) -> None:
    """An adapter saved by peft's ``save_pretrained`` loads with its settings and tensors."""
    hf = dataclasses.replace(tiny_lm, _hf=None).hf_model()
    settings = peft.LoraConfig(
        r=6,
        lora_alpha=3,
        lora_dropout=0.05,
        target_modules=["down_proj", "v_proj", "q_proj"],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(hf, settings)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    model.save_pretrained(tmp_path)
    adapter = LoraAdapter.load(tmp_path)
    assert adapter.config == LoraConfig(
        rank=6, alpha=3, dropout=0.05, target_modules=("q_proj", "v_proj", "down_proj")
    )
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved.keys() == adapter.state_dict().keys()
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(saved[key], tensor)
    assert adapter.compatibility_error(target_shapes(tiny_lm, adapter.config)) is None


def test_invalid_adapter_directories_are_refused(tiny_lm: LanguageModel, tmp_path: Path) -> None:
    """A pickle-only adapter is refused unread; so are missing or unexpected tensors, a rank
    other than the config's, non-finite values and unsupported peft settings."""
    adapter = _adapter(tiny_lm, LoraConfig(rank=4))
    good = adapter.state_dict()
    cases: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {
        "missing": ({k: v for k, v in good.items() if "layers.1.self_attn.o_proj" not in k}, {}),
        "unexpected": (good | {"base_model.model.lm_head.weight": torch.zeros(2, 2)}, {}),
        "rank": (good, {"r": 8}),
        "nan": (
            {k: v.clone().fill_(math.nan) if "lora_A" in k else v for k, v in good.items()},
            {},
        ),
        "dora": (good, {"use_dora": True}),
    }
    for name, (tensors, change) in cases.items():
        directory = tmp_path / name
        adapter.save(directory)
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        settings = json.loads((directory / "adapter_config.json").read_text()) | change
        (directory / "adapter_config.json").write_text(json.dumps(settings))
        with pytest.raises((AdapterFormatError, AdapterConfigError)):
            LoraAdapter.load(directory)
    pickled = tmp_path / "pickled"
    adapter.save(pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match="pickle"):
        LoraAdapter.load(pickled)
    other = LoraAdapter.for_model(_variant_lm("llama"), LoraConfig(rank=4), seed=0)
    assert other.compatibility_error(target_shapes(tiny_lm, LoraConfig(rank=4))) is not None


def test_training_forward_does_not_import_transformers() -> None:
    """The training path uses the node's own weights and plain torch."""
    code = (
        "import sys, inference_node.lora; "
        "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def _per_row(
    x: torch.Tensor, index: list[int], adapters: list[LoraAdapter], path: str, out: int
) -> torch.Tensor:
    """The reference: each row's delta on its own, zeros where it has no adapter."""
    rows = []
    for row, j in enumerate(index):
        pair = adapters[j].pair(path) if j >= 0 else None
        if pair is None:
            rows.append(torch.zeros(out))
        else:
            rows.append(adapters[j].config.scaling * (pair.b @ (pair.a @ x[row])))
    return torch.stack(rows)


@pytest.mark.parametrize("gather_bytes", [batched_module.GATHER_BYTES, 1])
def test_multi_lora_delta_equals_a_per_row_loop(
    tiny_lm: LanguageModel, gather_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows with adapters of ranks 2, 4 and 8, an adapter that does not target the module,
    and rows on the base model alone (-1), in one call; also one row at a time."""
    monkeypatch.setattr(batched_module, "GATHER_BYTES", gather_bytes)
    path = "model.layers.1.self_attn.q_proj"
    adapters = [
        _adapter(tiny_lm, LoraConfig(rank=2, alpha=4), seed=1),
        _adapter(tiny_lm, LoraConfig(rank=8, alpha=2), seed=2),
        _adapter(tiny_lm, LoraConfig(rank=4, target_modules=("v_proj",)), seed=3),
        _adapter(tiny_lm, LoraConfig(rank=4, alpha=16), seed=4),
    ]
    stacked = StackedLora.from_adapters(adapters, path, (64, 64))
    assert stacked.a.shape == (4, 8, 64) and stacked.b.shape == (4, 64, 8)
    index = [0, -1, 1, 3, 2, 1, -1, 0, 3]
    x = torch.randn(len(index), 64, generator=torch.Generator().manual_seed(0))
    delta = lora_delta(x, torch.tensor(index), stacked)
    torch.testing.assert_close(delta, _per_row(x, index, adapters, path, 64), rtol=1e-5, atol=1e-6)
    none = lora_delta(x, torch.full((len(index),), -1), stacked)
    assert none.shape == (len(index), 64) and not none.any()
    half = lora_delta(x.bfloat16(), torch.tensor(index), stacked)
    assert half.dtype == torch.bfloat16
