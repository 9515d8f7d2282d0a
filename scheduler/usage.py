"""Per-tenant usage counters of one scheduler replica (Admin.GetTenantUsage)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

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
    refused_by_reason: dict[str, int] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        """Count one refusal for ``reason``."""
        self.refused += 1
        self.refused_by_reason[reason] = self.refused_by_reason.get(reason, 0) + 1

    def to_proto(self, tenant: str) -> admin_pb2.TenantUsage:
        """As the Admin API returns it (the caller adds queue, weight and quotas)."""
        return admin_pb2.TenantUsage(
            tenant=tenant,
            requests=self.requests,
            refused=self.refused,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            in_flight=self.in_flight,
            cache_hits=self.cache_hits,
            refused_by_reason=self.refused_by_reason,
        )


class UsageBook:
    """Counters by tenant."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, TenantCounters] = defaultdict(TenantCounters)

    def of(self, tenant: str) -> TenantCounters:
        """The counters of ``tenant`` (created on first use)."""
        return self._by_tenant[tenant]
