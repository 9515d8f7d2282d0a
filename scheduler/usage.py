"""Per-tenant usage counters of one scheduler replica (Admin.GetTenantUsage)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from sluice.v1 import admin_pb2


@dataclass
class TenantCounters:
    """What one tenant has used through this replica."""

    requests: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    cache_hits: int = 0

    def to_proto(self, tenant: str) -> admin_pb2.TenantUsage:
        """As the Admin API returns it."""
        return admin_pb2.TenantUsage(
            tenant=tenant,
            requests=self.requests,
            refused=self.refused,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            in_flight=self.in_flight,
            cache_hits=self.cache_hits,
        )


class UsageBook:
    """Counters by tenant."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, TenantCounters] = defaultdict(TenantCounters)

    def of(self, tenant: str) -> TenantCounters:
        """The counters of ``tenant`` (created on first use)."""
        return self._by_tenant[tenant]
