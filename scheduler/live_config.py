"""Live tenants: follow the etcd key ``/sluice/config/tenants`` and apply it without restart.

The value is the tenants document (YAML or JSON, the schema and limits of the tenants file,
:mod:`scheduler.tenants`). A valid value replaces every tenant at once; an invalid one is
ignored, keeping the last good set, logged once (``tenant_config_invalid`` with the reason and
the field) and counted (``sluice_scheduler_tenant_config_reloads_total{result="invalid"}`` and
``sluice_scheduler_tenant_config_rejected_total{reason}``); deleting the key returns to the
tenants file. The watch is :class:`sluice.runtime.registry.PrefixView`: it survives etcd
restarts and resynchronises, calling back only when the value changes; a scheduler started
with etcd down keeps the file's tenants until etcd answers.
"""

from __future__ import annotations

import asyncio
import contextlib

import aetcd
import structlog

from scheduler.metrics import SchedulerMetrics
from scheduler.tenants import Tenant, TenantDirectory, TenantsDocumentError, parse_tenants
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
        self._next: tuple[bytes | None] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self, *, within_s: float | None = None) -> bool:
        """Read the key (if present), apply it, and follow it. Returns whether etcd was read;
        with ``within_s`` it returns False once the first read fails (or ``within_s`` passes)
        and keeps trying in the background."""
        self._view.subscribe(self._on_change)
        # The first full read calls _on_change for a present key; serve it before returning.
        read = await self._view.start(within_s=within_s)
        if self._worker is not None:
            await asyncio.wait({self._worker})
        return read

    async def stop(self) -> None:
        """Stop following."""
        await self._view.stop()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    def _on_change(self, name: str, value: bytes | None) -> None:
        if name != "":
            return
        # A document at the size limit (1 MiB, ~9,000 tenants) takes ~1.4 s of CPU to parse:
        # on a worker thread the loop that streams tokens pauses ~0.25 s at most (libyaml and
        # pydantic hold the GIL in C) instead of 1.4 s. Changes that arrive meanwhile collapse
        # into the latest (etcd's last value wins anyway), applied in order.
        self._next = (value,)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._apply(), name="live tenants")

    async def _apply(self) -> None:
        while self._next is not None:
            (value,) = self._next
            self._next = None
            if value is None:
                self._remove()
                continue
            try:
                tenants = await asyncio.to_thread(parse_tenants, value)
            except TenantsDocumentError as exc:
                self._reject(exc)
                continue
            except Exception:  # a bug, not a bad document: keep the tenants, keep following
                log.exception("tenant_config_failed", key=TENANTS_KEY)
                continue
            self._replace(tenants)

    def _remove(self) -> None:
        self._directory.replace(self._fallback)
        self._metrics.tenant_reloads.labels("removed").inc()
        self.applied_revision += 1
        log.info("tenant_config_removed", tenants=len(self._fallback))

    def _reject(self, exc: TenantsDocumentError) -> None:
        self._metrics.tenant_reloads.labels("invalid").inc()
        self._metrics.tenant_config_rejected.labels(exc.reason).inc()
        log.warning(
            "tenant_config_invalid",
            key=TENANTS_KEY,
            reason=exc.reason,
            field=exc.field,
            error=str(exc)[:500],
            kept_tenants=len(self._directory.all()),
        )

    def _replace(self, tenants: list[Tenant]) -> None:
        self._directory.replace(tenants)
        self._metrics.tenant_reloads.labels("applied").inc()
        self.applied_revision += 1
        log.info("tenant_config_applied", key=TENANTS_KEY, tenants=len(tenants))
