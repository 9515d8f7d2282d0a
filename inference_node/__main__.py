"""Composition root of an inference node: ``python -m inference_node [flags]``."""

from __future__ import annotations

import asyncio
import sys

import structlog
from prometheus_client import CollectorRegistry

from inference_node.app import NodeService, load_models
from inference_node.config import NodeSettings
from sluice.server import wait_for_signal
from sluice.settings import parse_settings
from sluice.telemetry import MetricsServer, configure_logging

log = structlog.get_logger("inference_node")


async def main(argv: list[str]) -> None:
    """Load models, serve until SIGTERM/SIGINT or a Drain RPC, then drain and exit."""
    settings = parse_settings(NodeSettings, argv, "Sluice inference node")
    configure_logging(settings.log_format, settings.log_level)
    generators, embedders = await asyncio.to_thread(load_models, settings)
    registry = CollectorRegistry()
    metrics = MetricsServer(registry, settings.metrics_host, settings.metrics_port)
    metrics.start()
    service = NodeService(
        settings, registry, generators, embedders, metrics_address=metrics.address
    )
    await service.start()
    log.info(
        "node_ready", node_id=service.node_id, address=service.address, metrics=metrics.address
    )
    signal_task = asyncio.create_task(wait_for_signal())
    drained = asyncio.create_task(service.drained.wait())
    await asyncio.wait({signal_task, drained}, return_when=asyncio.FIRST_COMPLETED)
    signal_task.cancel()
    drained.cancel()
    await service.stop()
    metrics.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
