"""Assembly of the scheduler: used by ``__main__`` and by the tests (in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import redis.asyncio as redis
import structlog
from prometheus_client import CollectorRegistry

from scheduler.adapters import AdapterDirectory, AdapterRecord, decode_record
from scheduler.admission import AdmissionConfig
from scheduler.background import BackgroundTasks
from scheduler.catalog import ModelCatalog
from scheduler.config import (
    SchedulerSettings,
    embed_targets,
    prefill_guard,
    step_budgets,
    ttft_targets,
)
from scheduler.dispatch import Dispatcher
from scheduler.gate import DispatchGate
from scheduler.jobs.finetune import FinetuneRunner
from scheduler.jobs.finetune_store import FinetuneStore
from scheduler.jobs.metrics import FinetuneMetrics, JobMetrics, JobStateCollector
from scheduler.jobs.service import JobsServicer as DurableJobsServicer
from scheduler.jobs.store import JobStore, jobs_redis, now_ms
from scheduler.jobs.worker import JobWorker
from scheduler.lifecycle import RequestPath
from scheduler.live_config import LiveTenants
from scheduler.metrics import LiveState, NodeGaugeRow, SchedulerMetrics
from scheduler.nodes import NodeDirectory
from scheduler.queues import QueueConfig
from scheduler.quotas import QuotaGate, quota_redis
from scheduler.response_cache import ResponseCache
from scheduler.retry_budget import RetryBudget
from scheduler.routing import OutlierConfig, OutlierDetector
from scheduler.server import AdminServicer, InferenceServicer, JobsServicer
from scheduler.tenants import TenantDirectory, TenantsDocumentError
from scheduler.usage import UsageBook, UsageCollector
from scheduler.validation import class_label
from sluice import __version__
from sluice.contract import ADAPTERS_PREFIX, NODES_PREFIX, SCHEDULERS_PREFIX
from sluice.runtime.breaker import BreakerConfig
from sluice.runtime.registry import PrefixView, Registration, etcd_client
from sluice.runtime.server import GrpcServer
from sluice.runtime.tls import Identity, Mesh, Role
from sluice.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    cache_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)

log = structlog.get_logger(__name__)

PUBLIC_SERVICES = [
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name,
]


def _decode_node(raw: bytes) -> common_pb2.NodeInfo:
    info = common_pb2.NodeInfo()
    info.ParseFromString(raw)
    return info


def _node_directory(
    view: PrefixView[common_pb2.NodeInfo], settings: SchedulerSettings, mesh: Mesh
) -> NodeDirectory:
    breaker = BreakerConfig(
        failure_threshold=settings.breaker_failures,
        open_s=settings.breaker_open_seconds,
        max_open_s=settings.breaker_max_open_seconds,
        failure_rate=settings.breaker_failure_rate,
        window_s=settings.breaker_window_seconds,
    )
    outliers = OutlierDetector(
        time.monotonic,
        OutlierConfig(factor=settings.outlier_factor, eject_s=settings.outlier_eject_seconds),
    )
    return NodeDirectory(
        view,
        breaker_config=breaker,
        outliers=outliers,
        mesh=mesh,
        low_class_headroom=settings.low_class_headroom,
        default_tokens_per_s=settings.default_tokens_per_s,
        step_budgets=step_budgets(settings),
        prefill_guard=prefill_guard(settings),
    )


def _dispatch_gate(
    nodes: NodeDirectory,
    tenants: TenantDirectory,
    metrics: SchedulerMetrics,
    settings: SchedulerSettings,
) -> DispatchGate:
    return DispatchGate(
        nodes,
        tenants,
        metrics,
        queue_config=QueueConfig(
            max_per_class=settings.max_queued_per_class,
            max_per_tenant=settings.max_queued_per_tenant,
            aging_s=settings.aging_seconds,
            prompt_token_weight=settings.prompt_token_weight,
            promote_lead_s=settings.promote_lead_seconds,
            promoted_hold_s=settings.promoted_hold_seconds,
        ),
        admission_config=AdmissionConfig(
            default_tokens_per_s=settings.default_tokens_per_s,
            realtime_max_wait_s=settings.realtime_max_wait_seconds,
            ttft_targets=ttft_targets(settings),
            embed_targets=embed_targets(settings),
            first_token_budgets=settings.first_token_budgets,
        ),
    )


def _tenants_file(settings: SchedulerSettings) -> TenantDirectory:
    """The tenants file's tenants; a bad file stops start-up, logged and raised naming the
    file and the field."""
    try:
        return TenantDirectory.from_yaml(settings.tenants_file)
    except TenantsDocumentError as exc:
        log.error("tenants_file_invalid", reason=exc.reason, field=exc.field, error=str(exc))
        raise


def _quota_gate(settings: SchedulerSettings, metrics: SchedulerMetrics) -> QuotaGate:
    client = (
        quota_redis(settings.redis_url, settings.quota_timeout_seconds)
        if settings.redis_url
        else None
    )
    return QuotaGate(client, metrics, fail_closed=settings.quota_fail_closed)


class SchedulerService:
    """The scheduler's parts, with an explicit start/stop lifecycle."""

    def __init__(
        self,
        settings: SchedulerSettings,
        registry: CollectorRegistry,
        tenants: TenantDirectory | None = None,
    ) -> None:
        self.settings = settings
        self.scheduler_id = settings.scheduler_id or f"scheduler-{uuid.uuid4().hex[:8]}"
        self.tenants = tenants or _tenants_file(settings)
        self.metrics = SchedulerMetrics(registry)
        mesh = settings.mesh()
        self.etcd = etcd_client(settings.etcd_endpoint, mesh=mesh)
        self.view: PrefixView[common_pb2.NodeInfo] = PrefixView(
            self.etcd, NODES_PREFIX, _decode_node
        )
        self.nodes = _node_directory(self.view, settings, mesh)
        self.adapter_view: PrefixView[AdapterRecord | None] = PrefixView(
            self.etcd, ADAPTERS_PREFIX, decode_record
        )
        self.usage = UsageBook()
        registry.register(UsageCollector(self.usage))
        self.gate = _dispatch_gate(self.nodes, self.tenants, self.metrics, settings)
        self.quotas = _quota_gate(settings, self.metrics)
        self.live_tenants = LiveTenants(self.etcd, self.tenants, self.tenants.all(), self.metrics)
        self.metrics.bind(LiveState(self.gate.queue_depths, self._node_rows))
        self._cache_channel = (
            mesh.channel(settings.cache_address, Identity(Role.CACHE))
            if settings.cache_address
            else None
        )
        self.dispatcher = Dispatcher(
            self.nodes,
            self.metrics,
            max_attempts=settings.max_attempts,
            budget=RetryBudget(time.monotonic, ratio=settings.retry_budget_ratio),
        )
        self.server = GrpcServer(
            "scheduler",
            settings.server_options(public=True),
            registry,
            authenticate=self._authenticate,
            guarded_services=PUBLIC_SERVICES,
        )
        self.job_worker: JobWorker | None = None
        self.finetune: FinetuneRunner | None = None
        self._jobs_redis: redis.Redis | None = None
        self._add_servicers(registry)
        self.registration: Registration | None = None
        self._serve_later: asyncio.Task[None] | None = None

    def _request_path(self) -> RequestPath:
        background = BackgroundTasks()
        stub = cache_pb2_grpc.CacheStub(self._cache_channel) if self._cache_channel else None
        return RequestPath(
            settings=self.settings,
            tenants=self.tenants,
            catalog=ModelCatalog(list(self.settings.models), self.nodes),
            cache=ResponseCache(
                stub,
                timeout_s=self.settings.cache_timeout_seconds,
                metrics=self.metrics,
                background=background,
            ),
            quotas=self.quotas,
            gate=self.gate,
            dispatcher=self.dispatcher,
            usage=self.usage,
            metrics=self.metrics,
            background=background,
            adapters=AdapterDirectory(self.adapter_view),
        )

    def _jobs(self, path: RequestPath, registry: CollectorRegistry) -> jobs_pb2_grpc.JobsServicer:
        """The Jobs service: durable jobs in Redis, or UNIMPLEMENTED without Redis."""
        if not (self.settings.jobs_enabled and self.settings.redis_url):
            return JobsServicer()
        self._jobs_redis = jobs_redis(self.settings.redis_url)
        store = JobStore(self._jobs_redis)
        metrics = JobMetrics(registry)
        worker = JobWorker(store, path, self.settings, metrics, self.scheduler_id, self.nodes)
        registry.register(JobStateCollector(lambda: _job_rows(worker)))
        self.job_worker = worker
        ft = FinetuneStore(self._jobs_redis)
        self.finetune = FinetuneRunner(
            store,
            ft,
            self.nodes,
            self.tenants,
            self.settings,
            FinetuneMetrics(registry),
            self.scheduler_id,
            self._register_adapter,
        )
        return DurableJobsServicer(path, store, worker, metrics, self.finetune, ft)

    async def _register_adapter(self, record: AdapterRecord) -> None:
        """Serve a fine-tune's adapter: its record in etcd (the replicas' adapter views)."""
        await self.etcd.put(record.key.encode(), record.encode())

    def _add_servicers(self, registry: CollectorRegistry) -> None:
        path = self._request_path()
        inference = InferenceServicer(path)
        admin = AdminServicer(
            nodes=self.nodes,
            usage=self.usage,
            tenants=self.tenants,
            gate=self.gate,
            scheduler_id=self.scheduler_id,
            default_tokens_per_s=self.settings.default_tokens_per_s,
        )
        inference_service, admin_service, jobs_service = PUBLIC_SERVICES
        self.server.add(
            inference_pb2_grpc.add_InferenceServicer_to_server, inference, inference_service
        )
        self.server.add(admin_pb2_grpc.add_AdminServicer_to_server, admin, admin_service)
        self.server.add(
            jobs_pb2_grpc.add_JobsServicer_to_server, self._jobs(path, registry), jobs_service
        )

    def _authenticate(self, key: str) -> str | None:
        tenant = self.tenants.authenticate(key)
        return tenant.name if tenant else None

    def _node_rows(self) -> list[NodeGaugeRow]:
        return [
            NodeGaugeRow(
                n.node_id,
                n.breaker.state.value,
                self.nodes.outliers.ejected(n.node_id),
                n.score(),
                n.book.sequences(),
                n.book.reported_tokens + n.book.tokens_sent_since_report,
            )
            for n in self.nodes.nodes()
        ]

    @property
    def address(self) -> str:
        """``host:port`` of the public gRPC server."""
        return self.server.address

    async def start(self) -> None:
        """Follow the registry, start serving, then announce this replica in etcd.

        With etcd up, the tenants key and the node view are read before the port opens
        ``SERVING``, as always. With etcd down (or silent for ``etcd_start_wait_seconds``) the
        port opens anyway, ``NOT_SERVING`` (logged with the reason); reading and registering go
        on in the background, and health turns ``SERVING`` once the node view is read. Nothing
        here waits without a bound. A later etcd outage does not flip health: the replica keeps
        serving from its last view (it follows each node directly too).
        """
        wait = self.settings.etcd_start_wait_seconds
        _, synced, _ = await asyncio.gather(
            self.live_tenants.start(within_s=wait),
            self.view.start(within_s=wait),
            self.adapter_view.start(within_s=wait),
        )
        self.nodes.start()
        await self.gate.start()
        self.view.subscribe(lambda _n, _v: self._count_nodes())
        self._count_nodes()
        if synced:
            await self.server.start()
        else:
            await self.server.start(serving=False, reason="etcd_unavailable")
            log.warning(
                "scheduler_not_serving",
                reason="etcd_unavailable",
                etcd=self.settings.etcd_endpoint,
                error=self.view.last_error or f"no answer within {wait}s",
            )
            self._serve_later = asyncio.create_task(self._serve_once_synced(), name="serve")
        info = common_pb2.SchedulerInfo(
            scheduler_id=self.scheduler_id, address=self.address, version=__version__
        )
        self.registration = Registration(
            self.etcd,
            SCHEDULERS_PREFIX + self.scheduler_id,
            info.SerializeToString(),
            self.settings.registry_ttl_seconds,
        )
        await self.registration.start(retry_in_background=True)
        if self.job_worker is not None:
            await self.job_worker.start()
        if self.finetune is not None:
            await self.finetune.start()

    async def _serve_once_synced(self) -> None:
        await self.view.synced.wait()
        await self.server.set_serving(True, reason="etcd_available")

    def _count_nodes(self) -> None:
        nodes = self.nodes.nodes()
        serving = sum(n.info.state == common_pb2.NODE_STATE_SERVING for n in nodes)
        self.metrics.nodes.labels("serving").set(serving)
        self.metrics.nodes.labels("draining").set(len(nodes) - serving)

    async def stop(self, grace_s: float | None = None) -> None:
        """Leave the registry, finish in-flight calls, close every channel."""
        if self._serve_later is not None:
            self._serve_later.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve_later
        if self.registration is not None:
            await self.registration.stop()
        if self.job_worker is not None:
            await self.job_worker.stop()
        if self.finetune is not None:
            await self.finetune.stop()
        await self.gate.stop()
        await self.server.stop(grace_s)
        await self.dispatcher.close()
        await self.live_tenants.stop()
        await self.view.stop()
        await self.adapter_view.stop()
        await self.quotas.close()
        await self.nodes.close()
        if self._cache_channel is not None:
            await self._cache_channel.close()
        await self.etcd.close()
        if self._jobs_redis is not None:
            await self._jobs_redis.aclose()


def _job_rows(worker: JobWorker) -> list[tuple[str, str, str, float]]:
    """The worker's view of the jobs not final, for the jobs gauges."""
    names: dict[int, str] = {
        jobs_pb2.JOB_STATE_QUEUED: "queued",
        jobs_pb2.JOB_STATE_RUNNING: "running",
        jobs_pb2.JOB_STATE_CANCELLING: "cancelling",
    }
    now = now_ms()
    return [
        (
            names.get(r.state, "queued"),
            class_label(r.workload_class),
            r.tenant,
            max(0.0, (now - r.created_ms) / 1000),
        )
        for r in worker.records.values()
    ]
