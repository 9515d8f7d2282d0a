"""A fine-tune on the batching engine's thread with the tiny Llama, no gRPC: slots a fine-tune
takes from a full engine never hold REALTIME back; a run whose events nobody takes waits
instead of piling them up; a checkpoint is copied in bounded units and is bit-exact."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from inference_node.engine import (
    BatchingConfig,
    BatchingEngine,
    EngineRequest,
    SamplingParams,
    TokenDelta,
)
from inference_node.engine.gap_training import (
    MAX_UNCONSUMED_EVENTS,
    STEPS_KEY,
    TRAINING_POLL_S,
    GapTrainer,
    SnapshotEvent,
    StepEvent,
    TrainingEvent,
    TrainingRun,
    remembered_steps,
)
from inference_node.models import LanguageModel
from inference_node.training import GapConfig, TrainerState
from inference_node.training.checkpoint import TENSORS_FILE
from sluice.contract import WorkloadClass
from tests.harness import eventually
from tests.test_node_train import finetune_spec, local_trainer

SLOTS = 8


async def collect(stream: AsyncIterator[TokenDelta]) -> list[int]:
    async with asyncio.timeout(120):
        return [i async for d in stream for i in d.token_ids]


def request(rid: str, n: int, workload_class: WorkloadClass) -> EngineRequest:
    prompt = tuple(range(5, 13))
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    return EngineRequest(rid, prompt, params, workload_class)


async def test_realtime_preempts_as_many_batch_sequences_as_a_fine_tune_took_slots(
    tiny_lm: LanguageModel,
) -> None:
    """A fine-tune taking 2 of 8 slots from an engine running 8 BATCH sequences leaves them
    over its limit of 6; a REALTIME request then preempts 3 of them at once and completes
    while every BATCH sequence still runs (it never waits for one to end naturally); the
    BATCH sequences all complete, every token once."""
    engine = BatchingEngine(
        tiny_lm, BatchingConfig(max_sequences=SLOTS, kv_budget_bytes=64 * 1024**2)
    )
    engine.start()
    run: TrainingRun | None = None
    try:
        slot_bytes = engine.stats().kv_budget_bytes // SLOTS
        length = min(engine.slot_tokens - 16, 600)
        batch = [
            asyncio.create_task(
                collect(engine.submit(request(f"b{i}", length, WorkloadClass.BATCH)))
            )
            for i in range(SLOTS)
        ]
        await eventually(lambda: engine.stats().running[WorkloadClass.BATCH] == SLOTS)
        await eventually(lambda: min(j.generated for j in engine._jobs.values()) > 0)
        events: list[TrainingEvent] = []
        trainer = local_trainer(tiny_lm, finetune_spec(tiny_lm, "preempt", 1000))
        run = TrainingRun(
            trainer,
            model=tiny_lm.name,
            checkpoint_every=1000,
            memory_bytes=2 * slot_bytes,
            deliver=events.append,
        )
        engine.start_training(run, GapConfig())
        assert engine.training.reserved_slots == 2

        realtime = await collect(engine.submit(request("rt", 4, WorkloadClass.REALTIME)))
        assert len(realtime) == 4
        assert not any(task.done() for task in batch)
        outputs = await asyncio.gather(*batch)
    finally:
        if run is not None:
            run.request_stop("cancelled")
            engine.wake()
        engine.close()
    assert [len(tokens) for tokens in outputs] == [length] * SLOTS


def _turn(gap: GapTrainer) -> bool:
    return gap.run_unit(waiting=0, running=0, memory_free=True, seen=time.perf_counter())


def _idle_gap(run: TrainingRun, model: str) -> GapTrainer:
    gap = GapTrainer(model)
    gap.offer(run, GapConfig(yield_bound_s=60.0, idle_slice_s=60.0), None)
    return gap


def test_a_run_whose_events_are_not_taken_waits_then_goes_on(tiny_lm: LanguageModel) -> None:
    """Its units are deferred (the engine polls) once MAX_UNCONSUMED_EVENTS events wait to be
    taken, or when a checkpoint is due while one snapshot waits; taking them lets it go on."""
    events: list[TrainingEvent] = []
    trainer = local_trainer(tiny_lm, finetune_spec(tiny_lm, "backlog", 100))
    run = TrainingRun(
        trainer, model=tiny_lm.name, checkpoint_every=1, memory_bytes=0, deliver=events.append
    )
    gap = _idle_gap(run, tiny_lm.name)
    for _ in range(10_000):
        if not _turn(gap) and run.backlogged:
            break
    # step 1, its snapshot, step 2; step 2's snapshot waits for the first to be taken
    assert [type(e) for e in events] == [StepEvent, SnapshotEvent, StepEvent]
    assert not _turn(gap) and len(events) == 3 and gap.idle_wait() == TRAINING_POLL_S
    run.taken(events[0])
    run.taken(events[1])
    for _ in range(10_000):
        if not _turn(gap) and run.backlogged:
            break
    assert [type(e) for e in events[3:]] == [SnapshotEvent, StepEvent]
    assert isinstance(events[3], SnapshotEvent) and events[3].step == 2

    steps_only: list[TrainingEvent] = []
    run = TrainingRun(
        local_trainer(tiny_lm, finetune_spec(tiny_lm, "backlog", 100)),
        model=tiny_lm.name,
        checkpoint_every=1000,
        memory_bytes=0,
        deliver=steps_only.append,
    )
    gap = _idle_gap(run, tiny_lm.name)
    for _ in range(100_000):
        if not _turn(gap) and run.backlogged:
            break
    assert len(steps_only) == MAX_UNCONSUMED_EVENTS
    assert not _turn(gap) and len(steps_only) == MAX_UNCONSUMED_EVENTS
    run.taken(steps_only[0])
    while len(steps_only) == MAX_UNCONSUMED_EVENTS:
        assert _turn(gap) or not run.backlogged
    assert run.backlogged and len(steps_only) == MAX_UNCONSUMED_EVENTS + 1


@pytest.mark.parametrize("chunk_bytes", [4096, 1])
def test_a_checkpoint_is_copied_in_bounded_units_and_is_bit_exact(
    tiny_lm: LanguageModel, chunk_bytes: int
) -> None:
    """After a step the checkpoint is taken as several ``checkpoint`` units, each copying at
    most ``chunk_bytes`` (a larger tensor alone) and together every tensor once; the next
    step waits for the last. The snapshot's tensors are byte for byte those of
    ``Trainer.state()`` taken right after that step by a trainer of the same job, though
    the run's own trainer has moved on since; its scalars are the same plus the step it
    remembers."""
    spec = finetune_spec(tiny_lm, "chunks", 5)
    reference = local_trainer(tiny_lm, spec)
    reference.train_step()
    expected = reference.state()
    sizes = sorted(t.numel() * t.element_size() for t in expected.tensors.values())
    events: list[TrainingEvent] = []
    run = TrainingRun(
        local_trainer(tiny_lm, spec),
        model=tiny_lm.name,
        checkpoint_every=1,
        memory_bytes=0,
        deliver=events.append,
        checkpoint_chunk_bytes=chunk_bytes,
    )
    units: list[tuple[str, int]] = []
    while not any(isinstance(e, SnapshotEvent) for e in events):
        work = run.next_work()
        assert work is not None
        units.append(work)
        run.run_next()
    for _ in range(3):  # well into step 2
        run.run_next()
    assert run.trainer.step == 1 and not run.trainer.between_steps
    copies = [work for kind, work in units if kind == "checkpoint"]
    assert units[-len(copies) :] == [("checkpoint", w) for w in copies]
    assert len(copies) > 1 and sum(copies) == sum(sizes)
    assert max(copies) <= max(chunk_bytes, sizes[-1])
    if chunk_bytes == 1:
        assert len(copies) == len(sizes)
    (snapshot,) = [e for e in events if isinstance(e, SnapshotEvent)]
    (step,) = [e for e in events if isinstance(e, StepEvent)]
    assert snapshot.step == 1
    files, want = snapshot.state.to_files(), expected.to_files()
    assert files[TENSORS_FILE] == want[TENSORS_FILE]
    scalars = TrainerState.from_files(files).scalars
    report = step.report
    assert remembered_steps(scalars) == [
        (1, report.loss, report.learning_rate, report.sequence_tokens, step.at_unix_ms)
    ]
    del scalars[STEPS_KEY]
    assert scalars == TrainerState.from_files(want).scalars
