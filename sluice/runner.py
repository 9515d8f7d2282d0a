"""The shared composition-root loop of every service's ``__main__``.

Configure logging once, serve ``/metrics``, build and start the service, wait for SIGTERM /
SIGINT (or a service-specific event, such as a node finishing a drain), then stop gracefully.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog
from prometheus_client import CollectorRegistry

from sluice.server import wait_for_signal
from sluice.settings import ServiceSettings
from sluice.telemetry import MetricsServer, configure_logging

log = structlog.get_logger(__name__)


class Service(Protocol):
    """What ``run_service`` drives."""

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC server once started."""
        ...

    async def start(self) -> None:
        """Start serving."""
        ...

    async def stop(self) -> None:
        """Stop gracefully."""
        ...


async def run_service(
    name: str,
    settings: ServiceSettings,
    build: Callable[[CollectorRegistry, str], Awaitable[Service]],
    *,
    until: Callable[[Service], Awaitable[object]] | None = None,
) -> None:
    """Run one service until a stop signal (or ``until(service)`` returns), then stop it.

    ``build(registry, metrics_address)`` constructs the service with the metrics registry it
    records into and the address its ``/metrics`` endpoint is served on.
    """
    configure_logging(settings.log_format, settings.log_level)
    registry = CollectorRegistry()
    metrics = MetricsServer(registry, settings.metrics_host, settings.metrics_port)
    metrics.start()
    try:
        service = await build(registry, metrics.address)
        await service.start()
        log.info("service_ready", service=name, address=service.address, metrics=metrics.address)
        waiters: set[asyncio.Future[object]] = {asyncio.ensure_future(wait_for_signal())}
        if until is not None:
            waiters.add(asyncio.ensure_future(until(service)))
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await service.stop()
    finally:
        metrics.stop()
