"""A fine-tune on a thread of its own beside the batching engine (``GapConfig.concurrent``,
:mod:`inference_node.engine.concurrent_training`), with the tiny Llama on the CPU (the CUDA
streams it uses there are measured by ``bench.finetune.streams``): it trains to the same
adapter as the engine-thread path while generations run and stay unchanged, paces itself to
its duty while inference runs, and stops on request or when the engine closes."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from inference_node.engine import BatchingConfig, BatchingEngine, EngineClosedError
from inference_node.engine.concurrent_training import ConcurrentTraining
from inference_node.engine.gap_training import (
    EndEvent,
    SnapshotEvent,
    StepEvent,
    TrainingEvent,
    TrainingRun,
    TrainingStoppedError,
)
from inference_node.models import LanguageModel
from inference_node.training import GapConfig
from sluice.contract import WorkloadClass
from tests.harness import eventually
from tests.test_finetune_engine import collect, request
from tests.test_node_train import finetune_spec, local_trainer

CONCURRENT = GapConfig(concurrent=True, duty=0.5)


def new_run(lm: LanguageModel, name: str, steps: int, events: list[TrainingEvent]) -> TrainingRun:
    return TrainingRun(
        local_trainer(lm, finetune_spec(lm, name, steps)),
        model=lm.name,
        checkpoint_every=steps,
        memory_bytes=0,
        deliver=events.append,
    )


async def test_a_run_on_its_own_thread_trains_what_the_engine_thread_would_beside_generations(
    tiny_lm: LanguageModel,
) -> None:
    """Three steps on the training thread, while REALTIME and BATCH generations run, give
    every step's event, the final snapshot and a clean end; the adapter is the one the same
    job trains alone; the generations get the tokens they get on an idle engine; the engine
    thread ran no unit (its gap policy recorded nothing)."""
    engine = BatchingEngine(tiny_lm, BatchingConfig(max_sequences=8, kv_budget_bytes=64 * 1024**2))
    engine.start()
    try:
        prompts = [request(f"r{i}", 24, cls) for i, cls in enumerate(WorkloadClass)]
        alone = [await collect(engine.submit(r)) for r in prompts]
        events: list[TrainingEvent] = []
        run = new_run(tiny_lm, "thread", 3, events)
        engine.start_training(run, CONCURRENT)
        beside = await asyncio.gather(*(collect(engine.submit(r)) for r in prompts))
        assert list(beside) == alone
        await eventually(lambda: bool(events) and isinstance(events[-1], EndEvent), timeout=120)
        assert engine.training.run is None and engine.training.reserved_slots == 0
    finally:
        engine.close()
    steps = [e.report.step for e in events if isinstance(e, StepEvent)]
    (snapshot,) = [e for e in events if isinstance(e, SnapshotEvent)]
    end = events[-1]
    assert steps == [1, 2, 3] and snapshot.step == 3
    assert isinstance(end, EndEvent) and end.error is None
    reference = local_trainer(tiny_lm, finetune_spec(tiny_lm, "thread", 3))
    for _ in range(3):
        reference.train_step()
    want = reference.state().tensors
    assert snapshot.state.tensors.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(snapshot.state.tensors[name], tensor, rtol=0, atol=0)
    policy = engine.training.policy
    assert policy is not None and policy.training_seconds == 0.0
    assert run.busy_s > 0 and run.waiting_s > 0, "it trained, and spent time not training"


async def test_a_run_on_its_own_thread_stops_on_request_and_when_the_engine_closes(
    tiny_lm: LanguageModel,
) -> None:
    engine = BatchingEngine(tiny_lm, BatchingConfig(max_sequences=8, kv_budget_bytes=64 * 1024**2))
    engine.start()
    try:
        events: list[TrainingEvent] = []
        run = new_run(tiny_lm, "stopped", 100_000, events)
        engine.start_training(run, CONCURRENT)
        await eventually(lambda: any(isinstance(e, StepEvent) for e in events), timeout=120)
        run.request_stop("cancelled")
        engine.wake()
        await eventually(lambda: isinstance(events[-1], EndEvent), timeout=60)
        end = events[-1]
        assert isinstance(end, EndEvent) and isinstance(end.error, TrainingStoppedError)
        assert end.error.reason == "cancelled"

        closed: list[TrainingEvent] = []
        engine.start_training(new_run(tiny_lm, "closed", 100_000, closed), CONCURRENT)
        await eventually(lambda: any(isinstance(e, StepEvent) for e in closed), timeout=120)
    finally:
        engine.close()
    await eventually(lambda: bool(closed) and isinstance(closed[-1], EndEvent), timeout=60)
    last = closed[-1]
    assert isinstance(last, EndEvent) and isinstance(last.error, EngineClosedError)
    assert sum(isinstance(e, EndEvent) for e in closed) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("training-")]


class _Paces(ConcurrentTraining):
    """Records the pauses it would take instead of sleeping."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pauses: list[float] = []

    def _pause(self, seconds: float) -> None:
        self.pauses.append(seconds)


def _paced(lm: LanguageModel, running: int, duty: float) -> tuple[list[float], list[float]]:
    """The units' seconds and the pauses a 2-step run takes with ``running`` sequences."""
    events: list[TrainingEvent] = []
    units: list[float] = []
    ended: list[BaseException | None] = []
    thread = _Paces(
        new_run(lm, "duty", 2, events),
        stream=None,
        device=torch.device("cpu"),
        duty=duty,
        on_unit=lambda _kind, s: units.append(s),
        end=lambda _run, error: ended.append(error),
        poll_s=0.01,
    )
    thread.engine_state(waiting=0, running=running, memory_free=True)
    thread.start()
    thread.join(120)
    assert ended == [None] and len(units) > 2
    return units, thread.pauses


def test_while_inference_runs_the_thread_is_busy_at_most_its_duty(
    tiny_lm: LanguageModel,
) -> None:
    """With sequences running, each unit of ``s`` seconds is followed by a pause of
    ``s * (1 - duty) / duty`` (none after the last); with the engine idle, none at all."""
    units, pauses = _paced(tiny_lm, running=1, duty=0.25)
    assert pauses == pytest.approx([s * 3 for s in units[:-1]])
    assert _paced(tiny_lm, running=0, duty=0.25)[1] == []
