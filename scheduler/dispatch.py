"""Forwarding to inference nodes: pick, call with the remaining deadline, retry, map errors.

A request is retried on another node only while nothing has reached the client (at most
``max_attempts`` nodes). A node that fails after the first token ends the client's stream with
``UNAVAILABLE`` naming the node: never a hang, never a silently truncated answer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import structlog

from scheduler.metrics import SchedulerMetrics
from scheduler.nodes import NodeDirectory, NodeHandle
from sluice import context
from sluice.errors import DeadlineExceeded, RemoteError, Unavailable
from sluice.v1 import inference_pb2, node_pb2

log = structlog.get_logger(__name__)

# Codes that say the node (not the request) is at fault: they count against its breaker and
# allow a retry elsewhere when nothing was sent yet.
NODE_FAULTS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
NO_NODE_RETRY_S = 1.0


class Dispatcher:
    """Sends validated requests to nodes chosen by the :class:`NodeDirectory`."""

    def __init__(
        self, nodes: NodeDirectory, metrics: SchedulerMetrics, *, max_attempts: int = 2
    ) -> None:
        self._nodes = nodes
        self._metrics = metrics
        self._max_attempts = max(1, max_attempts)

    def _pick(self, model: str, workload_class: int, tried: set[str]) -> NodeHandle:
        node = self._nodes.pick(model, workload_class, frozenset(tried))
        if node is None:
            raise Unavailable(
                f"no healthy node serves model {model!r} now",
                retry_after_s=NO_NODE_RETRY_S,
                reason="NO_NODE",
            )
        return node

    @staticmethod
    def _remaining(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline passed before a node could take the request")
        return left

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((context.REQUEST_ID_METADATA, context.request_id.get()),)

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

    def _track(self, node: NodeHandle, delta: int) -> None:
        """Count a request in (+1) or out (-1) of flight on ``node`` and in the gauge."""
        node.in_flight += delta
        self._metrics.in_flight.inc(delta)

    def _ok(self, node: NodeHandle) -> None:
        node.breaker.record_success()
        self._metrics.dispatches.labels(node.node_id, "ok").inc()

    async def generate(
        self, req: inference_pb2.GenerateRequest, tenant: str, deadline: float
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """Stream a generation from a node, retrying elsewhere before the first chunk."""
        tried: set[str] = set()
        forward = node_pb2.NodeGenerateRequest(
            request=req, tenant=tenant, request_id=context.request_id.get()
        )
        for attempt in range(self._max_attempts):
            node = self._pick(req.model, req.workload_class, tried)
            tried.add(node.node_id)
            sent = 0
            self._track(node, +1)
            call = node.stub.Generate(
                forward, timeout=self._remaining(deadline), metadata=self._metadata()
            )
            try:
                async for chunk in call:
                    if sent == 0:
                        chunk.node_id = node.node_id
                    sent += 1
                    yield chunk
                self._ok(node)
                return
            except grpc.aio.AioRpcError as exc:
                fault = self._failed(node, exc)
                if sent:
                    raise Unavailable(
                        f"node {node.node_id} failed mid-stream after {sent} chunks: "
                        f"{exc.code().name} {exc.details()}",
                        reason="NODE_FAILED_MIDSTREAM",
                    ) from exc
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded("deadline passed while the node worked") from exc
                if not fault or attempt + 1 >= self._max_attempts:
                    raise RemoteError(exc, prefix=f"node {node.node_id}: ") from exc
                self._metrics.retries.inc()
            finally:
                self._track(node, -1)
                if not call.done():
                    call.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    async def embed(
        self, req: inference_pb2.EmbedRequest, tenant: str, deadline: float
    ) -> inference_pb2.EmbedResponse:
        """Embed on a node, retrying elsewhere if the node fails."""
        tried: set[str] = set()
        forward = node_pb2.NodeEmbedRequest(
            request=req, tenant=tenant, request_id=context.request_id.get()
        )
        for attempt in range(self._max_attempts):
            node = self._pick(req.model, req.workload_class, tried)
            tried.add(node.node_id)
            self._track(node, +1)
            try:
                reply: inference_pb2.EmbedResponse = await node.stub.Embed(
                    forward, timeout=self._remaining(deadline), metadata=self._metadata()
                )
                self._ok(node)
                reply.node_id = node.node_id
                return reply
            except grpc.aio.AioRpcError as exc:
                fault = self._failed(node, exc)
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded("deadline passed while the node worked") from exc
                if not fault or attempt + 1 >= self._max_attempts:
                    raise RemoteError(exc, prefix=f"node {node.node_id}: ") from exc
                self._metrics.retries.inc()
            finally:
                self._track(node, -1)
        raise AssertionError("unreachable")  # pragma: no cover
