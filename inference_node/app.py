"""Assembly of an inference node: used by ``__main__`` and by the tests (in-process).

Lifecycle: ``load_models`` (blocking, seconds) → ``start`` (engines, gRPC server, registry) →
``drain`` (DRAINING in etcd and health, refuse new work, finish in-flight, revoke the lease) →
``stop``.

etcd down at start: the port opens anyway and the node answers direct calls, but health says
``NOT_SERVING`` (reason ``etcd_unavailable``) until the registration, retried in the
background, succeeds: schedulers find nodes only through etcd, so a node not registered is not
part of the fleet yet. A later loss of the lease does not flip health (the keepalive registers
again).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable

import structlog
from prometheus_client import CollectorRegistry

from inference_node.adapters import AdapterCache, AdapterStore
from inference_node.config import NodeSettings
from inference_node.embed_batcher import EmbedBatcher
from inference_node.embed_sizer import BatchSizer
from inference_node.engine import build_engine
from inference_node.engine.llama import supports
from inference_node.engine.types import Engine
from inference_node.gpu import GpuProbe
from inference_node.metrics import EngineCollector, NodeMetrics, TrainingMetrics
from inference_node.model_types import Embedder, LanguageModel
from inference_node.models import is_embedder, is_generator, load_embedder, load_language_model
from inference_node.server import NodeServicer
from inference_node.torch_threads import default_workers, threads_each
from inference_node.train_service import TrainService
from inference_node.training import DirectoryCheckpointStore, GapConfig
from sluice import __version__
from sluice.contract import NODES_PREFIX
from sluice.runtime.registry import Registration, etcd_client
from sluice.runtime.server import GrpcServer
from sluice.runtime.tls import CallerCheck, Role
from sluice.v1 import common_pb2, node_pb2, node_pb2_grpc

log = structlog.get_logger(__name__)

NODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name


def default_engine(lm: LanguageModel, settings: NodeSettings) -> Engine:
    """The engine a node runs unless told otherwise (continuous batching where supported,
    with a cache of ``settings.adapter_cache_bytes`` of LoRA adapters from the store), or
    vLLM's with ``--engine vllm``."""
    if settings.engine == "vllm":
        return _vllm_engine(lm, settings)
    adapters = None
    if settings.adapter_cache_bytes > 0 and supports(lm):
        store = AdapterStore(settings.adapters_dir)
        adapters = AdapterCache(store, lm, settings.adapter_cache_bytes)
    return build_engine(
        lm,
        max_sequences=settings.max_sequences,
        max_batched_tokens=settings.max_batched_tokens,
        kv_budget_bytes=settings.memory_budget_bytes,
        max_waiting=settings.max_waiting,
        adapters=adapters,
    )


def training_metrics(registry: CollectorRegistry, models: Iterable[str]) -> TrainingMetrics:
    """The node's training counters, every model's series at 0 from the start."""
    metrics = TrainingMetrics(registry)
    metrics.start_at_zero(models)
    return metrics


def _vllm_engine(lm: LanguageModel, settings: NodeSettings) -> Engine:
    """vLLM's engine for ``lm``, on the Hugging Face directory it was loaded from (imports
    vLLM: only a node started with ``--engine vllm`` does)."""
    from inference_node.engine.vllm_engine import VllmEngine  # noqa: PLC0415
    from inference_node.engine.vllm_mapping import VllmOptions, checkpoint_dir  # noqa: PLC0415

    model_path = settings.model_path if lm.name == settings.models[0] else None
    options = VllmOptions(
        model_dir=checkpoint_dir(lm.name, model_path, settings.model_cache_dir),
        dtype=str(lm.dtype).removeprefix("torch."),
        max_sequences=settings.max_sequences,
        max_batched_tokens=settings.max_batched_tokens,
        kv_budget_bytes=settings.memory_budget_bytes,
        max_waiting=settings.max_waiting,
        prefix_caching=settings.vllm_prefix_caching,
        pace=settings.vllm_pace,
    )
    return VllmEngine(lm, options)


def gap_config(settings: NodeSettings) -> GapConfig:
    """When a node's fine-tunes may run (inference_node/training/gaps.py)."""
    return GapConfig(
        yield_bound_s=settings.training_yield_bound_ms / 1000,
        itl_budget_s=settings.training_itl_budget_ms / 1000,
        itl_share=settings.training_itl_share,
        concurrent=settings.training_concurrency == "thread"
        or (settings.training_concurrency == "auto" and settings.device == "cuda"),
        duty=settings.training_duty,
    )


