"""``Node.Train``: one fine-tune at a time on this node's engine thread, in the gaps inference
leaves, streamed back as events.

A call is checked (draining: UNAVAILABLE ``NODE_DRAINING``; a node outside the finetune pool,
a base model not loaded here or on an engine that cannot interleave training:
FAILED_PRECONDITION; the spec and examples: INVALID_ARGUMENT with every field at fault;
another fine-tune running here: RESOURCE_EXHAUSTED ``TRAINING_BUSY`` + RetryInfo; memory that
never fits beside one inference sequence: FAILED_PRECONDITION ``TRAINING_MEMORY_EXCEEDED``),
then resumed from the job's newest checkpoint in the fleet's store when it has one (one of
another model, dataset or configuration: FAILED_PRECONDITION ``CHECKPOINT_MISMATCH``; the
store unreadable: UNAVAILABLE), then handed to the engine as a
:class:`~inference_node.engine.gap_training.TrainingRun`.

The stream: a ``progress`` first (where it starts), then, resumed, a ``step`` for each step
its checkpoint remembers (the scheduler keeps a step once: these fill in those it missed
before the job moved), then per optimizer step a ``step`` and a ``progress``, a
``progress`` at least every second between steps, a ``checkpoint_step`` once each
checkpoint is durable in the store (every ``checkpoint_every_steps`` and after the last
step), and last the ``adapter`` written to the adapter store (atomically; the same name
holding other weights: ALREADY_EXISTS ``ADAPTER_EXISTS``). While the call waits on the
stores or on encoding the examples (preparing, saving a checkpoint, writing the adapter) a
``progress`` still comes every second, so a slow filesystem never looks like a stalled node;
before the trainer exists it is a heartbeat with ``node_id`` alone (``total_steps`` 0).
Cancelling the call stops the training after the unit running now: no adapter, the
checkpoints stay. A drain stops it the same way and ends the call UNAVAILABLE
``NODE_DRAINING``, so the scheduler moves the job. The training itself waits (its units are
deferred) while the call has not sent on what the engine produced, so a stream the
scheduler stopped reading never piles checkpoints up in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc
import structlog

from inference_node.adapters import AdapterRef, AdapterStore
from inference_node.engine import BatchingEngine, Engine, EngineClosedError
from inference_node.engine.gap_training import (
    EndEvent,
    SnapshotEvent,
    StepEvent,
    StepRecord,
    TrainingBusyError,
    TrainingEvent,
    TrainingMemoryError,
    TrainingRun,
    TrainingStoppedError,
    remembered_steps,
)
from inference_node.errors import (
    ADAPTER_EXISTS,
    ADAPTER_STORE_UNAVAILABLE,
    CHECKPOINT_MISMATCH,
    CHECKPOINT_STORE_UNAVAILABLE,
    MODEL_NOT_TRAINABLE,
    NOT_FINETUNE_NODE,
    TRAINING_BUSY,
    TRAINING_MEMORY_EXCEEDED,
    AlreadyExists,
    FailedPrecondition,
)
from inference_node.lora import LoraAdapter
from inference_node.lora.weights import WEIGHTS_FILE
from inference_node.metrics import TrainingMetrics
from inference_node.model_types import LanguageModel
from inference_node.train_request import TrainPlan, encode_examples, plan_training
from inference_node.training import (
    CheckpointError,
    CheckpointStore,
    ExampleError,
    GapConfig,
    StepReport,
    Trainer,
    TrainerState,
    TrainingMemory,
)
from sluice.runtime.errors import Internal, InvalidArgument, ResourceExhausted, Unavailable
from sluice.v1 import jobs_pb2, node_pb2

log = structlog.get_logger(__name__)

FINETUNE_POOL = "finetune"
TRAIN_BUSY_RETRY_S = 5.0
"""RetryInfo of a Train refused because another fine-tune runs here."""
PROGRESS_INTERVAL_S = 1.0
RATE_WINDOW_STEPS = 10
"""Steps the tokens-per-second rate and the ETA are measured over."""


class _Progress:
    """What the job's ``TrainingProgress`` says, updated as events come."""

    def __init__(self, trainer: Trainer, checkpoint_step: int, node_id: str) -> None:
        self.step, self.total = trainer.step, trainer.total_steps
        self.loss = self.learning_rate = 0.0
        self.checkpoint_step = checkpoint_step
        self.node_id = node_id
        self._tokens = 0
        self._window: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW_STEPS + 1)
        self._window.append((time.monotonic(), 0))

    def stepped(self, report: StepReport) -> None:
        self.step, self.loss, self.learning_rate = report.step, report.loss, report.learning_rate
        self._tokens += report.sequence_tokens
        self._window.append((time.monotonic(), self._tokens))

    def event(self, waiting_s: float) -> node_pb2.NodeTrainEvent:
        (first, tokens_then), (last, tokens_now) = self._window[0], self._window[-1]
        steps, elapsed = len(self._window) - 1, last - first
        eta_ms = 0
        if steps and elapsed > 0:
            eta_ms = int((time.time() + (self.total - self.step) * elapsed / steps) * 1000)
        return node_pb2.NodeTrainEvent(
            progress=jobs_pb2.TrainingProgress(
                step=self.step,
                total_steps=self.total,
                loss=self.loss,
                learning_rate=self.learning_rate,
                tokens_per_second=(tokens_now - tokens_then) / elapsed if elapsed > 0 else 0.0,
                waiting_seconds=waiting_s,
                eta_unix_ms=eta_ms,
                node_id=self.node_id,
                checkpoint_step=self.checkpoint_step,
            )
        )


