"""Training in the gaps, node side: the staged micro-step against the one-piece training
forward, a fine-tune resumed from a checkpoint against one that never stopped, the schedules,
the data order and encoding, the checkpoint store, the gap policy on a fake clock, and the
memory estimate against what autograd really keeps."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from inference_node.lora import (
    TARGET_MODULES,
    Example,
    FrozenLlama,
    LoraAdapter,
    LoraConfig,
    make_batch,
)
from inference_node.models import ByteTokenizer, LanguageModel
from inference_node.training import (
    ChatEncoder,
    CheckpointError,
    Cursor,
    DataOrder,
    DirectoryCheckpointStore,
    ExampleError,
    GapConfig,
    GapPolicy,
    GapReason,
    OptimizerConfig,
    Schedule,
    StagedStep,
    Trainer,
    TrainerState,
    TrainExample,
    TrainingConfig,
    TrainingMemory,
    UnitKind,
    balanced_loss_rows,
    encode_prompt_completion,
    layer_graph_bytes_per_token,
    lr_multiplier,
    make_train_batch,
)

EXAMPLES = [
    Example(prompt=[72, 101, 108, 108], completion=[111, 32, 119]),
    Example(prompt=[1, 2], completion=[3, 4, 5, 6, 7, 8]),
    Example(prompt=[9, 9, 9, 9, 9], completion=[10]),
]
EXACT = 1e-6


def _adapter(lm: LanguageModel, config: LoraConfig) -> LoraAdapter:
    """An adapter with non-zero B (a fresh one has zero gradients for A)."""
    adapter = LoraAdapter.for_model(lm, config, seed=1)
    generator = torch.Generator().manual_seed(101)
    for pair in adapter.pairs.values():
        pair.b.copy_(torch.randn(pair.b.shape, generator=generator) * 0.1)
    return adapter.requires_grad_()


def _take_grads(adapter: LoraAdapter) -> list[torch.Tensor]:
    grads = []
    for factor in adapter.parameters():
        assert factor.grad is not None
        grads.append(factor.grad.clone())
        factor.grad = None
    return grads


def _examples(count: int, seed: int) -> list[TrainExample]:
    """``count`` random byte prompt/completion pairs of varying lengths."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(0, 256, (length,), generator=generator).tolist()

    return [TrainExample.prompt_completion(draw(1, 9), draw(1, 7)) for _ in range(count)]


# -- staged micro-step -------------------------------------------------------------------------


@pytest.mark.parametrize("loss_chunk_rows", [None, 2])
def test_staged_step_gives_the_training_forward_s_loss_and_gradients(
    tiny_lm: LanguageModel, loss_chunk_rows: int | None
) -> None:
    """Layer by layer under no_grad, the loss in chunks, then layer-by-layer recompute and
    backward: the same loss and every LoRA gradient within 1e-6 of ``FrozenLlama.forward``
    plus ``backward``, with dropout on all seven projections (same seeded masks), over two
    accumulated micro-batches normalised by the step's tokens; the dropout generator ends in
    the same state."""
    adapter = _adapter(tiny_lm, LoraConfig(rank=4, dropout=0.3, target_modules=TARGET_MODULES))
    model = FrozenLlama(tiny_lm)
    parts = [make_batch(p, pad_id=0) for p in (EXAMPLES[:2], EXAMPLES[2:])]
    total = sum(b.target_tokens for b in parts)
    reference_rng = torch.Generator().manual_seed(5)
    reference_losses = []
    for batch in parts:
        out = model.forward(
            adapter, batch.input_ids, batch.labels, generator=reference_rng, loss_normalizer=total
        )
        out.loss.backward()
        reference_losses.append(out.loss.item())
    expected = _take_grads(adapter)
    staged_rng = torch.Generator().manual_seed(5)
    losses = []
    for batch in parts:
        step = StagedStep(
            model,
            adapter,
            batch,
            generator=staged_rng,
            loss_normalizer=total,
            loss_chunk_rows=loss_chunk_rows,
        )
        losses.append(step.run_all().item())
    assert losses == pytest.approx(reference_losses, abs=EXACT)
    for ours, theirs in zip(_take_grads(adapter), expected, strict=True):
        assert (ours - theirs).abs().max().item() <= EXACT
    assert torch.equal(staged_rng.get_state(), reference_rng.get_state())


