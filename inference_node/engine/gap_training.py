"""A fine-tune on a batching engine's thread, one unit at a time, in the gaps inference leaves.

A :class:`TrainingRun` is one fine-tune handed to an engine: its
:class:`~inference_node.training.Trainer`, how often it checkpoints, the memory it holds and
where its events go (:class:`StepEvent` after each optimizer step, :class:`SnapshotEvent`
with a checkpoint's state, :class:`EndEvent` last). Its units are the trainer's (a decoder
layer's forward or backward, a loss chunk, the optimizer update) plus ``checkpoint`` units
after every ``checkpoint_every`` steps and after the last: each copies the next
``checkpoint_chunk_bytes`` of the trainer's tensors to the CPU (the next step would change
them), so a checkpoint of any size is bounded units the gap policy can fit between decode
steps; the step waits until the last chunk is copied. Serializing the copies (safetensors and
JSON) and writing them to the fleet's store happen off the engine thread
(:mod:`inference_node.train_service`).

A checkpoint also remembers the run's last ``REPLAYED_STEPS`` steps (step, loss, rate, tokens,
time) in its scalars (``steps``): a run resumed from it starts with them
(:func:`remembered_steps`), so its listener can send them again (steps the node trained and
checkpointed but the scheduler never recorded, its call cut meanwhile, are not lost).

Events wait in the listener's queue; a run with ``MAX_UNCONSUMED_EVENTS`` of them not taken
(:meth:`TrainingRun.taken`), or about to snapshot while a snapshot is not taken, defers its
units (``events``): a listener that stopped reading holds the training, not the memory.

:class:`GapTrainer` is the engine's side. The engine loop calls :meth:`GapTrainer.run_unit`
after each of its steps and whenever it would otherwise sleep; each call asks the
:class:`~inference_node.training.GapPolicy` whether the run's next unit may run now (nothing
waiting to be admitted, predicted within the yield bound, within the running sequences'
inter-token slack or idle) and runs it if so. The engine tells it of every request's arrival
(:meth:`GapTrainer.request_arrived`, dated at submit) and every decode step's time, so the
policy records the waits training caused and keeps its slack right. A run also holds part of
the KV budget (whole slots, :attr:`TrainingRun.reserved_slots`): its units wait until the
engine's sequences fit in the rest (deferred for ``memory``). With ``GapConfig.concurrent``
the run goes to a thread of its own instead (:mod:`inference_node.engine.concurrent_training`):
the engine thread then only tells it what runs there.

Thread safety: :meth:`GapTrainer.offer` and :meth:`TrainingRun.request_stop` are called from
the event loop, everything else from the engine thread (and, for a run on its own thread,
``_end`` and ``_count_unit`` from that thread); they share the current run and its thread
(read and replaced together under a lock) and the run's stop flag.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import torch

from inference_node.engine.concurrent_training import ConcurrentTraining, training_stream
from inference_node.training import (
    GapConfig,
    GapPolicy,
    GapReason,
    StepReport,
    Trainer,
    TrainerState,
)

if TYPE_CHECKING:  # the metrics module imports the engine package
    from inference_node.metrics import TrainingMetrics

log = structlog.get_logger(__name__)

TRAINING_POLL_S = 0.05
"""How often an engine with nothing else to do looks again at a fine-tune whose next unit
was held back (over the bound, waiting for memory or for its events to be taken)."""
CHECKPOINT_UNIT = "checkpoint"
MEMORY = "memory"
EVENTS = "events"
"""A unit deferred because the run's listener has not taken its events."""
CHECKPOINT_CHUNK_BYTES = 4 * 1024**2
"""Tensor bytes one ``checkpoint`` unit copies at most (a tensor larger than that alone is
one unit: a LoRA factor or its moments are far smaller)."""
REPLAYED_STEPS = 4096
"""Steps a checkpoint remembers for a resumed run to send again (see the module doc)."""
STEPS_KEY = "steps"
CLOSE_JOIN_S = 10.0
"""Longest a closing engine waits for a fine-tune's own thread to finish its unit."""
MAX_UNCONSUMED_EVENTS = 16
"""Events a run's listener may leave untaken before its units wait (see the module doc)."""


class TrainingBusyError(Exception):
    """The engine already runs a fine-tune (one at a time)."""


class TrainingMemoryError(Exception):
    """A fine-tune's memory can never fit the engine's budget beside one sequence."""


