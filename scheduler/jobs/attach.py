"""Taking over a line another replica was generating: attach, do not generate it again.

A job line runs as a detached generation named by :func:`line_key`: its node finishes it even
when the replica streaming it dies. The replica records the node when the first chunk comes
(:meth:`scheduler.jobs.store.JobStore.record_node`); a replica that takes the line over asks
that node for the generation by its key (:func:`attach`, ``attach_only``: nothing new starts)
and gets it whole. When the node has none (it restarted, the generation was dropped) or is
gone, the line is generated again, as before.
"""

from __future__ import annotations

import time

import grpc
import structlog
from redis.exceptions import RedisError

from scheduler.jobs.store import Delivery, JobStore
from scheduler.nodes import NodeDirectory
from sluice.v1 import common_pb2, inference_pb2, jobs_pb2, node_pb2

log = structlog.get_logger(__name__)

COMPLETE = frozenset(
    {
        common_pb2.FINISH_REASON_EOS,
        common_pb2.FINISH_REASON_LENGTH,
        common_pb2.FINISH_REASON_STOP,
    }
)
"""Finish reasons of a generation that ran to its end."""


def line_key(job_id: str, entry_id: str) -> str:
    """The name of a line's generation on its node: the same for every delivery."""
    return f"{job_id}.{entry_id}"


async def attach(
    nodes: NodeDirectory,
    node_id: str,
    request: inference_pb2.GenerateRequest,
    tenant: str,
    key: str,
    timeout_s: float,
) -> jobs_pb2.GenerateResult | None:
    """The generation ``key`` names on ``node_id``, whole, or None when that node does not
    have it (or cannot be reached): the caller generates the line again."""
    node = nodes.get(node_id)
    if node is None or not node.healthy or timeout_s <= 0:
        return None
    forward = node_pb2.NodeGenerateRequest(
        request=request, tenant=tenant, request_id=key, detached=True, attach_only=True
    )
    parts: list[str] = []
    last: inference_pb2.GenerateChunk | None = None
    try:
        async for chunk in node.stub.Generate(forward, timeout=timeout_s):
            parts.append(chunk.text)
            last = chunk
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            log.info("job_line_attach_failed", node_id=node_id, code=exc.code().name)
        return None
    if last is None or last.finish_reason not in COMPLETE:
        return None  # cut off (a drained node): generate it again
    return jobs_pb2.GenerateResult(
        text="".join(parts),
        finish_reason=last.finish_reason,
        usage=last.usage,
        model=request.model,
    )


async def reattach(
    store: JobStore,
    nodes: NodeDirectory,
    tenant: str,
    request: inference_pb2.GenerateRequest,
    delivery: Delivery,
    deadline: float,
) -> tuple[jobs_pb2.GenerateResult | None, bool]:
    """A line taken over: the generation its last replica left running, if the node that
    replica recorded still has it (None: generate it again); and whether a node had started
    it (so generating it again computes it a second time)."""
    try:
        node_id = await store.line_node(delivery)
    except RedisError:
        return None, False
    if not node_id:
        return None, False
    key = line_key(delivery.job_id, delivery.entry_id)
    got = await attach(nodes, node_id, request, tenant, key, deadline - time.monotonic())
    if got is not None:
        log.info("job_line_reattached", job_id=delivery.job_id, node_id=node_id)
    else:
        log.info("job_line_regenerated", job_id=delivery.job_id, node_id=node_id)
    return got, True