def test_staged_units_run_in_order_and_each_is_timed(tiny_lm: LanguageModel) -> None:
    """The units are every layer forward, the loss chunks, every layer backward in reverse;
    each records its kind, work and time; a unit called out of turn is refused; building a
    step draws nothing from the dropout generator."""
    adapter = _adapter(tiny_lm, LoraConfig(rank=4, dropout=0.1))
    batch = make_batch(EXAMPLES, pad_id=0)
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    ticks = iter(range(1000))
    step = StagedStep(
        FrozenLlama(tiny_lm),
        adapter,
        batch,
        generator=generator,
        loss_chunk_rows=4,
        clock=lambda: float(next(ticks)),
    )
    assert torch.equal(generator.get_state(), before)
    first = step.next_unit
    assert first is not None
    kinds = []
    for unit in step.units():
        kinds.append(unit.kind)
        unit()
        with pytest.raises(RuntimeError):
            unit()
    assert first.kind is UnitKind.FORWARD
    assert kinds == [UnitKind.FORWARD] * 2 + [UnitKind.LOSS] * 3 + [UnitKind.BACKWARD] * 2
    assert step.done and step.loss is not None and step.tokens == 10
    tokens = batch.input_ids.numel()
    assert [t.work for t in step.timings] == [tokens, tokens, 4, 4, 2, tokens, tokens]
    assert all(t.seconds == 1.0 for t in step.timings)
    # A loss row of the tiny Llama costs 2 × 259 × 64 (LM head, softmax), a layer token 36,864.
    assert balanced_loss_rows(FrozenLlama(tiny_lm), 10) == 10 * 36_864 // (2 * 259 * 64)


def test_a_staged_step_without_targets_has_zero_loss_and_gradients(tiny_lm: LanguageModel) -> None:
    """As the training forward: nothing to predict gives loss 0 and zero gradients."""
    adapter = _adapter(tiny_lm, LoraConfig(rank=4))
    batch = make_batch([Example(prompt=[1, 2, 3], completion=[])], pad_id=0)
    step = StagedStep(FrozenLlama(tiny_lm), adapter, batch)
    assert step.run_all().item() == 0.0
    assert all(not grad.any() for grad in _take_grads(adapter))


# -- the trainer, checkpoints and resume -------------------------------------------------------


def _resume_config() -> TrainingConfig:
    return TrainingConfig(
        lora=LoraConfig(rank=4, dropout=0.2, target_modules=TARGET_MODULES),
        optimizer=OptimizerConfig(learning_rate=1e-2, schedule=Schedule.COSINE, warmup_steps=2),
        micro_batch_size=3,
        accumulation_steps=2,
        epochs=3,
        seed=7,
    )


def test_a_resumed_fine_tune_matches_an_uninterrupted_one_step_for_step(
    tiny_lm: LanguageModel, tmp_path: Path
) -> None:
    """Train 6 steps straight; separately train 3, checkpoint (mid-epoch, dropout on), run
    one more step and "crash", then restore the checkpoint into a fresh trainer and finish:
    every step's loss, rate and gradient norm equals the uninterrupted run's within 1e-6,
    and so does the final adapter."""
    examples = _examples(11, seed=0)
    config = _resume_config()
    straight = Trainer(tiny_lm, examples, config)
    assert straight.total_steps == 6  # 4 micro-batches per epoch × 3 epochs / 2
    expected = [straight.train_step() for _ in range(6)]
    assert straight.done
    store = DirectoryCheckpointStore(tmp_path, keep=2)
    first = Trainer(tiny_lm, examples, config)
    reports = [first.train_step() for _ in range(3)]
    assert first.cursor == Cursor(epoch=1, position=6)
    store.save("job-7", first.step, first.state().to_files())
    first.train_step()
    second = Trainer(tiny_lm, examples, config)
    latest = store.latest("job-7")
    assert latest == 3
    second.restore(TrainerState.from_files(store.load("job-7", latest)))
    while not second.done:
        reports.append(second.train_step())
    assert [r.step for r in reports] == [1, 2, 3, 4, 5, 6]
    for ours, theirs in zip(reports, expected, strict=True):
        assert ours.loss == pytest.approx(theirs.loss, abs=EXACT)
        assert ours.grad_norm == pytest.approx(theirs.grad_norm, abs=EXACT)
        assert ours.learning_rate == theirs.learning_rate
    for ours, theirs in zip(
        second.adapter.parameters(), straight.adapter.parameters(), strict=True
    ):
        assert (ours - theirs).abs().max().item() <= EXACT
    assert len({r.loss for r in expected}) == 6