class TrainingStoppedError(Exception):
    """A fine-tune stopped before its end: ``reason`` is ``cancelled``, ``draining`` or
    ``engine_closed``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"training stopped: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class StepEvent:
    """An optimizer step ended."""

    report: StepReport
    at_unix_ms: int
    """Wall-clock time it ended."""


@dataclass(frozen=True)
class SnapshotEvent:
    """The trainer's state after ``step`` (CPU copies), to be made durable as a checkpoint's
    files (:meth:`TrainerState.to_files`, off the engine thread)."""

    step: int
    state: TrainerState


@dataclass(frozen=True)
class EndEvent:
    """The run left the engine: ``error`` is ``None`` when every step ran (the last
    snapshot was sent before), else why it stopped."""

    error: BaseException | None


TrainingEvent = StepEvent | SnapshotEvent | EndEvent
StepRecord = tuple[int, float, float, int, int]
"""A remembered step: step, loss, learning rate, tokens (prompts included), Unix ms."""


def remembered_steps(scalars: Mapping[str, Any]) -> list[StepRecord]:
    """The steps a checkpoint's scalars remember (none in one written before they were kept;
    malformed entries skipped)."""
    entries = scalars.get(STEPS_KEY)
    out: list[StepRecord] = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            step, loss, rate, tokens, at = entry
            out.append((int(step), float(loss), float(rate), int(tokens), int(at)))
        except (TypeError, ValueError):
            continue
    return out


class _Snapshot:
    """A checkpoint being copied off a trainer between two steps, one chunk per unit."""

    def __init__(self, step: int, live: TrainerState, chunk_bytes: int) -> None:
        self.step = step
        self.scalars = live.scalars
        self.live = live.tensors
        self.copied: dict[str, torch.Tensor] = {}
        self.chunks: deque[list[str]] = deque()
        size = 0
        for name, tensor in live.tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if not self.chunks or size + nbytes > chunk_bytes:
                self.chunks.append([])
                size = 0
            self.chunks[-1].append(name)
            size += nbytes

    def next_bytes(self) -> int:
        """Bytes the next chunk copies (at least 1)."""
        names = self.chunks[0] if self.chunks else []
        return max(1, sum(self.live[n].numel() * self.live[n].element_size() for n in names))

    def copy_next(self) -> TrainerState | None:
        """Copy the next chunk; the whole state once the last one is copied."""
        if self.chunks:
            for name in self.chunks.popleft():
                self.copied[name] = self.live[name].detach().to("cpu", copy=True)
        if self.chunks:
            return None
        return TrainerState(tensors=self.copied, scalars=self.scalars)


class TrainingRun:
    """One fine-tune for an engine thread to step (see the module doc)."""

    def __init__(
        self,
        trainer: Trainer,
        *,
        model: str,
        checkpoint_every: int,
        memory_bytes: int,
        deliver: Callable[[TrainingEvent], None],
        metrics: TrainingMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
        checkpoint_chunk_bytes: int = CHECKPOINT_CHUNK_BYTES,
        history: Iterable[StepRecord] = (),
    ) -> None:
        if checkpoint_every < 1 or checkpoint_chunk_bytes < 1:
            raise ValueError("checkpoint_every and checkpoint_chunk_bytes must be >= 1")
        self.trainer = trainer
        self.model = model
        self.checkpoint_every = checkpoint_every
        self.memory_bytes = memory_bytes
        """Bytes the fine-tune holds (the :class:`~inference_node.training.TrainingMemory`
        estimate)."""
        self.reserved_slots = 0
        """KV slots its memory takes from the engine, set when the engine accepts it."""
        self.stop_reason: str | None = None
        self.busy_s = 0.0
        """Seconds spent in its units."""
        self.started: float | None = None
        self._deliver = deliver
        self._metrics = metrics
        self._clock = clock
        self._chunk_bytes = checkpoint_chunk_bytes
        self._snapshot_due = False
        self._snapshot: _Snapshot | None = None
        self._lock = threading.Lock()
        self._unconsumed = 0
        self._unconsumed_snapshots = 0
        self.history: deque[StepRecord] = deque(history, maxlen=REPLAYED_STEPS)
        """The last steps run (those of its checkpoint first), for the next checkpoint."""

    def stopped(self) -> TrainingStoppedError:
        """The error it ends with after :meth:`request_stop`."""
        return TrainingStoppedError(self.stop_reason or "cancelled")

    def request_stop(self, reason: str) -> None:
        """Stop after the unit running now (any thread); the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def taken(self, event: TrainingEvent) -> None:
        """The listener took ``event`` off its queue (any thread)."""
        if isinstance(event, EndEvent):
            return
        with self._lock:
            self._unconsumed -= 1
            self._unconsumed_snapshots -= isinstance(event, SnapshotEvent)

    @property
    def backlogged(self) -> bool:
        """Whether its units wait for the listener to take events (module doc)."""
        with self._lock:
            return self._unconsumed >= MAX_UNCONSUMED_EVENTS or (
                self._snapshot_due and self._unconsumed_snapshots > 0
            )

    @property
    def waiting_s(self) -> float:
        """Seconds since the engine took it that it spent not running (waiting for gaps)."""
        if self.started is None:
            return 0.0
        return max(0.0, self._clock() - self.started - self.busy_s)

    def next_work(self) -> tuple[str, int] | None:
        """Kind and work of the next unit (a checkpoint chunk's: its bytes), ``None`` when
        nothing is left."""
        if self._snapshot_due:
            return CHECKPOINT_UNIT, self._taking_snapshot().next_bytes()
        unit = self.trainer.next_unit
        return None if unit is None else (unit.kind.value, unit.work)

    def _taking_snapshot(self) -> _Snapshot:
        if self._snapshot is None:
            live = self.trainer.state(copy=False)
            scalars = {**live.scalars, STEPS_KEY: [list(h) for h in self.history]}
            state = TrainerState(tensors=live.tensors, scalars=scalars)
            self._snapshot = _Snapshot(self.trainer.step, state, self._chunk_bytes)
        return self._snapshot

    def _send(self, event: StepEvent | SnapshotEvent) -> None:
        with self._lock:
            self._unconsumed += 1
            self._unconsumed_snapshots += isinstance(event, SnapshotEvent)
        self._deliver(event)

    def run_next(self) -> bool:
        """Run the next unit, delivering what it produced; ``True`` once nothing is left."""
        trainer = self.trainer
        if self._snapshot_due:
            snapshot = self._taking_snapshot()
            state = snapshot.copy_next()
            if state is not None:
                self._snapshot_due, self._snapshot = False, None
                self._send(SnapshotEvent(snapshot.step, state))
        else:
            report = trainer.run_next()
            if report is not None:
                if self._metrics is not None:
                    self._metrics.steps.labels(self.model).inc()
                    self._metrics.tokens.labels(self.model).inc(report.sequence_tokens)
                at = int(time.time() * 1000)
                record = (report.step, report.loss, report.learning_rate, report.sequence_tokens)
                self.history.append((*record, at))
                self._send(StepEvent(report, at))
                self._snapshot_due = report.step % self.checkpoint_every == 0 or trainer.done
        return trainer.done and not self._snapshot_due

    def end(self, error: BaseException | None) -> None:
        """Deliver the last event."""
        self._deliver(EndEvent(error))


