"""Composition root of the cache service: ``python -m cache_service [flags]``."""

from __future__ import annotations

import asyncio
import sys

import structlog
from prometheus_client import CollectorRegistry

from cache_service.app import CacheService
from cache_service.config import CacheSettings
from sluice.server import wait_for_signal
from sluice.settings import parse_settings
from sluice.telemetry import MetricsServer, configure_logging

log = structlog.get_logger("cache_service")


async def main(argv: list[str]) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    settings = parse_settings(CacheSettings, argv, "Sluice cache service")
    configure_logging(settings.log_format, settings.log_level)
    registry = CollectorRegistry()
    metrics = MetricsServer(registry, settings.metrics_host, settings.metrics_port)
    metrics.start()
    service = CacheService(settings, registry)
    await service.start()
    log.info("cache_ready", address=service.address, metrics=metrics.address)
    await wait_for_signal()
    await service.stop()
    metrics.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