def test_state_is_refused_mid_step_and_restore_refuses_another_job(tiny_lm: LanguageModel) -> None:
    """A checkpoint is taken between optimizer steps only, and a trainer with other data or
    settings refuses it; peeking at the next unit does not count as starting the step."""
    examples = _examples(5, seed=1)
    config = TrainingConfig(lora=LoraConfig(rank=2, dropout=0.1), micro_batch_size=2)
    trainer = Trainer(tiny_lm, examples, config)
    assert trainer.next_unit is not None
    state = trainer.state()
    trainer.run_next()
    with pytest.raises(RuntimeError):
        trainer.state()
    with pytest.raises(CheckpointError):
        Trainer(tiny_lm, examples[:4], config).restore(state)
    with pytest.raises(CheckpointError):
        Trainer(tiny_lm, examples, TrainingConfig(lora=config.lora, seed=1)).restore(state)
    Trainer(tiny_lm, examples, config).restore(state)


def test_a_trainer_reports_each_step_and_learns(tiny_lm: LanguageModel) -> None:
    """Steps count up with the linear schedule's rates after warm-up, clipped gradient norms
    are reported, epochs advance, and the loss on a repeated example falls."""
    examples = [TrainExample.prompt_completion([1, 2, 3], [4, 5, 6, 7])] * 4
    config = TrainingConfig(
        lora=LoraConfig(rank=4, target_modules=TARGET_MODULES),
        optimizer=OptimizerConfig(learning_rate=5e-2, warmup_steps=1, max_grad_norm=0.5),
        micro_batch_size=2,
        max_steps=8,
    )
    trainer = Trainer(tiny_lm, examples, config)
    reports = [trainer.train_step() for _ in range(8)]
    assert [r.step for r in reports] == list(range(1, 9))
    assert [r.learning_rate for r in reports] == pytest.approx(
        [0.0] + [5e-2 * (8 - s) / 7 for s in range(1, 8)]
    )
    assert all(r.tokens == 8 and r.sequence_tokens == 14 for r in reports)
    assert reports[-1].epoch == 4
    assert reports[-1].loss < reports[0].loss - 0.5
    assert trainer.next_unit is None and trainer.run_next() is None
    with pytest.raises(RuntimeError):
        trainer.train_step()


def test_schedules_follow_transformers() -> None:
    """Warm-up rises from 0; constant stays, linear falls to 0, cosine follows half a cycle."""
    total, warmup = 10, 2
    values = {
        s: [lr_multiplier(s, step, total=total, warmup=warmup) for step in range(total + 1)]
        for s in Schedule
    }
    assert values[Schedule.CONSTANT] == [0.0, 0.5] + [1.0] * 9
    assert values[Schedule.LINEAR] == pytest.approx(
        [0.0, 0.5, *[(10 - s) / 8 for s in range(2, 11)]]
    )
    assert values[Schedule.COSINE][:3] == [0.0, 0.5, 1.0]
    assert values[Schedule.COSINE][6] == pytest.approx(0.5)
    assert values[Schedule.COSINE][10] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        OptimizerConfig(learning_rate=0, warmup_steps=-1)


