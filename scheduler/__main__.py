"""Composition root of the scheduler: ``python -m scheduler [flags]``."""

from __future__ import annotations

import sys

from sluice.runtime import grpc_io

grpc_io.configure()  # before grpc loads: the engine is read once

from prometheus_client import CollectorRegistry

from scheduler.app import SchedulerService
from scheduler.config import SchedulerSettings
from scheduler.tenants import TenantsDocumentError
from sluice.runtime.runner import run_loop, run_service
from sluice.runtime.settings import parse_settings


def main(argv: list[str]) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully."""
    settings = parse_settings(SchedulerSettings, argv, "Sluice scheduler (public front door)")

    async def build(registry: CollectorRegistry, _metrics: str) -> SchedulerService:
        return SchedulerService(settings, registry)

    try:
        run_loop(run_service("scheduler", settings, build))
    except TenantsDocumentError as exc:  # logged as tenants_file_invalid; no traceback
        sys.exit(f"scheduler: {exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
