"""Composition root of an inference node: ``python -m inference_node [flags]``."""

from __future__ import annotations

import asyncio
import sys

from prometheus_client import CollectorRegistry

from inference_node.app import NodeService, load_models
from inference_node.config import NodeSettings
from sluice.runner import Service, run_service
from sluice.settings import parse_settings


def main(argv: list[str]) -> None:
    """Load models, serve until SIGTERM/SIGINT or a finished Drain RPC, then exit."""
    settings = parse_settings(NodeSettings, argv, "Sluice inference node")

    async def build(registry: CollectorRegistry, metrics_address: str) -> NodeService:
        generators, embedders = await asyncio.to_thread(load_models, settings)
        return NodeService(
            settings, registry, generators, embedders, metrics_address=metrics_address
        )

    async def drained(service: Service) -> None:
        assert isinstance(service, NodeService)
        await service.drained.wait()

    asyncio.run(run_service("inference_node", settings, build, until=drained))


if __name__ == "__main__":
    main(sys.argv[1:])