def test_checkpoint_store_writes_atomically_and_keeps_the_last_k(tmp_path: Path) -> None:
    """A save is a rename of a complete directory: a leftover temporary directory is not a
    checkpoint (and the next save removes it); only the newest ``keep`` remain; re-saving a
    step replaces it; names that could escape the root are refused."""
    store = DirectoryCheckpointStore(tmp_path, keep=2)
    assert store.latest("job") is None
    (tmp_path / "job" / ".tmp-9-dead").mkdir(parents=True)
    assert store.latest("job") is None
    for step in (1, 2, 3):
        store.save("job", step, {"a.bin": bytes([step]), "b.json": b"{}"})
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["0000000002", "0000000003"]
    assert store.latest("job") == 3
    assert store.load("job", 2) == {"a.bin": b"\x02", "b.json": b"{}"}
    store.save("job", 3, {"a.bin": b"new"})
    assert store.load("job", 3) == {"a.bin": b"new"}
    with pytest.raises(CheckpointError):
        store.load("job", 1)
    for bad_job, bad_name in (("../x", "a"), ("job", "../a"), (".hidden", "a")):
        with pytest.raises(CheckpointError):
            store.save(bad_job, 4, {bad_name: b""})


def test_trainer_state_files_are_safetensors_and_json_only() -> None:
    """The state round-trips through its two files; anything else (a pickle, a missing or
    extra file, another format) is refused unread."""
    state = TrainerState(tensors={"x": torch.arange(3.0), "s": torch.tensor(2.0)}, scalars={"k": 1})
    files = state.to_files()
    assert json.loads(files["state.json"]) == {"format": 1, "k": 1}
    back = TrainerState.from_files(files)
    assert back.scalars == {"k": 1} and torch.equal(back.tensors["x"], torch.arange(3.0))
    assert back.tensors["s"].shape == ()
    for broken in (
        {"state.pt": b"\x80\x04"},
        files | {"extra": b""},
        files | {"state.json": b'{"format": 2}'},
        files | {"state.safetensors": b"\x80\x04pickle"},
    ):
        with pytest.raises(CheckpointError):
            TrainerState.from_files(broken)


# -- data ---------------------------------------------------------------------------------------


def test_data_order_is_a_seeded_shuffle_per_epoch() -> None:
    """Each epoch reads every example once in an order fixed by the seed and the epoch; the
    last micro-batch of an epoch holds the rest, and the cursor moves to the next epoch."""
    order = DataOrder(7, 3, seed=1)
    cursor, seen = Cursor(), []
    for _ in range(3):
        indices, cursor = order.micro_batch(cursor)
        seen.append(indices)
    assert [len(s) for s in seen] == [3, 3, 1] and cursor == Cursor(1, 0)
    assert sorted(i for s in seen for i in s) == list(range(7))
    assert order.permutation(0) == DataOrder(7, 3, seed=1).permutation(0)
    assert order.permutation(0) != order.permutation(1)
    assert order.permutation(0) != DataOrder(7, 3, seed=2).permutation(0)


def test_examples_learn_completions_and_assistant_turns() -> None:
    """A completion is learned with the end-of-sequence token after it; in a chat every
    assistant turn's content and end of turn are learned, nothing else; the batch labels
    only learned positions."""
    tokenizer = ByteTokenizer()
    line = encode_prompt_completion(tokenizer, "Hi", "Yo", eos_id=257)
    assert line.tokens == (72, 105, 89, 111, 257)
    assert line.learned == (False, False, True, True, True)
    chat = ChatEncoder(tokenizer).encode(
        [("system", "S"), ("user", "Hi"), ("assistant", "Yo"), ("user", "Q"), ("assistant", "A!")]
    )
    text = bytes(chat.tokens).decode()
    assert (
        text == "<|system|>\nS\n<|user|>\nHi\n<|assistant|>\nYo\n<|user|>\nQ\n<|assistant|>\nA!\n"
    )
    assert (
        bytes(t for t, keep in zip(chat.tokens, chat.learned, strict=True) if keep) == b"Yo\nA!\n"
    )
    batch = make_train_batch([line, chat])
    assert batch.labels[0].tolist()[:5] == [-100, -100, 89, 111, 257]
    assert batch.target_tokens == 3 + 6
    with pytest.raises(ExampleError):
        ChatEncoder(tokenizer).encode([("user", "no reply")])


def test_examples_too_long_or_with_nothing_to_learn_are_refused(tiny_lm: LanguageModel) -> None:
    """Every example is checked before training starts, and the first bad one is named."""
    config = TrainingConfig(max_seq_len=8)
    with pytest.raises(ExampleError, match="example 1 has 9 tokens"):
        Trainer(tiny_lm, [*_examples(1, 0), TrainExample.prompt_completion([1] * 8, [2])], config)
    with pytest.raises(ExampleError, match="no token to learn"):
        Trainer(tiny_lm, [TrainExample.prompt_completion([1, 2], [])], config)


