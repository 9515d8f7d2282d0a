"""gRPC servicer of the internal ``Node`` service: protobuf ⇄ tokenizer + engine + embedder.

How ``Generate`` answers (the scheduler's ``scheduler.blame.blame`` reads these codes):

==========================================  ==================  =======================
what happened                               status              ``ErrorInfo.reason``
==========================================  ==================  =======================
invalid request (a contract limit broken:   INVALID_ARGUMENT    ``INVALID_ARGUMENT``
docs/limits.md; model not loaded, too long  + BadRequest
for its context)
prompt or messages fail to tokenize         INVALID_ARGUMENT    ``REQUEST_FAULT``
one request's own processing failed         INVALID_ARGUMENT    ``REQUEST_FAULT``
(sampling: NaN/inf logits or probabilities; + BadRequest        (metadata ``stage``)
detokenization, stop strings), at any time
its job key is held by a live request       ALREADY_EXISTS      ``JOB_KEY_IN_USE``
``attach_only`` and no detached generation  NOT_FOUND           ``GENERATION_NOT_FOUND``
of that key for this tenant, adapter, model
``adapter`` malformed, or the model serves  INVALID_ARGUMENT    ``INVALID_ARGUMENT``
no adapters                                 + BadRequest
``adapter`` not in the adapter store        NOT_FOUND           ``ADAPTER_NOT_FOUND``
``adapter``'s files unservable on the model INVALID_ARGUMENT    ``ADAPTER_INVALID``
(format, settings, shapes, file size)       + BadRequest
``adapter`` larger than the adapter cache   RESOURCE_EXHAUSTED  ``ADAPTER_TOO_LARGE``
the adapter store could not be read         UNAVAILABLE         ``ADAPTER_STORE_UNAVAILABLE``
can never fit the KV budget                 RESOURCE_EXHAUSTED  ``KV_BUDGET_EXCEEDED``
waiting queue full                          RESOURCE_EXHAUSTED  ``OVERLOADED`` + RetryInfo
draining or closed                          UNAVAILABLE         ``NODE_DRAINING``
the engine's shared step failed             UNAVAILABLE         ``ENGINE_FAULT``
anything else (a bug)                       INTERNAL            ``INTERNAL``
==========================================  ==================  =======================

``Train`` (a fine-tune in the engine's gaps) answers as :mod:`inference_node.train_service` says.

The adapter's errors come before any chunk (the adapter loads before the request's first
step). The node checks no access to an adapter: the scheduler resolved it for the tenant.

A request fault is INVALID_ARGUMENT because it is the request's own and deterministic (the
same parameters and seed fail the same way on every node): every layer already treats that
code as "do not retry, do not blame the server", so the poison request is neither retried on
another node nor counted against this one, while the batch it ran in goes on. The reason
``REQUEST_FAULT`` tells it apart from a plain validation refusal. A failed shared step is
UNAVAILABLE: the node, not any one request, is suspect, and the request may be retried
elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc
import psutil
import structlog

from inference_node.adapters import (
    AdapterError,
    AdapterInvalidError,
    AdapterNotFoundError,
    AdapterTooLargeError,
)
from inference_node.detached import DetachedGenerations
from inference_node.embed_batcher import EmbedBatcher, EmbedderClosedError, EmbedQueueFullError
from inference_node.engine.promises import time_left
from inference_node.engine.types import (
    DeltaStream,
    DuplicateRequestError,
    Engine,
    EngineClosedError,
    EngineFaultError,
    EngineFullError,
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    RequestFaultError,
    RequestTooLargeError,
    SamplingParams,
    TokenDelta,
    joined,
)
from inference_node.errors import (
    ADAPTER_INVALID,
    ADAPTER_NOT_FOUND,
    ADAPTER_STORE_UNAVAILABLE,
    ADAPTER_TOO_LARGE,
    ENGINE_FAULT,
    GENERATION_NOT_FOUND,
    NOT_FINETUNE_NODE,
    AlreadyExists,
    FailedPrecondition,
    RequestFault,
)
from inference_node.gpu import GpuProbe
from inference_node.metrics import NodeMetrics
from inference_node.model_types import Embedder, LanguageModel
from inference_node.reports import add_engine_stats
from inference_node.train_service import TrainService
from sluice import limits
from sluice.contract import WorkloadClass
from sluice.runtime.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SluiceError,
    Unavailable,
)
from sluice.v1 import common_pb2, inference_pb2, node_pb2, node_pb2_grpc

log = structlog.get_logger(__name__)

FINISH = {
    FinishReason.EOS: common_pb2.FINISH_REASON_EOS,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}
DEFAULT_MAX_NEW_TOKENS = 128
ENGINE_FULL_RETRY_S = 1.0
LOAD_INTERVAL_MS = (10, 10_000)
"""Bounds of StreamLoad.min_interval_ms (0 keeps the node's default)."""
MAX_DRAIN_GRACE_S = 3600.0


def sampling_params(options: common_pb2.GenerationOptions) -> SamplingParams:
    """Engine sampling parameters from the request options (unset → defaults)."""
    return SamplingParams(
        max_new_tokens=options.max_new_tokens
        if options.HasField("max_new_tokens")
        else DEFAULT_MAX_NEW_TOKENS,
        temperature=options.temperature if options.HasField("temperature") else 0.0,
        top_p=options.top_p if options.HasField("top_p") else 1.0,
        seed=options.seed if options.HasField("seed") else None,
        stop=tuple(options.stop),
        ignore_eos=options.ignore_eos,
    )


def _forwarded_violations(
    request: node_pb2.NodeGenerateRequest | node_pb2.NodeEmbedRequest,
    context: grpc.aio.ServicerContext,
) -> limits.Violations:
    """The limits of what a scheduler adds to a request (the tenant, the job key) and of the
    call's metadata: the node checks every limit again, whoever the caller is."""
    out = limits.tenant_name_violations("tenant", request.tenant)
    if len(request.request_id) > limits.MAX_JOB_KEY_CHARS:
        n = len(request.request_id)
        out.append(("request_id", f"{n} characters, at most {limits.MAX_JOB_KEY_CHARS}"))
    return out + limits.metadata_violations(context.invocation_metadata())


def _refuse(violations: limits.Violations) -> None:
    if violations:
        raise InvalidArgument(violations)


def adapter_status(exc: AdapterError) -> SluiceError:
    """The status of a request whose adapter could not be loaded (see the module doc)."""
    message = str(exc)
    if isinstance(exc, AdapterNotFoundError):
        return NotFound(message, reason=ADAPTER_NOT_FOUND)
    if isinstance(exc, AdapterInvalidError):
        return InvalidArgument([("adapter", message)], reason=ADAPTER_INVALID)
    if isinstance(exc, AdapterTooLargeError):
        return ResourceExhausted(message, reason=ADAPTER_TOO_LARGE)
    return Unavailable(message, reason=ADAPTER_STORE_UNAVAILABLE)


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Serves generation, embeddings, load reports and drain for one node."""

    def __init__(
        self,
        node_id: str,
        generators: dict[str, tuple[LanguageModel, Engine]],
        embedders: dict[str, Embedder],
        metrics: NodeMetrics,
        *,
        embeds: EmbedBatcher,
        is_draining: Callable[[], bool],
        start_drain: Callable[[float], None],
        load_interval_s: float = 0.2,
        stream_interval_s: float = 0.0,
        gpu: GpuProbe | None = None,
        training: TrainService | None = None,
        detached_retain_s: float = 120.0,
    ) -> None:
        self._node_id = node_id
        self._generators = generators
        self._embedders = embedders
        self._metrics = metrics
        self._is_draining = is_draining
        self._start_drain = start_drain
        self._load_interval_s = load_interval_s
        self._stream_interval_s = stream_interval_s
        # One thread owns the embedding models, as the engine thread owns the generator;
        # concurrent Embed calls share its forwards.
        self.embeds = embeds
        self._process = psutil.Process()
        self._gpu = gpu
        self._training = training
        self.in_flight = 0
        self.detached = DetachedGenerations(retain_s=detached_retain_s)
        """Generations kept going without their caller (job lines)."""

    def _refuse_if_draining(self) -> None:
        if self._is_draining():
            raise Unavailable(f"node {self._node_id} is draining", reason="NODE_DRAINING")

    def _generator(
        self, request: node_pb2.NodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[LanguageModel, Engine]:
        """The model and engine for ``request``, once it is within every contract limit (the
        scheduler checked them; a caller that bypasses it is refused the same way) and the
        model is loaded here; else INVALID_ARGUMENT with every violation."""
        req = request.request
        violations = limits.generate_violations(req) + _forwarded_violations(request, context)
        entry = self._generators.get(req.model)
        if entry is None:
            if all(field != "model" for field, _ in violations):
                violations.append(("model", f"model {req.model!r} is not loaded on this node"))
        elif req.messages and not entry[0].chat:
            violations.append(("messages", f"model {req.model!r} has no chat template"))
        _refuse(violations)
        assert entry is not None
        return entry

    def _prompt_ids(self, lm: LanguageModel, req: inference_pb2.GenerateRequest) -> list[int]:
        """The prompt's token ids; a tokenizer failure is the request's fault (REQUEST_FAULT)."""
        field = "messages" if req.messages else "prompt"
        try:
            if req.messages:
                return lm.tokenizer.apply_chat_template([(m.role, m.content) for m in req.messages])
            return lm.tokenizer.encode(req.prompt)
        except Exception as exc:
            log.warning("tokenization_failed", model=lm.name, error=type(exc).__name__)
            raise RequestFault(field, "tokenization", "could not be tokenized") from exc

    def _submit(self, engine: Engine, request: EngineRequest) -> DeltaStream:
        """Hand ``request`` to ``engine``, mapping its refusals to statuses."""
        try:
            return engine.submit(request)
        except InvalidRequestError as exc:
            raise InvalidArgument(exc.violations) from exc
        except ValueError as exc:  # an engine that names no field
            raise InvalidArgument([("request", str(exc))]) from exc
        except DuplicateRequestError as exc:
            raise AlreadyExists(str(exc)) from exc
        except RequestTooLargeError as exc:
            raise ResourceExhausted(str(exc), reason="KV_BUDGET_EXCEEDED") from exc
        except EngineFullError as exc:
            raise ResourceExhausted(
                f"node {self._node_id} queue is full", retry_after_s=ENGINE_FULL_RETRY_S
            ) from exc
        except EngineClosedError as exc:
            raise Unavailable(f"node {self._node_id} is draining", reason="NODE_DRAINING") from exc

    async def _next_delta(self, stream: DeltaStream) -> TokenDelta | None:
        """The stream's next delta (None at its end), mapping the engine's faults."""
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None
        except RequestFaultError as exc:
            raise RequestFault("options", exc.stage, str(exc)) from exc
        except AdapterError as exc:
            raise adapter_status(exc) from exc
        except EngineFaultError as exc:
            raise Unavailable(
                f"node {self._node_id} engine failed: {exc}", reason=ENGINE_FAULT
            ) from exc

    def _chunk(
        self, lm: LanguageModel, delta: TokenDelta, first: bool
    ) -> inference_pb2.GenerateChunk:
        chunk = inference_pb2.GenerateChunk(text=delta.text, token_ids=delta.token_ids)
        if first:
            chunk.node_id = self._node_id
        if delta.finish_reason is not None:
            chunk.node_id = self._node_id
            chunk.finish_reason = FINISH[delta.finish_reason]  # type: ignore[assignment]
            chunk.usage.prompt_tokens = delta.prompt_tokens
            chunk.usage.completion_tokens = delta.completion_tokens
            self._metrics.prompt_tokens.labels(lm.name).inc(delta.prompt_tokens)
            self._metrics.generated_tokens.labels(lm.name).inc(delta.completion_tokens)
            self._metrics.requests.labels(lm.name, delta.finish_reason.value).inc()
        return chunk

    async def Generate(
        self, request: node_pb2.NodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """Stream one generation. ``request.request_id`` is the job key the scheduler made
        for this attempt (unique; a live duplicate is refused); the client's correlation id
        arrives in ``x-request-id`` metadata, for logs only. A ``detached`` request runs to
        its end without its caller and is handed whole to a later call naming the same key
        (:mod:`inference_node.detached`). Statuses (see the module doc)."""
        key = request.request_id
        owner = f"{request.tenant}\x00{request.adapter}\x00{request.request.model}"
        if request.detached and key:
            existing = self.detached.get(key, owner)
            if existing is not None:
                log.info("detached_generation_attached", job_key=key[:128])
                async for chunk in existing.follow():
                    yield chunk
                return
            if request.attach_only:
                raise NotFound(
                    f"node {self._node_id} has no generation {key[:128]!r}",
                    reason=GENERATION_NOT_FOUND,
                )
        self._refuse_if_draining()
        req = request.request
        lm, engine = self._generator(request, context)
        job_key = key or f"{self._node_id}-{uuid.uuid4().hex}"
        structlog.contextvars.bind_contextvars(job_key=job_key)
        if request.adapter:
            structlog.contextvars.bind_contextvars(adapter=request.adapter[:200])
        engine_request = EngineRequest(
            request_id=job_key,
            prompt_token_ids=tuple(self._prompt_ids(lm, req)),
            params=sampling_params(req.options),
            workload_class=req.workload_class,  # the engine reads 0 as REALTIME
            adapter=request.adapter,
            step_budget_s=request.step_budget_s,
            first_token_budget_s=request.first_token_budget_s,
            time_left_s=0.0 if request.detached else time_left(context.time_remaining()),
        )
        interval = request.stream_interval_ms / 1000 or self._stream_interval_s
        chunks = self._chunks(lm, self._submit(engine, engine_request), interval)
        if request.detached and key:
            async for chunk in self.detached.start(key, owner, chunks).follow():
                yield chunk
            return
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def _chunks(
        self, lm: LanguageModel, stream: DeltaStream, interval: float
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        """The chunks of an admitted generation, at most one per ``interval`` seconds after
        the first (tokens made meanwhile go out together), the last one the moment the
        generation ends (never held back to the interval: a job line's slot is taken again
        at once); closing it cancels the generation."""
        self.in_flight += 1
        first = True
        loop = asyncio.get_running_loop()
        sent_at = 0.0
        held: list[TokenDelta] = []
        """Read but not sent yet: the interval has not elapsed."""
        reading: asyncio.Task[TokenDelta | None] | None = None
        try:
            while True:
                try:
                    if not held:
                        delta = await (reading or self._next_delta(stream))
                    else:
                        reading = reading or asyncio.ensure_future(self._next_delta(stream))
                        left = sent_at + interval - loop.time()
                        done, _ = await asyncio.wait({reading}, timeout=max(0.0, left))
                        if not done:  # the interval is over: send what came meanwhile
                            yield self._chunk(lm, joined(held), first)
                            held, sent_at = [], loop.time()
                            continue
                        delta = reading.result()
                except Exception:
                    if held:  # what came before the fault goes out first
                        yield self._chunk(lm, joined(held), first)
                    raise
                reading = None
                if delta is None:
                    if held:
                        yield self._chunk(lm, joined(held), first)
                    break
                held.append(delta)
                due = not interval or first or loop.time() >= sent_at + interval
                if due or delta.finish_reason is not None:
                    yield self._chunk(lm, joined(held), first)
                    first, held, sent_at = False, [], loop.time()
        finally:
            self.in_flight -= 1
            if reading is not None:  # closed while a read was pending
                reading.cancel()
                reading.add_done_callback(lambda t: t.cancelled() or t.exception())
            await stream.aclose()

    async def Embed(
        self, request: node_pb2.NodeEmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        self._refuse_if_draining()
        req = request.request
        violations = limits.embed_violations(req) + _forwarded_violations(request, context)
        embedder = self._embedders.get(req.model)
        if embedder is None and all(field != "model" for field, _ in violations):
            violations.append(("model", f"model {req.model!r} is not loaded on this node"))
        _refuse(violations)
        assert embedder is not None
        self.in_flight += 1
        try:
            rank = WorkloadClass.from_wire(req.workload_class).rank
            result = await self.embeds.embed(embedder, req.inputs, rank)
        except EmbedQueueFullError as exc:
            raise ResourceExhausted(str(exc), retry_after_s=ENGINE_FULL_RETRY_S) from exc
        except EmbedderClosedError as exc:
            raise Unavailable(f"node {self._node_id} is draining", reason="NODE_DRAINING") from exc
        finally:
            self.in_flight -= 1
        tokens = result.prompt_tokens
        self._metrics.prompt_tokens.labels(embedder.name).inc(tokens)
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=v) for v in result.vectors],
            dimensions=embedder.dimensions,
            usage=common_pb2.Usage(prompt_tokens=tokens),
            node_id=self._node_id,
        )

    def load_report(self) -> common_pb2.LoadReport:
        """The node's load now, summed over its generation engines (each one's step cost on its
        own); the slots a fine-tune holds as ``reserved_sequences``."""
        report = common_pb2.LoadReport(
            node_id=self._node_id,
            rss_bytes=self._process.memory_info().rss,
            gpu_utilization_percent=-1,
            state=common_pb2.NODE_STATE_DRAINING
            if self._is_draining()
            else common_pb2.NODE_STATE_SERVING,
            timestamp_unix_ms=int(time.time() * 1000),
        )
        running: dict[WorkloadClass, int] = {}
        waiting: dict[WorkloadClass, int] = {}
        for lm, engine in self._generators.values():
            add_engine_stats(report, lm.name, engine.stats(), running, waiting)
        reading = self._gpu.read() if self._gpu is not None else None
        if reading is not None:
            report.gpu_free_bytes = reading.free_bytes
            report.gpu_total_bytes = reading.total_bytes
            report.gpu_utilization_percent = reading.utilization_percent
        if self._training is not None:
            # A fine-tune is no sequence of any class: it holds slots no class may use.
            report.reserved_sequences = self._training.reserved_sequences
        for cls in WorkloadClass:
            report.classes.add(
                workload_class=cls,  # type: ignore[arg-type]
                running=running.get(cls, 0),
                waiting=waiting.get(cls, 0),
            )
        return report

    async def StreamLoad(
        self, request: node_pb2.StreamLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.LoadReport]:
        low, high = LOAD_INTERVAL_MS
        if request.min_interval_ms and not low <= request.min_interval_ms <= high:
            raise InvalidArgument([("min_interval_ms", f"0 or {low}-{high}")])
        interval = (
            request.min_interval_ms / 1000 if request.min_interval_ms > 0 else self._load_interval_s
        )
        while True:
            yield self.load_report()
            await asyncio.sleep(interval)

    async def Train(
        self, request: node_pb2.NodeTrainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.NodeTrainEvent]:
        """Fine-tune an adapter in the engine's gaps (:mod:`inference_node.train_service`)."""
        if self._training is None:
            raise FailedPrecondition(
                f"node {self._node_id} does not train", reason=NOT_FINETUNE_NODE
            )
        async for event in self._training.train(request, context):
            yield event

    async def Drain(
        self, request: node_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.DrainResponse:
        grace = request.grace_seconds
        if not 0 <= grace <= MAX_DRAIN_GRACE_S:  # NaN fails too
            raise InvalidArgument([("grace_seconds", f"0-{MAX_DRAIN_GRACE_S:.0f} seconds")])
        in_flight = self.in_flight
        self._start_drain(float(grace))
        return node_pb2.DrainResponse(in_flight=in_flight)

    def close(self) -> None:
        """Stop the embedding threads."""
        self.embeds.close()
