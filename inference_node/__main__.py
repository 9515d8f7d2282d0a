"""Composition root of an inference node: ``python -m inference_node [flags]``.

The first generation engine runs its loop on the process's main thread
(docs/decisions/node-engine-main-thread.md); asyncio (gRPC server, registry, metrics) runs on a
helper thread. SIGTERM/SIGINT, or a finished Drain RPC, drains and stops the node.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading

from sluice.runtime import affinity, grpc_io

grpc_io.configure()  # before grpc loads: the engine is read once

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector

from inference_node.app import NodeService, default_engine, load_models
from inference_node.config import NodeSettings
from inference_node.engine import run_with_engine
from sluice.runtime.runner import lower_cpu_priority, run_loop, settle_heap
from sluice.runtime.settings import parse_settings
from sluice.runtime.telemetry import MetricsServer, configure_logging

log = structlog.get_logger("inference_node")


class _StopSignal:
    """SIGTERM/SIGINT caught on the main thread, delivered to the event loop's thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._pending = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self._pending.set()
        if self._loop is not None and self._event is not None:
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        if self._pending.is_set():
            return
        await self._event.wait()


def keep_engine_cores() -> None:
    """Move this process's threads and its engines' unbound ones off the cores an engine bound
    its compute threads to (``NodeSettings.keep_engine_cores``)."""
    if not affinity.supported():
        return
    me = os.getpid()
    try:
        split = affinity.keep_engine_cores([me], [me])
    except Exception as exc:  # placement only: the node serves as well without it
        log.warning("engine_cores_not_kept", error=repr(exc))
        return
    if split.moved:
        log.info(
            "engine_cores_kept",
            engine_cores=sorted(split.engine),
            other_cores=sorted(split.others),
            threads_moved=split.moved,
        )


def main(argv: list[str]) -> None:
    """Load models, serve until SIGTERM/SIGINT or a finished Drain RPC, then exit."""
    settings = parse_settings(NodeSettings, argv, "Sluice inference node")
    configure_logging(settings.log_format, settings.log_level)
    if settings.cpu_nice:
        log.info("cpu_priority_lowered", nice=lower_cpu_priority(settings.cpu_nice))
    stop = _StopSignal()
    stop.install()
    generators, embedders = load_models(settings)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, open fds
    metrics = MetricsServer(registry, settings.metrics_host, settings.metrics_port)
    metrics.start()
    # Engines are built here; everything asyncio (gRPC server included) is built on the loop's
    # own thread inside serve(), since grpc.aio objects bind to the loop that creates them.
    engines = {name: default_engine(lm, settings) for name, lm in generators.items()}
    main_engine = next(iter(engines.values()), None)
    if settings.keep_engine_cores:
        keep_engine_cores()

    async def serve() -> None:
        service = NodeService(
            settings,
            registry,
            generators,
            embedders,
            engines=engines,
            metrics_address=metrics.address,
        )
        await service.start(main_engine_served_elsewhere=main_engine is not None)
        settle_heap()  # torch and the models: never rescanned by a full collection mid-run
        log.info(
            "service_ready",
            service="inference_node",
            address=service.address,
            metrics=metrics.address,
            node_id=service.node_id,
        )
        waiters = {
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(service.drained.wait()),
        }
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await service.stop()

    try:
        if main_engine is not None:
            run_with_engine(main_engine, serve)
        else:
            run_loop(serve())
    finally:
        metrics.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