# -- the gap policy ----------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when told (in binary fractions of a second, so sums are exact)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _run(policy: GapPolicy, clock: FakeClock, kind: str, work: int, seconds: float) -> None:
    """One unit of ``seconds`` on an idle engine."""
    policy.unit_started(kind, work, running=0)
    clock.advance(seconds)
    policy.unit_finished()


MS = 1 / 1024  # a "millisecond" that adds up exactly
GAPS = GapConfig(
    yield_bound_s=64 * MS, itl_budget_s=128 * MS, idle_slice_s=256 * MS, ewma_alpha=0.5, safety=1.0
)


def test_training_never_runs_while_inference_waits() -> None:
    """Requests waiting to be admitted go first, idle or not, measured or not."""
    clock = FakeClock()
    policy = GapPolicy(GAPS, clock)
    _run(policy, clock, "forward", 100, 1 * MS)
    policy.decode_step(8 * MS)
    for running in (0, 3):
        decision = policy.decide("forward", 100, waiting=1, running=running)
        assert not decision.run and decision.reason is GapReason.INFERENCE_WAITING


def test_a_unit_predicted_over_the_yield_bound_never_runs() -> None:
    """The prediction is the median time of the kind's last runs of at least the unit's work,
    or all of them scaled up linearly for a larger unit: a unit twice the measured size
    predicted over the bound is refused even on an idle engine; a smaller unit is predicted
    at the full median (never scaled down); one slow run among several does not lift it, a
    majority of slow runs does."""
    clock = FakeClock()
    policy = GapPolicy(GAPS, clock)
    _run(policy, clock, "backward", 100, 40 * MS)
    assert policy.predict("backward", 200) == pytest.approx(80 * MS)
    decision = policy.decide("backward", 200, waiting=0, running=0)
    assert not decision.run and decision.reason is GapReason.OVER_BOUND
    assert policy.decide("backward", 100, waiting=0, running=0).run
    _run(policy, clock, "backward", 100, 20 * MS)  # the median of two: halfway
    assert policy.predict("backward", 100) == pytest.approx(30 * MS)
    assert policy.predict("backward", 10) == pytest.approx(30 * MS)
    for seconds in (20, 20, 200):  # runs 40, 20, 20, 20, 200: one slow run
        _run(policy, clock, "backward", 100, seconds * MS)
    assert policy.predict("backward", 100) == pytest.approx(20 * MS)
    for _ in range(3):  # the last seven: 20, 20, 20, 200, 200, 200, 200
        _run(policy, clock, "backward", 100, 200 * MS)
    assert policy.decide("backward", 100, waiting=0, running=0).reason is GapReason.OVER_BOUND
    rows = GapPolicy(GAPS, clock)  # a loss chunk: a fixed cost, small rows cost as much
    _run(rows, clock, "loss", 8, 40 * MS)
    _run(rows, clock, "loss", 2, 36 * MS)
    assert rows.predict("loss", 8) == pytest.approx(40 * MS)
    assert rows.predict("loss", 2) == pytest.approx(38 * MS)
    assert rows.predict("loss", 16) == pytest.approx((80 + 288) / 2 * MS)  # each scaled up
    safe = GapPolicy(GapConfig(safety=1.5), clock)
    safe.observe("backward", 100, 20 * MS)
    assert safe.predict("backward", 100) == pytest.approx(30 * MS)