class GapTrainer:
    """Runs one :class:`TrainingRun` at a time on an engine thread, in the gaps its
    :class:`GapPolicy` allows (module doc)."""

    def __init__(self, model: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        self._clock = clock
        self._lock = threading.Lock()
        self._run: TrainingRun | None = None
        self._policy: GapPolicy | None = None
        self._ready = True
        self._metrics: TrainingMetrics | None = None
        self._thread: ConcurrentTraining | None = None
        self._stream: torch.cuda.Stream | None = None
        """The training thread's CUDA stream, made once (the allocator caches per stream)."""

    # -- any thread ---------------------------------------------------------------------------

    @property
    def run(self) -> TrainingRun | None:
        """The fine-tune on the engine now (stopping ones included until they leave)."""
        return self._run

    @property
    def reserved_slots(self) -> int:
        """KV slots the current fine-tune holds."""
        run = self._run
        return run.reserved_slots if run is not None else 0

    @property
    def policy(self) -> GapPolicy | None:
        """The gap policy (created by the first fine-tune; its measurements outlive runs)."""
        return self._policy

    def offer(self, run: TrainingRun, gaps: GapConfig, metrics: TrainingMetrics | None) -> None:
        """Make ``run`` the engine's fine-tune; :class:`TrainingBusyError` if one is there."""
        with self._lock:
            if self._run is not None:
                raise TrainingBusyError("a fine-tune already runs on this engine")
            if self._policy is None or self._policy.config != gaps:
                self._policy = GapPolicy(gaps, self._clock, on_wait=self._record_wait)
            self._metrics = metrics
            self._ready = True
            thread = None
            if gaps.concurrent:
                device = run.trainer.device
                if self._stream is None:
                    self._stream = training_stream(device)
                thread = ConcurrentTraining(
                    run,
                    stream=self._stream,
                    device=device,
                    duty=gaps.duty,
                    on_unit=lambda kind, seconds: self._count_unit(run, kind, seconds),
                    end=self._end,
                    poll_s=TRAINING_POLL_S,
                    clock=self._clock,
                )
            self._run, self._thread = run, thread
        if thread is not None:
            thread.start()

    # -- engine thread ------------------------------------------------------------------------

    def idle_wait(self) -> float | None:
        """How long an engine with no inference work may sleep: ``None`` (until work comes)
        without a fine-tune, 0 when its next unit may run now, else :data:`TRAINING_POLL_S`."""
        if self._run is None or self._thread is not None:
            return None
        return 0.0 if self._ready else TRAINING_POLL_S

    def request_arrived(self, at: float) -> None:
        """A request submitted at ``at`` reached the engine thread."""
        if self._policy is not None:
            self._policy.request_arrived(at)

    def decode_step(self, seconds: float) -> None:
        """The running sequences' decode step took ``seconds``."""
        if self._policy is not None:
            self._policy.decode_step(seconds)

    def run_unit(self, *, waiting: int, running: int, memory_free: bool, seen: float) -> bool:
        """Run the fine-tune's next unit if the policy allows it now, with ``waiting``
        requests not admitted, ``running`` sequences admitted and ``memory_free`` whether
        they leave the run's reserved slots free; ``seen`` is when the engine last found
        no new request. ``True`` when a unit ran and another may follow."""
        with self._lock:  # a run and its thread are replaced together
            run, policy, thread = self._run, self._policy, self._thread
        if thread is not None:  # it trains on its own thread: tell it what runs here
            thread.engine_state(waiting=waiting, running=running, memory_free=memory_free)
            if run is not None and run.stop_reason is not None:
                thread.wake()
            return False
        if run is None or policy is None:
            return False
        if run.started is None:
            run.started = self._clock()
            if run.trainer.device.type == "cuda":  # built on other threads' streams
                torch.cuda.synchronize(run.trainer.device)
        if run.stop_reason is not None:
            self._end(run, run.stopped())
            return False
        try:
            work = run.next_work()
        except Exception as exc:  # building the next micro-batch failed
            self._fail(run, exc)
            return False
        if work is None:
            self._end(run, None)
            return False
        kind, size = work
        if not memory_free:
            return self._defer(MEMORY)
        if run.backlogged:
            return self._defer(EVENTS)
        decision = policy.decide(kind, size, waiting=waiting, running=running)
        if not decision.run:
            return self._defer(decision.reason)
        return self._run_one(run, policy, kind, size, running=running, seen=seen)

    def _run_one(
        self,
        run: TrainingRun,
        policy: GapPolicy,
        kind: str,
        size: int,
        *,
        running: int,
        seen: float,
    ) -> bool:
        policy.unit_started(kind, size, running=running, seen=seen)
        try:
            finished = run.run_next()
        except Exception as exc:
            run.busy_s += policy.unit_finished()
            self._fail(run, exc)
            return False
        self._count_unit(run, kind, policy.unit_finished())
        self._ready = True
        if finished:
            self._end(run, None)
            return False
        return True

    def close(self, error: BaseException) -> None:
        """The engine stops: end the fine-tune on it with ``error`` (one on its own thread
        stops after its unit in flight)."""
        with self._lock:
            run, thread = self._run, self._thread
        if thread is not None:
            thread.stop(error)
            thread.join(CLOSE_JOIN_S)
        if run is not None:
            self._end(run, error)

    # -- internals ----------------------------------------------------------------------------

    def _defer(self, reason: str) -> bool:
        # A refusal that idleness cannot lift (over the bound until remeasured, memory held
        # by sequences, events not taken) makes an idle engine poll instead of spinning; after
        # any other the next idle turn tries again at once (a slice's end is only a turn to
        # look for work).
        self._ready = reason not in (GapReason.OVER_BOUND, MEMORY, EVENTS)
        if self._metrics is not None:
            self._metrics.deferred.labels(self.model, str(reason)).inc()
        return False

    def _fail(self, run: TrainingRun, exc: Exception) -> None:
        log.exception("training_unit_failed", model=self.model, step=run.trainer.step)
        self._end(run, exc)

    def _count_unit(self, run: TrainingRun, kind: str, seconds: float) -> None:
        run.busy_s += seconds
        if self._metrics is not None:
            self._metrics.units.labels(self.model, kind).inc()

    def _end(self, run: TrainingRun, error: BaseException | None) -> None:
        with self._lock:
            if self._run is not run:
                return  # ended already (the engine closed as its thread stopped)
            self._run = None
            if self._thread is not None and self._thread.run is run:
                self._thread = None
        run.end(error)

    def _record_wait(self, wait: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.yield_wait.labels(self.model, wait).observe(seconds)