class TrainService:
    """``Node.Train`` for one node (see the module doc)."""

    def __init__(
        self,
        node_id: str,
        generators: dict[str, tuple[LanguageModel, Engine]],
        *,
        pools: Collection[str],
        checkpoints: CheckpointStore,
        adapters: AdapterStore,
        gaps: GapConfig,
        metrics: TrainingMetrics,
        is_draining: Callable[[], bool],
    ) -> None:
        self._node_id = node_id
        self._generators = generators
        self._trains = FINETUNE_POOL in pools
        self.checkpoints = checkpoints
        """The fleet's checkpoint store."""
        self._adapters = adapters
        self._gaps = gaps
        self.metrics = metrics
        """The node's training metrics."""
        self._is_draining = is_draining
        self._claimed = False
        self._run: tuple[TrainingRun, BatchingEngine] | None = None

    @property
    def active(self) -> bool:
        """Whether a fine-tune is being prepared or runs here."""
        return self._claimed

    @property
    def reserved_sequences(self) -> int:
        """Sequence slots the fine-tune running here holds (0 when none runs)."""
        if self._run is None:
            return 0
        return self._run[1].training.reserved_slots

    def stop(self, reason: str) -> None:
        """Stop the fine-tune running here after its current unit (a drain)."""
        if self._run is not None:
            run, engine = self._run
            run.request_stop(reason)
            engine.wake()

    def _check_node(
        self, request: node_pb2.NodeTrainRequest
    ) -> tuple[LanguageModel, BatchingEngine]:
        if self._is_draining():
            raise Unavailable(f"node {self._node_id} is draining", reason="NODE_DRAINING")
        if not self._trains:
            raise FailedPrecondition(
                f"node {self._node_id} is not in the {FINETUNE_POOL} pool", reason=NOT_FINETUNE_NODE
            )
        model = request.spec.base_model
        if not model:
            raise InvalidArgument([("spec.base_model", "required: a model this node serves")])
        entry = self._generators.get(model)
        if entry is None or not isinstance(entry[1], BatchingEngine):
            why = "is not loaded" if entry is None else "runs on an engine that cannot train"
            raise FailedPrecondition(
                f"model {model[:128]!r} {why} on node {self._node_id}", reason=MODEL_NOT_TRAINABLE
            )
        return entry[0], entry[1]

    async def train(
        self, request: node_pb2.NodeTrainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.NodeTrainEvent]:
        """The events of one fine-tune (module doc)."""
        lm, engine = self._check_node(request)
        plan = plan_training(request, lm)
        if self._claimed:
            raise ResourceExhausted(
                f"a fine-tune already runs on node {self._node_id}",
                retry_after_s=TRAIN_BUSY_RETRY_S,
                reason=TRAINING_BUSY,
            )
        self._claimed = True
        structlog.contextvars.bind_contextvars(job_id=plan.job_id, adapter=str(plan.adapter))
        events: asyncio.Queue[TrainingEvent] = asyncio.Queue()
        run: TrainingRun | None = None
        try:
            preparing = asyncio.ensure_future(self._prepare(request, plan, lm, engine, events))
            heartbeat = node_pb2.NodeTrainEvent(
                progress=jobs_pb2.TrainingProgress(node_id=self._node_id)
            )
            async for beat in _beating(preparing, lambda: heartbeat):
                yield beat
            run, resumed = preparing.result()
            async for event in self._stream(plan, run, engine, resumed, events):
                yield event
        finally:
            if run is not None:
                run.request_stop("cancelled")  # a no-op once the run has left the engine
                engine.wake()
            self._run = None
            self._claimed = False

    async def _prepare(
        self,
        request: node_pb2.NodeTrainRequest,
        plan: TrainPlan,
        lm: LanguageModel,
        engine: BatchingEngine,
        events: asyncio.Queue[TrainingEvent],
    ) -> tuple[TrainingRun, int]:
        """The run of ``plan`` on ``engine``, resumed from its checkpoint; and that step."""
        config = plan.config
        examples = await asyncio.to_thread(
            encode_examples, request.examples, lm, config.max_seq_len
        )
        longest = max(len(e.tokens) for e in examples)
        memory = TrainingMemory.estimate(
            lm, config.lora, micro_batch_size=config.micro_batch_size, max_seq_len=longest
        ).total_bytes
        try:
            engine.training_slots(memory)
        except TrainingMemoryError as exc:
            raise FailedPrecondition(str(exc), reason=TRAINING_MEMORY_EXCEEDED) from exc
        try:
            trainer = await asyncio.to_thread(Trainer, lm, examples, config)
        except ExampleError as exc:
            raise InvalidArgument([("examples", str(exc))]) from exc
        resumed, history = await asyncio.to_thread(self._resume, plan, trainer)
        loop = asyncio.get_running_loop()

        def deliver(event: TrainingEvent) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody listens any more
                run.request_stop("cancelled")

        run = TrainingRun(
            trainer,
            model=lm.name,
            checkpoint_every=plan.checkpoint_every,
            memory_bytes=memory,
            deliver=deliver,
            metrics=self.metrics,
            history=history,
        )
        log.info(
            "training_prepared",
            examples=len(examples),
            total_steps=trainer.total_steps,
            resumed_from=resumed,
            memory_bytes=memory,
        )
        return run, resumed

    def _resume(self, plan: TrainPlan, trainer: Trainer) -> tuple[int, list[StepRecord]]:
        """Restore ``trainer`` from the job's newest checkpoint; its step (0: none) and the
        steps it remembers. Runs on a worker thread (it reads the store)."""
        try:
            latest = self.checkpoints.latest(plan.job_id)
            if latest is None:
                if self._adapters.directory(plan.adapter).exists():
                    raise AlreadyExists(
                        f"adapter {plan.adapter} of {plan.adapter.base_model} already exists",
                        reason=ADAPTER_EXISTS,
                    )
                return 0, []
            state = TrainerState.from_files(self.checkpoints.load(plan.job_id, latest))
            trainer.restore(state)
        except CheckpointError as exc:
            raise FailedPrecondition(
                f"job {plan.job_id}'s checkpoint cannot resume this request: {exc}",
                reason=CHECKPOINT_MISMATCH,
            ) from exc
        except OSError as exc:
            raise Unavailable(
                f"checkpoint store unreadable: {exc}", reason=CHECKPOINT_STORE_UNAVAILABLE
            ) from exc
        return latest, remembered_steps(state.scalars)

    def _start(self, run: TrainingRun, engine: BatchingEngine) -> None:
        if self._is_draining():  # a drain that began while the run was prepared
            raise Unavailable(f"node {self._node_id} is draining", reason="NODE_DRAINING")
        try:
            engine.start_training(run, self._gaps, self.metrics)
        except TrainingMemoryError as exc:
            raise FailedPrecondition(str(exc), reason=TRAINING_MEMORY_EXCEEDED) from exc
        except TrainingBusyError as exc:
            raise ResourceExhausted(
                str(exc), retry_after_s=TRAIN_BUSY_RETRY_S, reason=TRAINING_BUSY
            ) from exc
        except EngineClosedError as exc:
            raise Unavailable(f"node {self._node_id} is draining", reason="NODE_DRAINING") from exc
        self._run = (run, engine)

    async def _stream(
        self,
        plan: TrainPlan,
        run: TrainingRun,
        engine: BatchingEngine,
        resumed: int,
        events: asyncio.Queue[TrainingEvent],
    ) -> AsyncIterator[node_pb2.NodeTrainEvent]:
        progress = _Progress(run.trainer, resumed, self._node_id)

        def beat() -> node_pb2.NodeTrainEvent:
            return progress.event(run.waiting_s)

        yield beat()
        for record in list(run.history):  # before the run starts: its checkpoint's steps only
            yield _step_message(*record)
        if run.trainer.done:  # resumed from the last step's checkpoint: only the adapter is left
            publishing = asyncio.ensure_future(self._publish(plan, run.trainer.adapter))
            async for heartbeat in _beating(publishing, beat):
                yield heartbeat
            yield publishing.result()
            return
        self._start(run, engine)
        started = time.monotonic()
        getter = asyncio.ensure_future(events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=PROGRESS_INTERVAL_S)
                if not done:
                    yield beat()
                    continue
                event, getter = getter.result(), asyncio.ensure_future(events.get())
                run.taken(event)
                if isinstance(event, StepEvent):
                    progress.stepped(event.report)
                    yield _step_event(event)
                    yield beat()
                    continue
                if isinstance(event, SnapshotEvent):
                    work: asyncio.Future[Any] = asyncio.ensure_future(self._save(plan, run, event))
                else:
                    _raise_if_stopped(event, self._node_id)
                    log.info(
                        "training_finished",
                        steps=run.trainer.step - resumed,
                        seconds=round(time.monotonic() - started, 3),
                        waiting_seconds=round(run.waiting_s, 3),
                    )
                    work = asyncio.ensure_future(self._publish(plan, run.trainer.adapter))
                async for heartbeat in _beating(work, beat):
                    yield heartbeat
                if isinstance(event, EndEvent):
                    yield work.result()
                    return
                work.result()
                progress.checkpoint_step = event.step
                yield node_pb2.NodeTrainEvent(checkpoint_step=event.step)
        finally:
            getter.cancel()

    def _write_checkpoint(self, job_id: str, event: SnapshotEvent) -> None:
        """Serialize and store a snapshot (on a worker thread: both take time)."""
        self.checkpoints.save(job_id, event.step, event.state.to_files())

    async def _save(self, plan: TrainPlan, run: TrainingRun, event: SnapshotEvent) -> None:
        try:
            await asyncio.to_thread(self._write_checkpoint, plan.job_id, event)
        except OSError as exc:
            run.request_stop("checkpoint_failed")
            raise Unavailable(
                f"checkpoint store unwritable: {exc}", reason=CHECKPOINT_STORE_UNAVAILABLE
            ) from exc
        self.metrics.checkpoints.labels(run.model).inc()

    async def _publish(self, plan: TrainPlan, adapter: LoraAdapter) -> node_pb2.NodeTrainEvent:
        try:
            trained = await asyncio.to_thread(self._write_adapter, plan.adapter, adapter)
        except OSError as exc:
            raise Unavailable(
                f"adapter store unwritable: {exc}", reason=ADAPTER_STORE_UNAVAILABLE
            ) from exc
        log.info("adapter_written", path=trained.path, size_bytes=trained.size_bytes)
        return node_pb2.NodeTrainEvent(adapter=trained)

    def _write_adapter(self, ref: AdapterRef, adapter: LoraAdapter) -> node_pb2.TrainedAdapter:
        """Publish ``adapter`` as ``ref`` (atomically). One already there with the same
        weights is this job's, published before a crash or a lost stream: it stands."""
        try:
            directory = self._adapters.publish(adapter, ref)
        except FileExistsError:
            directory = self._adapters.directory(ref)
            if not _same_weights(LoraAdapter.load(directory), adapter):
                raise AlreadyExists(
                    f"adapter {ref} of {ref.base_model} already exists with other weights",
                    reason=ADAPTER_EXISTS,
                ) from None
        weights = (directory / WEIGHTS_FILE).read_bytes()
        return node_pb2.TrainedAdapter(
            path=f"{ref.tenant}/{ref.base_model}/{ref.name}",
            size_bytes=len(weights),
            sha256=hashlib.sha256(weights).hexdigest(),
        )