def test_beside_running_sequences_a_unit_must_fit_the_share_the_tail_and_the_budget() -> None:
    """Beside running sequences a unit runs only within the allowance: the credit decode
    steps earned (the share of their time, banked up to the yield bound, spent by units), the
    tail (a gap stays within the recent steps' quantile, or the average step stretched by the
    share); an inter-token target, when set, replaces both; unmeasured refuses; each unit
    beside sequences is recorded as a decode delay."""
    clock = FakeClock()
    config = replace(GAPS, itl_share=0.25, tail_quantile=0.9, itl_budget_s=0.0)
    policy = GapPolicy(config, clock)
    assert policy.decide("forward", 10, waiting=0, running=2).reason is GapReason.UNMEASURED
    _run(policy, clock, "forward", 10, 8 * MS)
    assert policy.decide("forward", 10, waiting=0, running=2).reason is GapReason.UNMEASURED
    policy.decode_step(64 * MS)  # credit 16; tail max(64, 1.25 x 64) = 80: 16 over the step
    decision = policy.decide("forward", 10, waiting=0, running=2)
    assert decision.run and decision.reason is GapReason.SLACK
    assert decision.allowance_s == 16 * MS
    policy.unit_started("forward", 10, running=2)
    clock.advance(12 * MS)  # ran longer than predicted: credit 4 left, the gap at 76
    policy.unit_finished()
    decision = policy.decide("forward", 10, waiting=0, running=2)  # predicted 10
    assert not decision.run and decision.reason is GapReason.NO_SLACK
    assert decision.allowance_s == 4 * MS
    for _ in range(3):
        policy.decode_step(64 * MS)  # credit 4 + 3 x 16 = 52; the gap starts again
    assert policy.allowance() == 16 * MS
    policy.decode_step(192 * MS)  # a long step: average 128, tail 192, credit capped at 64
    assert policy.allowance() == 64 * MS
    assert policy.decide("forward", 60, waiting=0, running=2).run  # predicted 60
    assert list(policy.decode_delays) == [12 * MS]
    capped = GapPolicy(replace(config, itl_budget_s=72 * MS), clock)
    _run(capped, clock, "forward", 10, 8 * MS)
    capped.decode_step(64 * MS)  # a target replaces share and tail: it leaves 8 of 72
    assert capped.allowance() == 8 * MS
    capped.decode_step(64 * MS)
    assert capped.allowance() == 8 * MS  # no credit is needed
    assert capped.decide("forward", 10, waiting=0, running=2).run
    assert not capped.decide("forward", 20, waiting=0, running=2).run


def test_an_idle_engine_trains_back_to_back_for_one_slice_then_looks_for_work() -> None:
    """Idle, an unmeasured unit runs (to be measured); units run until the next would pass
    the slice, then one refusal, then a fresh slice."""
    clock = FakeClock()
    policy = GapPolicy(GAPS, clock)
    runs = 0
    while (decision := policy.decide("loss", 4, waiting=0, running=0)).run:
        assert decision.reason is GapReason.IDLE
        _run(policy, clock, "loss", 4, 32 * MS)
        runs += 1
    assert runs == 8 and decision.reason is GapReason.SLICE_OVER  # 8 × 32 = the 256 slice
    assert policy.decide("loss", 4, waiting=0, running=0).run
    assert policy.training_seconds == 256 * MS


def test_requests_arriving_during_a_unit_record_the_wait_it_caused() -> None:
    """An arrival during a unit waits until it ends; one the engine learns of after the unit
    ended is dated back; an arrival outside any unit waited for nothing; p99 spans them."""
    clock = FakeClock()
    policy = GapPolicy(GAPS, clock)
    policy.unit_started("forward", 10, running=0)
    clock.advance(8 * MS)
    policy.request_arrived()
    clock.advance(24 * MS)
    assert policy.unit_finished() == 32 * MS
    assert list(policy.admission_waits) == [24 * MS]
    started = clock.now
    _run(policy, clock, "forward", 10, 16 * MS)
    policy.request_arrived(at=started + 12 * MS)
    policy.request_arrived(at=clock.now + 1)
    assert list(policy.admission_waits) == [24 * MS, 4 * MS]
    assert policy.wait_quantile(0.99) == 24 * MS
    assert policy.wait_quantile(0.5) == 4 * MS
    with pytest.raises(RuntimeError):
        policy.unit_finished()


# -- memory ------------------------------------------------------------------------------------