def embed_batcher(
    settings: NodeSettings, metrics: NodeMetrics, *, embedders: bool, beside_generator: bool
) -> EmbedBatcher:
    """The node's embedding threads (``settings.embed_workers``, 0: :func:`default_workers`
    for a node with ``embedders`` loaded, ``beside_generator`` or not; one for a node with
    none), merging concurrent Embed calls up to a batch size it measures its way to for each
    model (``settings.embed_*``), each forward's size into ``metrics``."""

    def new_sizer() -> BatchSizer:
        return BatchSizer(
            max_size=settings.embed_max_batch,
            latency_bound_s=settings.embed_batch_latency_ms / 1000,
        )

    auto = default_workers(settings.device, beside_generator) if embedders else 1
    workers = settings.embed_workers or auto
    return EmbedBatcher(
        new_sizer,
        max_wait_s=settings.embed_max_wait_ms / 1000,
        on_batch=lambda model, texts: metrics.embed_batch_size.labels(model).observe(texts),
        lower_forward_s=settings.embed_lower_class_forward_ms / 1000 or None,
        workers=workers,
        threads=threads_each(workers),
    )


def load_models(settings: NodeSettings) -> tuple[dict[str, LanguageModel], dict[str, Embedder]]:
    """Load every model ``settings.models`` names (blocking: run it before serving)."""
    generators: dict[str, LanguageModel] = {}
    embedders: dict[str, Embedder] = {}
    for name in settings.models:
        started = time.perf_counter()
        if is_embedder(name):
            embedders[name] = load_embedder(name, device=settings.device, dtype=settings.dtype)
        elif is_generator(name) or (settings.model_path is not None and not generators):
            generators[name] = load_language_model(
                name,
                device=settings.device,
                dtype=settings.dtype,
                cache_dir=settings.model_cache_dir,
                model_path=settings.model_path if not generators else None,
            )
        else:
            raise ValueError(f"unknown model {name!r} (and no --model-path given)")
        log.info("model_loaded", model=name, seconds=round(time.perf_counter() - started, 2))
    return generators, embedders


