"""gRPC servicer of the internal ``Node`` service: protobuf ⇄ tokenizer + engine + embedder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import structlog

from inference_node.engine.types import (
    Engine,
    EngineClosedError,
    EngineFullError,
    EngineRequest,
    FinishReason,
    RequestTooLargeError,
    SamplingParams,
)
from inference_node.gpu import GpuProbe
from inference_node.metrics import NodeMetrics
from inference_node.model_types import Embedder, LanguageModel
from sluice.contract import WorkloadClass
from sluice.runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
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


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Serves generation, embeddings, load reports and drain for one node."""

    def __init__(
        self,
        node_id: str,
        generators: dict[str, tuple[LanguageModel, Engine]],
        embedders: dict[str, Embedder],
        metrics: NodeMetrics,
        *,
        is_draining: Callable[[], bool],
        start_drain: Callable[[float], None],
        load_interval_s: float = 0.2,
        stream_interval_s: float = 0.0,
        gpu: GpuProbe | None = None,
    ) -> None:
        self._node_id = node_id
        self._generators = generators
        self._embedders = embedders
        self._metrics = metrics
        self._is_draining = is_draining
        self._start_drain = start_drain
        self._load_interval_s = load_interval_s
        self._stream_interval_s = stream_interval_s
        # One thread owns the embedding models, as the engine thread owns the generator.
        self._embed_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._process = psutil.Process()
        self._gpu = gpu
        self.in_flight = 0

    def _refuse_if_draining(self) -> None:
        if self._is_draining():
            raise Unavailable(f"node {self._node_id} is draining", reason="NODE_DRAINING")

    def _prompt_ids(self, lm: LanguageModel, req: inference_pb2.GenerateRequest) -> list[int]:
        if req.messages:
            if not lm.chat:
                raise InvalidArgument([("messages", f"model {lm.name!r} has no chat template")])
            return lm.tokenizer.apply_chat_template([(m.role, m.content) for m in req.messages])
        return lm.tokenizer.encode(req.prompt)

    async def Generate(
        self, request: node_pb2.NodeGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        self._refuse_if_draining()
        req = request.request
        entry = self._generators.get(req.model)
        if entry is None:
            raise InvalidArgument([("model", f"model {req.model!r} is not loaded on this node")])
        lm, engine = entry
        prompt_ids = self._prompt_ids(lm, req)
        engine_request = EngineRequest(
            request_id=request.request_id or f"{self._node_id}-{time.monotonic_ns()}",
            prompt_token_ids=tuple(prompt_ids),
            params=sampling_params(req.options),
            workload_class=req.workload_class,  # the engine reads 0 as REALTIME
        )
        try:
            stream = engine.submit(engine_request)
        except ValueError as exc:
            raise InvalidArgument([("prompt", str(exc))]) from exc
        except RequestTooLargeError as exc:
            raise ResourceExhausted(str(exc), reason="KV_BUDGET_EXCEEDED") from exc
        except EngineFullError as exc:
            raise ResourceExhausted(
                f"node {self._node_id} queue is full", retry_after_s=ENGINE_FULL_RETRY_S
            ) from exc
        except EngineClosedError as exc:
            raise Unavailable(f"node {self._node_id} is draining", reason="NODE_DRAINING") from exc
        self.in_flight += 1
        first = True
        interval = self._stream_interval_s
        loop = asyncio.get_running_loop()
        sent_at = 0.0
        try:
            while True:
                if interval and not first and (wait := sent_at + interval - loop.time()) > 0:
                    # Tokens made while we wait are merged into the next delta by the stream.
                    await asyncio.sleep(wait)
                try:
                    delta = await anext(stream)
                except StopAsyncIteration:
                    break
                chunk = inference_pb2.GenerateChunk(text=delta.text, token_ids=delta.token_ids)
                if first:
                    chunk.node_id = self._node_id
                    first = False
                if delta.finish_reason is not None:
                    chunk.node_id = self._node_id
                    chunk.finish_reason = FINISH[delta.finish_reason]  # type: ignore[assignment]
                    chunk.usage.prompt_tokens = delta.prompt_tokens
                    chunk.usage.completion_tokens = delta.completion_tokens
                    self._metrics.prompt_tokens.labels(lm.name).inc(delta.prompt_tokens)
                    self._metrics.generated_tokens.labels(lm.name).inc(delta.completion_tokens)
                    self._metrics.requests.labels(lm.name, delta.finish_reason.value).inc()
                yield chunk
                sent_at = loop.time()
        finally:
            self.in_flight -= 1
            await stream.aclose()

    async def Embed(
        self, request: node_pb2.NodeEmbedRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        self._refuse_if_draining()
        req = request.request
        embedder = self._embedders.get(req.model)
        if embedder is None:
            raise InvalidArgument([("model", f"model {req.model!r} is not loaded on this node")])
        if not req.inputs:
            raise InvalidArgument([("inputs", "at least one text required")])
        self.in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            vectors, tokens = await loop.run_in_executor(
                self._embed_pool, embedder.embed, list(req.inputs)
            )
        finally:
            self.in_flight -= 1
        self._metrics.prompt_tokens.labels(embedder.name).inc(tokens)
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=v) for v in vectors],
            dimensions=embedder.dimensions,
            usage=common_pb2.Usage(prompt_tokens=tokens),
            node_id=self._node_id,
        )

    def load_report(self) -> common_pb2.LoadReport:
        """The node's load now, summed over its generation engines."""
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
        for _lm, engine in self._generators.values():
            stats = engine.stats()
            for cls, n in stats.running.items():
                running[cls] = running.get(cls, 0) + n
            for cls, n in stats.waiting.items():
                waiting[cls] = waiting.get(cls, 0) + n
            report.kv_used_bytes += stats.kv_used_bytes
            report.kv_budget_bytes += stats.kv_budget_bytes
            report.decode_tokens_per_s += stats.decode_tokens_per_s
            report.queued_tokens += stats.queued_tokens
        reading = self._gpu.read() if self._gpu is not None else None
        if reading is not None:
            report.gpu_free_bytes = reading.free_bytes
            report.gpu_total_bytes = reading.total_bytes
            report.gpu_utilization_percent = reading.utilization_percent
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
        interval = (
            request.min_interval_ms / 1000 if request.min_interval_ms > 0 else self._load_interval_s
        )
        while True:
            yield self.load_report()
            await asyncio.sleep(interval)

    async def Drain(
        self, request: node_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.DrainResponse:
        in_flight = self.in_flight
        self._start_drain(float(request.grace_seconds))
        return node_pb2.DrainResponse(in_flight=in_flight)

    def close(self) -> None:
        """Stop the embedding thread."""
        self._embed_pool.shutdown(wait=False, cancel_futures=True)
