"""Forwarding to inference nodes: call with the remaining deadline, retry, map errors.

A generation's first node comes from the :class:`scheduler.gate.DispatchGate` (already booked
there); this module books its end. A request is retried on another node only while nothing
has reached the client, at most ``max_attempts`` nodes, and only while the retry budget (at
most 20 % extra load by default) allows. A node that fails after the first token ends the
client's stream with ``UNAVAILABLE`` naming the node: never a hang, never a silently
truncated answer. Time to first token and inter-token latency of every stream feed the
outlier detector.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import grpc
import structlog

from scheduler.metrics import SchedulerMetrics
from scheduler.nodes import NodeDirectory, NodeHandle
from scheduler.routing import RetryBudget
from sluice.contract import REQUEST_ID_METADATA, WorkloadClass
from sluice.runtime import context
from sluice.runtime.errors import DeadlineExceeded, RemoteError, Unavailable
from sluice.v1 import inference_pb2, node_pb2

log = structlog.get_logger(__name__)

# Codes that say the node (not the request) is at fault: they count against its breaker and
# allow a retry elsewhere when nothing was sent yet.
NODE_FAULTS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
NO_NODE_RETRY_S = 1.0


@dataclass
class StreamStats:
    """What one generation produced, for usage, quotas and fairness."""

    generated: int = 0
    prompt_tokens: int = 0
    dispatched: bool = False


class Dispatcher:
    """Sends validated requests to nodes and streams the answers back."""

    def __init__(
        self,
        nodes: NodeDirectory,
        metrics: SchedulerMetrics,
        *,
        max_attempts: int = 2,
        budget: RetryBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nodes = nodes
        self._metrics = metrics
        self._max_attempts = max(1, max_attempts)
        self._clock = clock
        self.budget = budget or RetryBudget(clock)

    def _retry_node(
        self, model: str, workload_class: WorkloadClass, tried: set[str], affinity: str
    ) -> NodeHandle | None:
        """Another node for a retry, or None (no node, or the retry budget is spent)."""
        node = self._nodes.pick(model, workload_class, frozenset(tried), affinity=affinity)
        if node is None:
            return None
        if not self.budget.try_spend():
            self._metrics.retries_denied.inc()
            log.warning("retry_budget_spent")
            return None
        return node

    def _after_failure(
        self,
        node: NodeHandle,
        exc: grpc.aio.AioRpcError,
        *,
        last: bool,
        req: inference_pb2.GenerateRequest | inference_pb2.EmbedRequest,
        tried: set[str],
        affinity: str,
    ) -> NodeHandle:
        """A call failed before anything reached the client: the node to retry on, or raise."""
        fault = self._failed(node, exc)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise DeadlineExceeded("deadline passed while the node worked") from exc
        retry = None
        if fault and not last:
            cls = WorkloadClass(req.workload_class)
            retry = self._retry_node(req.model, cls, tried, affinity)
        if retry is None:
            raise RemoteError(exc, prefix=f"node {node.node_id}: ") from exc
        self._metrics.retries.labels(node.node_id).inc()
        log.info("request_retried", failed_node=node.node_id, node_id=retry.node_id)
        return retry

    def _remaining(self, deadline: float) -> float:
        left = deadline - self._clock()
        if left <= 0:
            raise DeadlineExceeded("deadline passed before a node could take the request")
        return left

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_METADATA, context.request_id.get()),)

    def _failed(self, node: NodeHandle, exc: grpc.aio.AioRpcError) -> bool:
        """Record a failed call; True when the node was at fault (retry elsewhere)."""
        fault = exc.code() in NODE_FAULTS
        if fault:
            node.breaker.record_failure()
        self._metrics.dispatches.labels(node.node_id, exc.code().name.lower()).inc()
        log.warning(
            "node_call_failed", node_id=node.node_id, code=exc.code().name, error=exc.details()
        )
        return fault

    def _observe(self, node: NodeHandle, signal: str, seconds: float) -> None:
        if self._nodes.outliers.observe(node.node_id, signal, seconds):
            self._metrics.outlier_ejections.labels(node.node_id, signal).inc()
            log.warning(
                "node_ejected",
                node_id=node.node_id,
                signal=signal,
                value_s=round(seconds, 4),
                eject_s=self._nodes.outliers.config.eject_s,
            )

    async def generate(
        self,
        req: inference_pb2.GenerateRequest,
        tenant: str,
        deadline: float,
        first: NodeHandle,
        *,
        cost: float,
        affinity: str = "",
        on_tokens: Callable[[int], None] = lambda _n: None,
        stats: StreamStats | None = None,
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        """Stream a generation from ``first`` (booked by the gate), retrying elsewhere before
        the first chunk. ``on_tokens`` is told of generated tokens as they arrive."""
        stats = stats or StreamStats()
        tried: set[str] = set()
        forward = node_pb2.NodeGenerateRequest(
            request=req, tenant=tenant, request_id=context.request_id.get()
        )
        node: NodeHandle | None = first
        self.budget.record_request()
        for attempt in range(self._max_attempts):
            assert node is not None
            tried.add(node.node_id)
            self._metrics.in_flight.inc()
            stats.dispatched = True
            sent = tokens = 0
            started = first_at = last_at = self._clock()
            done = False
            call = None
            retry: NodeHandle | None = None
            try:
                call = node.stub.Generate(
                    forward, timeout=self._remaining(deadline), metadata=self._metadata()
                )
                async for chunk in call:
                    last_at = self._clock()
                    if sent == 0:
                        chunk.node_id = node.node_id
                        first_at = last_at
                        self._observe(node, "ttft", first_at - started)
                    else:
                        tokens += len(chunk.token_ids)
                    sent += 1
                    stats.generated += len(chunk.token_ids)
                    if chunk.usage.prompt_tokens:
                        stats.prompt_tokens = chunk.usage.prompt_tokens
                    on_tokens(len(chunk.token_ids))
                    yield chunk
                done = True
                node.breaker.record_success()
                self._metrics.dispatches.labels(node.node_id, "ok").inc()
                if tokens > 0:
                    self._observe(node, "itl", (last_at - first_at) / tokens)
                return
            except grpc.aio.AioRpcError as exc:
                if sent:
                    self._failed(node, exc)
                    raise Unavailable(
                        f"node {node.node_id} failed mid-stream after {sent} chunks: "
                        f"{exc.code().name} {exc.details()}",
                        reason="NODE_FAILED_MIDSTREAM",
                    ) from exc
                last = attempt + 1 >= self._max_attempts
                retry = self._after_failure(
                    node, exc, last=last, req=req, tried=tried, affinity=affinity
                )
                self._nodes.dispatched(retry, cost, affinity)
            finally:
                self._metrics.in_flight.dec()
                self._nodes.finished(node, cost if done else 0)
                if call is not None and not call.done():
                    call.cancel()
            node = retry
        raise AssertionError("unreachable")  # pragma: no cover

    async def embed(
        self, req: inference_pb2.EmbedRequest, tenant: str, deadline: float
    ) -> inference_pb2.EmbedResponse:
        """Embed on a node, retrying elsewhere if the node fails (embeddings are not queued:
        they are short and run on the node's own embedding thread)."""
        tried: set[str] = set()
        forward = node_pb2.NodeEmbedRequest(
            request=req, tenant=tenant, request_id=context.request_id.get()
        )
        node = self._nodes.pick(req.model, WorkloadClass(req.workload_class))
        self.budget.record_request()
        for attempt in range(self._max_attempts):
            if node is None:
                raise Unavailable(
                    f"no healthy node serves model {req.model!r} now",
                    retry_after_s=NO_NODE_RETRY_S,
                    reason="NO_NODE",
                )
            tried.add(node.node_id)
            self._nodes.dispatched(node, 0.0)
            self._metrics.in_flight.inc()
            retry = None
            try:
                reply: inference_pb2.EmbedResponse = await node.stub.Embed(
                    forward, timeout=self._remaining(deadline), metadata=self._metadata()
                )
                node.breaker.record_success()
                self._metrics.dispatches.labels(node.node_id, "ok").inc()
                reply.node_id = node.node_id
                return reply
            except grpc.aio.AioRpcError as exc:
                last = attempt + 1 >= self._max_attempts
                retry = self._after_failure(node, exc, last=last, req=req, tried=tried, affinity="")
            finally:
                self._metrics.in_flight.dec()
                self._nodes.finished(node, 0)
            node = retry
        raise AssertionError("unreachable")  # pragma: no cover