class NodeService:
    """An inference node's parts, with an explicit lifecycle."""

    def __init__(
        self,
        settings: NodeSettings,
        registry: CollectorRegistry,
        generators: dict[str, LanguageModel],
        embedders: dict[str, Embedder],
        *,
        engines: dict[str, Engine] | None = None,
        metrics_address: str = "",
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id or f"node-{uuid.uuid4().hex[:8]}"
        self.engines: dict[str, Engine] = engines or {
            n: default_engine(lm, settings) for n, lm in generators.items()
        }
        self._generators = generators
        self._embedders = embedders
        self._metrics_address = metrics_address
        self.draining = False
        self.drained = asyncio.Event()
        """Set once a drain has finished (the node may exit)."""
        self._drain_task: asyncio.Task[None] | None = None
        self.etcd = etcd_client(settings.etcd_endpoint, mesh=settings.mesh())
        self.registration: Registration | None = None
        self._serve_later: asyncio.Task[None] | None = None
        gpu = GpuProbe(settings.device)
        served = {n: (lm, self.engines[n]) for n, lm in generators.items()}
        self.training = TrainService(
            self.node_id,
            served,
            pools=settings.pools,
            checkpoints=DirectoryCheckpointStore(
                settings.checkpoint_dir, keep=settings.checkpoints_kept
            ),
            adapters=AdapterStore(settings.adapters_dir),
            gaps=gap_config(settings),
            metrics=training_metrics(registry, generators),
            is_draining=lambda: self.draining,
        )
        self.server = GrpcServer(
            "inference_node",
            settings.server_options(quiet_methods=("/sluice.v1.Node/StreamLoad",)),
            registry,
            callers=CallerCheck({NODE_SERVICE: [Role.SCHEDULER]}),
        )
        metrics = NodeMetrics(registry)
        self.servicer = NodeServicer(
            self.node_id,
            served,
            embedders,
            metrics,
            embeds=embed_batcher(
                settings, metrics, embedders=bool(embedders), beside_generator=bool(generators)
            ),
            is_draining=lambda: self.draining,
            start_drain=self._start_drain,
            load_interval_s=settings.load_report_interval_ms / 1000,
            stream_interval_s=settings.stream_interval_ms / 1000,
            detached_retain_s=settings.detached_retain_seconds,
            gpu=gpu,
            training=self.training,
        )
        registry.register(
            EngineCollector(lambda: {n: e.stats() for n, e in self.engines.items()}, gpu)
        )
        self.server.add(
            node_pb2_grpc.add_NodeServicer_to_server,
            self.servicer,
            NODE_SERVICE,
        )

    @property
    def address(self) -> str:
        """``host:port`` published in the registry."""
        host = self.settings.advertise_host or self.settings.host
        return f"{host}:{self.settings.advertise_port or self.server.port}"

    def info(self) -> common_pb2.NodeInfo:
        """What the node publishes about itself."""
        s = self.settings
        models = [
            common_pb2.ModelInfo(
                name=n,
                kind=common_pb2.MODEL_KIND_GENERATE,
                max_context_tokens=lm.max_context_tokens,
                chat=lm.chat,
                paces_prompts=self.engines[n].paces_prompts,
            )
            for n, lm in self._generators.items()
        ] + [
            common_pb2.ModelInfo(
                name=n, kind=common_pb2.MODEL_KIND_EMBED, max_context_tokens=e.max_tokens
            )
            for n, e in self._embedders.items()
        ]
        return common_pb2.NodeInfo(
            node_id=self.node_id,
            address=self.address,
            models=models,
            pools=list(s.pools),
            capacity=common_pb2.Capacity(
                max_sequences=s.max_sequences,
                max_batched_tokens=s.max_batched_tokens,
                memory_budget_bytes=s.memory_budget_bytes,
            ),
            version=__version__,
            state=common_pb2.NODE_STATE_DRAINING
            if self.draining
            else common_pb2.NODE_STATE_SERVING,
            metrics_address=self._metrics_address,
            device=s.device,
            started_at_unix_ms=int(time.time() * 1000),
        )

    @property
    def main_engine(self) -> Engine | None:
        """The engine ``__main__`` serves on the process's main thread (the first one)."""
        return next(iter(self.engines.values()), None)

    async def start(self, *, main_engine_served_elsewhere: bool = False) -> None:
        """Start the engines (each on its own thread, except the main engine when the caller
        serves it) and the server, then register in etcd. The embedders' kernels are built
        first on an embedding thread (:meth:`EmbedBatcher.warm`, about 2 s for MiniLM in bf16
        here), not awaited: generation is served meanwhile, and an Embed arriving then waits
        behind it, as it would behind a forward."""
        self.servicer.embeds.warm(self._embedders.values())
        for engine in self.engines.values():
            if not (main_engine_served_elsewhere and engine is self.main_engine):
                engine.start()
        # NOT_SERVING until registered: with etcd up that is a few milliseconds, and no
        # scheduler watches this node's health before it finds it in etcd.
        await self.server.start(serving=False, reason="registering")
        self.registration = Registration(
            self.etcd,
            NODES_PREFIX + self.node_id,
            self.info().SerializeToString(),
            self.settings.registry_ttl_seconds,
        )
        if await self.registration.start(retry_in_background=True):
            await self._serve_registered()
            return
        log.warning(
            "node_not_serving",
            node_id=self.node_id,
            reason="etcd_unavailable",
            etcd=self.settings.etcd_endpoint,
            error=self.registration.last_error,
        )
        self._serve_later = asyncio.create_task(self._serve_once_registered(self.registration))

    async def _serve_once_registered(self, registration: Registration) -> None:
        await registration.registered.wait()
        await self._serve_registered()

    async def _serve_registered(self) -> None:
        log.info("node_registered", node_id=self.node_id, address=self.address)
        if not self.draining:
            await self.server.set_serving(True, reason="registered")

    def _start_drain(self, grace_s: float) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(
                self.drain(grace_s or self.settings.drain_grace_seconds)
            )

    async def drain(self, grace_s: float | None = None) -> None:
        """Go DRAINING (registry and health), finish in-flight work, then leave the registry."""
        if self.draining:
            return
        self.draining = True
        grace = self.settings.drain_grace_seconds if grace_s is None else grace_s
        log.info("node_draining", node_id=self.node_id, in_flight=self.servicer.in_flight)
        self.training.stop("draining")  # at once: the scheduler resumes it on another node
        await self.server.set_serving(False)
        if self.registration is not None:
            try:
                await self.registration.update(self.info().SerializeToString())
            except Exception as exc:
                log.warning("drain_registry_update_failed", error=repr(exc))
        await asyncio.gather(*(e.drain(grace) for e in self.engines.values()))
        if self.registration is not None:
            await self.registration.stop()
        self.drained.set()
        log.info("node_drained", node_id=self.node_id)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain (if not yet), stop serving, stop the engines."""
        if self._drain_task is not None:
            await self._drain_task
        else:
            await self.drain(grace_s)
        await self.server.stop(1.0)
        await self.servicer.detached.close()
        self._close()
        await self.etcd.close()

    async def crash(self) -> None:
        """Fault injection: die without deregistering (the lease expires on its own)."""
        if self.registration is not None:
            self.registration.abandon()
        await self.server.stop(0)
        await self.servicer.detached.close()
        self._close()
        await self.etcd.close()

    def _close(self) -> None:
        if self._serve_later is not None:
            self._serve_later.cancel()
        for engine in self.engines.values():
            engine.close()
        self.servicer.close()