def test_memory_estimate_counts_adapter_optimizer_and_bounds_saved_activations(
    tiny_lm: LanguageModel,
) -> None:
    """Adapter, gradients and AdamW state are what a trained adapter really holds; one
    layer's estimated graph is at least what autograd saves (and within 3× of it); the
    activations grow with the micro-batch."""
    lora = LoraConfig(rank=4, dropout=0.2, target_modules=TARGET_MODULES)
    memory = TrainingMemory.estimate(tiny_lm, lora, micro_batch_size=2, max_seq_len=16)
    trainer = Trainer(
        tiny_lm,
        [TrainExample.prompt_completion([1, 2], [3, 4])],
        TrainingConfig(lora=lora, micro_batch_size=2),
    )
    trainer.train_step()
    assert memory.adapter_bytes == memory.gradient_bytes == trainer.adapter.nbytes()
    state = [t for s in trainer.optimizer.state.values() for t in s.values()]
    assert memory.optimizer_bytes == sum(t.numel() * t.element_size() for t in state)
    assert memory.checkpoint_bytes == 2 * 2 * 16 * 64 * 4
    doubled = TrainingMemory.estimate(tiny_lm, lora, micro_batch_size=4, max_seq_len=16)
    assert doubled.checkpoint_bytes == 2 * memory.checkpoint_bytes
    assert doubled.working_bytes > memory.working_bytes
    assert memory.total_bytes == (
        memory.adapter_bytes
        + memory.gradient_bytes
        + memory.optimizer_bytes
        + memory.activation_bytes
    )
    model, adapter = FrozenLlama(tiny_lm), _adapter(tiny_lm, lora)
    weights = {
        t.untyped_storage().data_ptr() for t in [*tiny_lm.weights.values(), *adapter.parameters()]
    }
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    rows, length = 3, 40
    cos, sin = model.rotary(length)
    x = torch.randn(rows, length, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layer(x, 0, cos, sin, adapter, 5)
    measured = (sum(saved.values()) - cos.nbytes - sin.nbytes) / (rows * length)
    estimated = layer_graph_bytes_per_token(tiny_lm, lora)
    assert measured <= estimated <= 3 * measured


def test_a_kind_over_the_bound_is_measured_again_once_its_measurement_is_stale() -> None:
    """One slow run lifts a kind over the bound; idle, it is refused until its measurement
    is ``remeasure_after_s`` old, then runs once (``remeasure``) and its averages restart
    from that run. Beside running sequences it is never remeasured."""
    clock = FakeClock()
    policy = GapPolicy(GAPS, clock)
    _run(policy, clock, "backward", 100, 96 * MS)
    assert policy.decide("backward", 100, waiting=0, running=0).reason is GapReason.OVER_BOUND
    clock.advance(GAPS.remeasure_after_s - 1 * MS)
    assert not policy.decide("backward", 100, waiting=0, running=0).run
    clock.advance(1 * MS)
    policy.decode_step(8 * MS)
    assert policy.decide("backward", 100, waiting=0, running=1).reason is GapReason.OVER_BOUND
    decision = policy.decide("backward", 100, waiting=0, running=0)
    assert decision.run and decision.reason is GapReason.REMEASURE
    _run(policy, clock, "backward", 100, 16 * MS)
    assert policy.predict("backward", 100) == 16 * MS  # restarted, not averaged with 96
    assert policy.decide("backward", 100, waiting=0, running=0).reason is GapReason.IDLE


def test_a_request_the_engine_had_not_seen_when_a_unit_started_waits_for_it() -> None:
    """An arrival after the engine last looked for work, even just before the unit started,
    waited for the unit; an arrival before that look did not. Every wait recorded is also
    told to the listener (the node's histogram), by kind."""
    clock = FakeClock()
    told: list[tuple[str, float]] = []
    policy = GapPolicy(GAPS, clock, on_wait=lambda kind, s: told.append((kind, s)))
    looked = clock.now
    clock.advance(2 * MS)
    policy.request_arrived(at=looked - 1 * MS)  # before the look: admitted without waiting
    policy.unit_started("forward", 10, running=0, seen=looked)
    policy.request_arrived(at=looked + 1 * MS)
    clock.advance(8 * MS)
    policy.unit_finished()
    assert list(policy.admission_waits) == [9 * MS]
    policy.decode_step(8 * MS)
    policy.unit_started("forward", 10, running=2)
    clock.advance(4 * MS)
    policy.unit_finished()
    assert told == [("admission", 9 * MS), ("decode", 4 * MS)]
