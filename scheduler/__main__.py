"""Composition root of the scheduler: ``python -m scheduler [flags]``."""

from __future__ import annotations

import asyncio
import sys

import structlog
from prometheus_client import CollectorRegistry

from scheduler.app import SchedulerService
from scheduler.config import SchedulerSettings
from sluice.server import wait_for_signal
from sluice.settings import parse_settings
from sluice.telemetry import MetricsServer, configure_logging

log = structlog.get_logger("scheduler")


async def main(argv: list[str]) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    settings = parse_settings(SchedulerSettings, argv, "Sluice scheduler (public front door)")
    configure_logging(settings.log_format, settings.log_level)
    registry = CollectorRegistry()
    metrics = MetricsServer(registry, settings.metrics_host, settings.metrics_port)
    metrics.start()
    service = SchedulerService(settings, registry)
    await service.start()
    log.info("scheduler_ready", address=service.address, metrics=metrics.address)
    await wait_for_signal()
    await service.stop()
    metrics.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
