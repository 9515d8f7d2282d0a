"""Per-tenant usage counters of one scheduler replica (Admin.GetTenantUsage), exported to
Prometheus at scrape time (:class:`UsageCollector`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

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

    def items(self) -> list[tuple[str, TenantCounters]]:
        """Every tenant seen and its counters."""
        return list(self._by_tenant.items())


class UsageCollector(Collector):
    """The usage book as Prometheus counters, read at each scrape (nothing added on the
    request path): requests and prompt and generated tokens by tenant, the tenants' token
    shares a dashboard shows."""

    def __init__(self, book: UsageBook) -> None:
        self._book = book

    def collect(self) -> Iterator[CounterMetricFamily]:
        tokens = CounterMetricFamily(
            "sluice_scheduler_tenant_tokens",
            "Tokens of tenants' requests through this replica, by tenant and kind "
            "(prompt, generated).",
            labels=["tenant", "kind"],
        )
        requests = CounterMetricFamily(
            "sluice_scheduler_tenant_requests",
            "Requests of tenants through this replica (refused ones included), by tenant.",
            labels=["tenant"],
        )
        for tenant, counters in self._book.items():
            tokens.add_metric([tenant, "prompt"], counters.prompt_tokens)
            tokens.add_metric([tenant, "generated"], counters.completion_tokens)
            requests.add_metric([tenant], counters.requests)
        yield from (tokens, requests)
