"""Forwarding to inference nodes: call with the remaining deadline, retry, map errors.

A request's first node (a generation's or an embedding's) comes from the
:class:`scheduler.gate.DispatchGate` (already booked there); this module books its end. A
request is retried on another node only while nothing has reached the client, at most
``max_attempts`` nodes, and only while the retry budget (at most 20 % extra load by default)
allows. A node that fails after the first token ends the client's stream with ``UNAVAILABLE``
naming the node: never a hang, never a silently truncated answer. Time to first token and
inter-token latency of every stream feed the outlier detector.

Who is to blame for an error a node returns (:func:`blame`) decides what happens next: only
a failure of the node or the way to it counts against the node's breaker and allows a retry
elsewhere; an error that is the request's own (above all INVALID_ARGUMENT, reason
``REQUEST_FAULT``: a poison request the node failed alone) goes to the client as it came,
details and all, before or after the first chunk, and trips no breaker, so a request that
fails the same way everywhere cannot open every node's circuit.

A stream whose node stops making progress (no chunk and no load report for longer than a
bound from the stream's inter-token time: :mod:`scheduler.stall`) is cancelled by a sweep and
counts as the node's failure: retried elsewhere before its first chunk, else ended
``UNAVAILABLE`` ``NODE_STALLED``, within seconds rather than at the client's deadline.

Every attempt carries a job key made here (:func:`new_job_key`), unique per attempt, as the
node request's ``request_id``; the client's ``x-request-id`` travels only as metadata, a
correlation id for logs, so two tenants sending the same id never collide on a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import grpc
import structlog

from scheduler.blame import Blame, blame
from scheduler.metrics import SchedulerMetrics
from scheduler.node_handle import NodeHandle
from scheduler.nodes import NodeDirectory
from scheduler.retry_budget import RetryBudget
from scheduler.stall import StallPolicy, StallWatch, WatchedStream
from sluice.contract import REQUEST_ID_METADATA, WorkloadClass
from sluice.runtime import context
from sluice.runtime.errors import (
    DeadlineExceeded,
    RemoteError,
    Unavailable,
)
from sluice.v1 import inference_pb2, node_pb2

log = structlog.get_logger(__name__)

NO_NODE_RETRY_S = 1.0


def new_job_key() -> str:
    """A node job key: random, unique per attempt, never derived from client metadata."""
    return uuid.uuid4().hex


_Forward = TypeVar("_Forward", node_pb2.NodeGenerateRequest, node_pb2.NodeEmbedRequest)


def _keyed(forward: _Forward) -> _Forward:
    """``forward`` with a new job key for this attempt (bound to the log context too); a
    retry's carries no first-token budget (the failed attempt took its time: the node then
    orders it by class)."""
    _retry_unbudgeted(forward)
    forward.request_id = new_job_key()
    structlog.contextvars.bind_contextvars(job_key=forward.request_id)
    return forward


def _node_request(
    req: inference_pb2.GenerateRequest,
    tenant: str,
    adapter: str,
    detach_key: str,
    stream_interval_ms: int,
) -> tuple[node_pb2.NodeGenerateRequest, Callable[[_Forward], _Forward]]:
    """The node's request and how each attempt is keyed: a new job key per attempt, or the
    caller's stable key for a detached generation."""
    forward = node_pb2.NodeGenerateRequest(
        request=req,
        tenant=tenant,
        adapter=adapter,
        detached=bool(detach_key),
        stream_interval_ms=stream_interval_ms,
    )
    keyed = _keyed if not detach_key else partial(_detach_keyed, key=detach_key)
    return forward, keyed


def _attempt_on(node: NodeHandle, tried: set[str]) -> None:
    """An attempt goes to ``node``: noted as tried, and named in the request's log line."""
    tried.add(node.node_id)
    structlog.contextvars.bind_contextvars(node_id=node.node_id)