async def _beating(
    work: asyncio.Future[Any], beat: Callable[[], node_pb2.NodeTrainEvent]
) -> AsyncIterator[node_pb2.NodeTrainEvent]:
    """``beat()`` every :data:`PROGRESS_INTERVAL_S` until ``work`` is done (the caller then
    takes its result); ``work`` is cancelled if the call ends first."""
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=PROGRESS_INTERVAL_S)
            if not work.done():
                yield beat()
    finally:
        if not work.done():
            work.cancel()


def _step_event(event: StepEvent) -> node_pb2.NodeTrainEvent:
    report = event.report
    return _step_message(
        report.step, report.loss, report.learning_rate, report.sequence_tokens, event.at_unix_ms
    )


def _step_message(
    step: int, loss: float, rate: float, tokens: int, at_unix_ms: int
) -> node_pb2.NodeTrainEvent:
    return node_pb2.NodeTrainEvent(
        step=jobs_pb2.TrainingStep(
            step=step, loss=loss, learning_rate=rate, tokens=tokens, at_unix_ms=at_unix_ms
        )
    )


def _raise_if_stopped(event: EndEvent, node_id: str) -> None:
    """The status of a run that ended before its last step."""
    error = event.error
    if error is None:
        return
    if isinstance(error, TrainingStoppedError | EngineClosedError):
        why = error.reason if isinstance(error, TrainingStoppedError) else "engine_closed"
        raise Unavailable(f"training on node {node_id} stopped: {why}", reason="NODE_DRAINING")
    raise Internal(f"training failed ({type(error).__name__})")


def _same_weights(first: LoraAdapter, second: LoraAdapter) -> bool:
    ours, theirs = first.state_dict(), second.state_dict()
    return (
        first.config == second.config
        and ours.keys() == theirs.keys()
        and all(ours[k].equal(theirs[k]) for k in ours)
    )
