"""Live tenants: follow the etcd key ``/sluice/config/tenants`` and apply it without restart.

The value is the tenants document (YAML or JSON, the schema of the tenants file). A valid
value replaces every tenant at once; an invalid one is logged (``tenant_config_invalid``) and
ignored, keeping the last good set; deleting the key returns to the tenants file. The watch
is :class:`sluice.runtime.registry.PrefixView`, so it survives etcd restarts and resynchronises.
"""

from __future__ import annotations

import aetcd
import structlog
import yaml

from scheduler.metrics import SchedulerMetrics
from scheduler.tenants import Tenant, TenantDirectory, parse_tenants
from sluice.runtime.registry import PrefixView

log = structlog.get_logger(__name__)

TENANTS_KEY = "/sluice/config/tenants"


def _raw(value: bytes) -> bytes:
    return value


class LiveTenants:
    """Applies ``/sluice/config/tenants`` to a :class:`TenantDirectory` as it changes."""

    def __init__(
        self,
        etcd: aetcd.Client,
        directory: TenantDirectory,
        fallback: list[Tenant],
        metrics: SchedulerMetrics,
    ) -> None:
        self._directory = directory
        self._fallback = fallback
        self._metrics = metrics
        # A prefix view of the exact key: other keys sharing the prefix are ignored below.
        self._view: PrefixView[bytes] = PrefixView(etcd, TENANTS_KEY, _raw)
        self.applied_revision = 0
        """How many documents were applied (tests wait on it)."""

    async def start(self) -> None:
        """Read the key (if present), apply it, and follow it."""
        self._view.subscribe(self._on_change)
        await self._view.start()  # the first full read calls _on_change for a present key

    async def stop(self) -> None:
        """Stop following."""
        await self._view.stop()

    def _on_change(self, name: str, value: bytes | None) -> None:
        if name != "":
            return
        if value is None:
            self._directory.replace(self._fallback)
            self._metrics.tenant_reloads.labels("removed").inc()
            self.applied_revision += 1
            log.info("tenant_config_removed", tenants=len(self._fallback))
            return
        self._apply(value)

    def _apply(self, value: bytes) -> None:
        try:
            tenants = parse_tenants(value.decode())
        except (ValueError, yaml.YAMLError) as exc:  # pydantic's errors are ValueErrors
            self._metrics.tenant_reloads.labels("invalid").inc()
            log.warning("tenant_config_invalid", key=TENANTS_KEY, error=str(exc)[:500])
            return
        self._directory.replace(tenants)
        self._metrics.tenant_reloads.labels("applied").inc()
        self.applied_revision += 1
        log.info("tenant_config_applied", key=TENANTS_KEY, tenants=len(tenants))
