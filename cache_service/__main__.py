"""Composition root of the cache service: ``python -m cache_service [flags]``."""

from __future__ import annotations

import sys

from sluice.runtime import grpc_io

grpc_io.configure()  # before grpc loads: the engine is read once

from prometheus_client import CollectorRegistry

from cache_service.app import CacheService
from cache_service.config import CacheSettings
from sluice.runtime.runner import run_loop, run_service
from sluice.runtime.settings import parse_settings


def main(argv: list[str]) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully."""
    settings = parse_settings(CacheSettings, argv, "Sluice cache service")

    async def build(registry: CollectorRegistry, _metrics: str) -> CacheService:
        return CacheService(settings, registry)

    run_loop(run_service("cache", settings, build))


if __name__ == "__main__":
    main(sys.argv[1:])