def _retry_unbudgeted(forward: _Forward) -> None:
    """A later attempt (its forward already keyed) goes without a first-token budget."""
    if forward.request_id and isinstance(forward, node_pb2.NodeGenerateRequest):
        forward.first_token_budget_s = 0.0


def _detach_keyed(forward: _Forward, key: str) -> _Forward:
    """``forward`` with the caller's stable key (a detached generation's name)."""
    _retry_unbudgeted(forward)
    forward.request_id = key
    structlog.contextvars.bind_contextvars(job_key=key)
    return forward


@dataclass
class StreamStats:
    """What one generation produced, for usage, quotas and fairness."""

    generated: int = 0
    prompt_tokens: int = 0
    attempts: int = 0
    """Nodes it was sent to (a retry after a failure or stall before the first chunk: 2+)."""

    @property
    def dispatched(self) -> bool:
        return self.attempts > 0


class Dispatcher:
    """Sends validated requests to nodes and streams the answers back."""

    def __init__(
        self,
        nodes: NodeDirectory,
        metrics: SchedulerMetrics,
        *,
        max_attempts: int = 2,
        budget: RetryBudget | None = None,
        stall: StallPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nodes = nodes
        self._metrics = metrics
        self._max_attempts = max(1, max_attempts)
        self._clock = clock
        self.budget = budget or RetryBudget(clock)
        self.stalls = StallWatch(clock, stall or StallPolicy())
        self._sweeper: asyncio.Task[None] | None = None

    def _watch(self, node: NodeHandle, call: grpc.aio.Call) -> WatchedStream:
        """Watch a node call for stalls; the sweep runs while any stream is watched."""
        watched = self.stalls.watch(node.node_id, lambda: node.last_report_at, call.cancel)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="stall-sweep")
        return watched

    async def _sweep(self) -> None:
        while self.stalls.streams:
            await asyncio.sleep(self.stalls.policy.check_s)
            for stream in self.stalls.sweep():
                log.warning("node_stalled", node_id=stream.node_id, tokens=stream.tokens)

    async def close(self) -> None:
        """Stop the stall sweep (streams still watched end with their calls)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    def _after_stall(
        self,
        node: NodeHandle,
        sent: int,
        *,
        last: bool,
        req: inference_pb2.GenerateRequest,
        tried: set[str],
        affinity: str,
    ) -> NodeHandle:
        """A stalled call, cancelled by the sweep: the node is to blame. The node to retry on
        while nothing reached the client; else raise UNAVAILABLE ``NODE_STALLED``."""
        node.breaker.record_failure()
        self._metrics.dispatches.labels(node.node_id, "stalled").inc()
        retry = None if sent or last else self._retry_elsewhere(node, req, tried, affinity)
        if retry is None:
            raise Unavailable(
                f"node {node.node_id} stopped making progress after {sent} chunks",
                retry_after_s=NO_NODE_RETRY_S if not sent else None,
                reason="NODE_STALLED",
            )
        return retry

    def _retry_elsewhere(
        self,
        failed: NodeHandle,
        req: inference_pb2.GenerateRequest | inference_pb2.EmbedRequest,
        tried: set[str],
        affinity: str,
    ) -> NodeHandle | None:
        """The node to retry ``req`` on after ``failed`` (counted and logged), or None."""
        cls = WorkloadClass(req.workload_class)
        retry = self._retry_node(req.model, cls, tried, affinity)
        if retry is not None:
            self._metrics.retries.labels(failed.node_id).inc()
            log.info("request_retried", failed_node=failed.node_id, node_id=retry.node_id)
        return retry

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
        if fault is not Blame.REQUEST and not last:
            retry = self._retry_elsewhere(node, req, tried, affinity)
        if retry is None:
            raise RemoteError(exc, prefix=f"node {node.node_id}: ") from exc
        return retry

    def _redispatched(
        self,
        node: NodeHandle,
        cost: float,
        affinity: str,
        workload_class: WorkloadClass,
        model: str,
        prompt_tokens: int,
    ) -> None:
        """Book a retry on ``node``, its prompt in the node's prefill bucket."""
        self._nodes.dispatched(node, cost, affinity, workload_class, model, prompt_tokens)

    def _remaining(self, deadline: float) -> float:
        left = deadline - self._clock()
        if left <= 0:
            raise DeadlineExceeded("deadline passed before a node could take the request")
        return left

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_METADATA, context.request_id.get()),)

    def _failed(self, node: NodeHandle, exc: grpc.aio.AioRpcError) -> Blame:
        """Record a failed call (a breaker failure only when the node is to blame)."""
        fault = blame(exc)
        if fault is Blame.NODE:
            node.breaker.record_failure()
        self._metrics.dispatches.labels(node.node_id, exc.code().name.lower()).inc()
        log.warning(
            "node_call_failed",
            node_id=node.node_id,
            code=exc.code().name,
            blame=fault.value,
            error=exc.details(),
        )
        return fault

    def _midstream(self, node: NodeHandle, exc: grpc.aio.AioRpcError, sent: int) -> Exception:
        """The error ending a stream that already sent ``sent`` chunks to the client: the
        request's own error as it came; else UNAVAILABLE naming the node (never retried)."""
        fault = self._failed(node, exc)
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded("deadline passed while the node streamed")
        if fault is Blame.REQUEST:
            return RemoteError(exc, prefix=f"node {node.node_id}: ")
        return Unavailable(
            f"node {node.node_id} failed mid-stream after {sent} chunks: "
            f"{exc.code().name} {exc.details()}",
            reason="NODE_FAILED_MIDSTREAM",
        )

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

    def _relay(
        self,
        chunk: inference_pb2.GenerateChunk,
        node: NodeHandle,
        watched: WatchedStream,
        started: float,
        stats: StreamStats,
        timed_class: str,
    ) -> None:
        """Account for a chunk on its way to the client (the first one names the node);
        ``timed_class``: the class label its time per token is recorded under, empty for a
        stream paced on purpose (a job line's)."""
        first = not watched.first_chunk_at
        previous, now, tokens = watched.last_chunk_at, self._clock(), len(chunk.token_ids)
        watched.chunk(now, tokens)
        if first:
            chunk.node_id = node.node_id
            self._observe(node, "ttft", watched.first_chunk_at - started)
        elif timed_class and tokens:
            self._metrics.inter_token.labels(timed_class).observe((now - previous) / tokens)
            if timed_class == WorkloadClass.REALTIME.label:
                node.observe_token_gap(now - previous, tokens, now)
        stats.generated += len(chunk.token_ids)
        if chunk.usage.prompt_tokens:
            stats.prompt_tokens = chunk.usage.prompt_tokens

    def _succeeded(self, node: NodeHandle, watched: WatchedStream) -> None:
        node.breaker.record_success()
        self._metrics.dispatches.labels(node.node_id, "ok").inc()
        if watched.itl_s is not None:
            self._observe(node, "itl", watched.itl_s)

    async def generate(
        self,
        req: inference_pb2.GenerateRequest,
        tenant: str,
        deadline: float,
        first: NodeHandle,
        *,
        cost: float,
        affinity: str = "",
        prompt_tokens: int = 0,
        on_tokens: Callable[[int], None] = lambda _n: None,
        stats: StreamStats | None = None,
        adapter: str = "",
        detach_key: str = "",
        stream_interval_ms: int = 0,
        first_token_budget_s: float = 0.0,
    ) -> AsyncGenerator[inference_pb2.GenerateChunk, None]:
        """Stream a generation from ``first`` (booked by the gate), retrying elsewhere before
        the first chunk. ``detach_key``: the node keeps generating past this stream for a later
        call with that key (a job line); ``stream_interval_ms``: its chunk pacing (0: default);
        ``prompt_tokens``: the prompt's estimate (a retry node's prefill bucket); ``adapter``:
        ``"<owner>/<name>"``; ``first_token_budget_s``: what the TTFT target leaves its first
        token (0: nothing to spare). ``on_tokens`` is told of generated tokens as they come."""
        stats, tried = stats or StreamStats(), set[str]()
        cls = WorkloadClass.from_wire(req.workload_class)
        forward, keyed = _node_request(req, tenant, adapter, detach_key, stream_interval_ms)
        forward.step_budget_s = self._nodes.step_budget(cls)
        forward.first_token_budget_s = first_token_budget_s
        timed = "" if stream_interval_ms else cls.label
        node: NodeHandle | None = first
        self.budget.record_request()
        for attempt in range(self._max_attempts):
            assert node is not None
            _attempt_on(node, tried)
            self._metrics.in_flight.inc()
            stats.attempts += 1
            sent = 0
            started = self._clock()
            done = False
            call = watched = None
            retry: NodeHandle | None = None
            try:
                call = node.stub.Generate(
                    keyed(forward), timeout=self._remaining(deadline), metadata=self._metadata()
                )
                watched = self._watch(node, call)
                async for chunk in call:
                    self._relay(chunk, node, watched, started, stats, timed)
                    sent += 1
                    on_tokens(len(chunk.token_ids))
                    yield chunk
                done = True
                self._succeeded(node, watched)
                return
            except asyncio.CancelledError:
                if watched is None or not watched.stalled:
                    raise  # the caller went away
                last = attempt + 1 >= self._max_attempts
                retry = self._after_stall(
                    node, sent, last=last, req=req, tried=tried, affinity=affinity
                )
                self._redispatched(retry, cost, affinity, cls, req.model, prompt_tokens)
            except grpc.aio.AioRpcError as exc:
                if sent:
                    raise self._midstream(node, exc, sent) from exc
                last = attempt + 1 >= self._max_attempts
                retry = self._after_failure(
                    node, exc, last=last, req=req, tried=tried, affinity=affinity
                )
                self._redispatched(retry, cost, affinity, cls, req.model, prompt_tokens)
            finally:
                self._metrics.in_flight.dec()
                self._nodes.finished(node, cost if done else 0, cls)
                if watched is not None:
                    self.stalls.unwatch(watched)
                if call is not None and not call.done():
                    call.cancel()
            node = retry
        raise AssertionError("unreachable")  # pragma: no cover

    async def embed(
        self,
        req: inference_pb2.EmbedRequest,
        tenant: str,
        deadline: float,
        first: NodeHandle,
        *,
        cost: float,
    ) -> inference_pb2.EmbedResponse:
        """Embed on ``first`` (booked by the gate, as a generation's first node is), retrying
        elsewhere if the node fails. Each node tried holds a slot for the call; its end is
        booked here, without a throughput sample (embedding work says nothing of the decode
        rate admission predicts waits with)."""
        tried: set[str] = set()
        forward = node_pb2.NodeEmbedRequest(request=req, tenant=tenant)
        cls = WorkloadClass.from_wire(req.workload_class)
        node: NodeHandle | None = first
        self.budget.record_request()
        for attempt in range(self._max_attempts):
            assert node is not None
            _attempt_on(node, tried)
            self._metrics.in_flight.inc()
            retry, began = None, time.monotonic()
            try:
                reply: inference_pb2.EmbedResponse = await node.stub.Embed(
                    _keyed(forward), timeout=self._remaining(deadline), metadata=self._metadata()
                )
                self._nodes.embed_times.record(req.model, cls, time.monotonic() - began)
                node.breaker.record_success()
                self._metrics.dispatches.labels(node.node_id, "ok").inc()
                reply.node_id = node.node_id
                return reply
            except grpc.aio.AioRpcError as exc:
                last = attempt + 1 >= self._max_attempts
                retry = self._after_failure(node, exc, last=last, req=req, tried=tried, affinity="")
                self._nodes.dispatched(retry, cost, workload_class=cls)
            finally:
                self._metrics.in_flight.dec()
                self._nodes.finished(node, 0, cls)
            node = retry
        raise AssertionError("unreachable")  # pragma: no cover
