"""Servicers of the scheduler's public services: Inference, Admin and (not yet) Jobs.

Thin adapters: they read what gRPC carries (the verified tenant, the deadline) and hand the
request to the transport-free core; a Generate or Embed request's steps are in
:mod:`scheduler.lifecycle`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import grpc

from scheduler.embed_flow import EmbedFlow
from scheduler.gate import DispatchGate
from scheduler.lifecycle import GenerateFlow, RequestPath, authorize
from scheduler.nodes import NodeDirectory
from scheduler.tenants import TenantDirectory
from scheduler.usage import UsageBook
from sluice import limits
from sluice.contract import WorkloadClass
from sluice.runtime import context
from sluice.runtime.errors import InvalidArgument, NotFound, PermissionDenied, Unimplemented
from sluice.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc, jobs_pb2_grpc


def _caller_deadline(ctx: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on this process's monotonic clock, or None when it has none."""
    remaining = ctx.time_remaining()
    return None if remaining is None else time.monotonic() + float(remaining)


def _refuse(violations: limits.Violations) -> None:
    if violations:
        raise InvalidArgument(violations)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """``sluice.v1.Inference``: Generate and Embed."""

    def __init__(self, path: RequestPath) -> None:
        self._path = path

    async def Generate(
        self, request: inference_pb2.GenerateRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        flow = GenerateFlow(
            self._path,
            request,
            tenant=context.tenant.get(),
            deadline=_caller_deadline(ctx),
            metadata=ctx.invocation_metadata(),
        )
        async with contextlib.aclosing(flow.run()) as chunks:
            async for chunk in chunks:
                yield chunk

    async def Embed(
        self, request: inference_pb2.EmbedRequest, ctx: grpc.aio.ServicerContext
    ) -> inference_pb2.EmbedResponse:
        flow = EmbedFlow(
            self._path,
            request,
            tenant=context.tenant.get(),
            deadline=_caller_deadline(ctx),
            metadata=ctx.invocation_metadata(),
        )
        return await flow.run()


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """``sluice.v1.Admin``: the fleet and tenant usage as this replica sees them."""

    def __init__(
        self,
        *,
        nodes: NodeDirectory,
        usage: UsageBook,
        tenants: TenantDirectory,
        gate: DispatchGate,
        scheduler_id: str,
        default_tokens_per_s: float,
    ) -> None:
        self._nodes = nodes
        self._usage = usage
        self._tenants = tenants
        self._gate = gate
        self._scheduler_id = scheduler_id
        self._default_rate = default_tokens_per_s

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, ctx: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        _refuse(limits.metadata_violations(ctx.invocation_metadata()))
        if not authorize(self._tenants, context.tenant.get()).admin:
            raise PermissionDenied("only an admin tenant may list the nodes")
        circuit = {
            "closed": admin_pb2.CIRCUIT_STATE_CLOSED,
            "open": admin_pb2.CIRCUIT_STATE_OPEN,
            "half_open": admin_pb2.CIRCUIT_STATE_HALF_OPEN,
        }
        outliers = self._nodes.outliers
        return admin_pb2.ListNodesResponse(
            nodes=[
                admin_pb2.NodeStatus(
                    info=n.info,
                    healthy=n.healthy,
                    circuit=circuit[n.breaker.state.value],
                    load=n.load,
                    in_flight=n.in_flight,
                    ejected=outliers.ejected(n.node_id),
                    load_score=n.score(),
                    estimated_sequences=n.book.sequences(),
                    ttft_seconds=outliers.latency(n.node_id, "ttft"),
                    inter_token_seconds=outliers.latency(n.node_id, "itl"),
                    service_tokens_per_second=n.service_rate(self._default_rate),
                )
                for n in self._nodes.nodes()
            ]
        )

    async def GetTenantUsage(
        self, request: admin_pb2.GetTenantUsageRequest, ctx: grpc.aio.ServicerContext
    ) -> admin_pb2.TenantUsage:
        _refuse(
            limits.tenant_name_violations("tenant", request.tenant)
            + limits.metadata_violations(ctx.invocation_metadata())
        )
        own = authorize(self._tenants, context.tenant.get())
        name = request.tenant or own.name
        if name != own.name and not own.admin:
            raise PermissionDenied("a tenant may only read its own usage")
        tenant = self._tenants.get(name)
        if tenant is None:
            raise NotFound(f"no tenant {name!r}")
        usage = self._usage.of(name).to_proto(name)
        usage.queued = sum(self._gate.queues.depth(c, name) for c in WorkloadClass)
        usage.weight = tenant.weight
        q = tenant.quotas
        usage.quotas.CopyFrom(
            admin_pb2.TenantQuotas(
                requests_per_second=q.requests_per_second,
                burst=q.bucket_size if q.requests_per_second else 0,
                tokens_per_minute=q.tokens_per_minute,
                max_concurrent=q.max_concurrent,
            )
        )
        usage.scheduler_id = self._scheduler_id
        return usage


class JobsServicer(jobs_pb2_grpc.JobsServicer):
    """``sluice.v1.Jobs``: defined in the contract; answers UNIMPLEMENTED until jobs land."""

    async def _unimplemented(self, *_: object) -> None:
        raise Unimplemented("jobs are not implemented yet in this release")

    SubmitJob = GetJob = CancelJob = ListJobs = _unimplemented

    async def WatchJob(self, *_: object) -> AsyncIterator[object]:
        raise Unimplemented("jobs are not implemented yet in this release")
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are
