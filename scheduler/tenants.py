"""Tenants from a YAML file: who may call, with which models and classes.

```yaml
tenants:
  - name: acme
    api_key_hashes: ["sha256:<hex of the key>"]   # `sluice` stores hashes only
    weight: 2                                        # fair-share weight inside a class
    classes: [realtime, batch]                       # default: all
    models: ["*"]                                    # default: all
    quotas:                                          # global across replicas; 0 = unlimited
      requests_per_second: 20
      burst: 40                                      # default: max(1, requests_per_second)
      tokens_per_minute: 200000                      # prompt + generated
      max_concurrent: 16
    deadlines: {realtime: 30, batch: 600}            # applied when the call sets no deadline
    admin: false                                     # may read every tenant's usage
```
The tenant of a request always comes from its verified key, never from a request field. The
same document, as YAML or JSON, under the etcd key ``/sluice/config/tenants`` replaces the file's
tenants live (:mod:`scheduler.live_config`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sluice.contract import WorkloadClass
from sluice.runtime.auth import HASH_SCHEME, hash_api_key, key_matches

_LABELS = [c.label for c in WorkloadClass]
"""Class names a tenants file may use: lower case, highest priority first."""


class Quotas(BaseModel):
    """Limits enforced globally (Redis token buckets shared by every scheduler replica)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_second: float = Field(default=0.0, ge=0)
    """Sustained request rate; 0 means unlimited."""
    burst: int = Field(default=0, ge=0)
    """Requests allowed at once above the rate; 0 means ``max(1, requests_per_second)``."""
    tokens_per_minute: int = Field(default=0, ge=0)
    """Prompt plus generated tokens per minute; 0 means unlimited."""
    max_concurrent: int = Field(default=0, ge=0)
    """Requests in flight at once (queued or running); 0 means unlimited."""

    @property
    def bucket_size(self) -> int:
        """Size of the requests-per-second bucket."""
        return self.burst or max(1, math.ceil(self.requests_per_second))

    @property
    def any(self) -> bool:
        """True when some quota is set."""
        return bool(self.requests_per_second or self.tokens_per_minute or self.max_concurrent)


class TenantSpec(BaseModel):
    """One tenant as written in the tenants file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    api_key_hashes: list[str] = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    classes: list[str] = Field(default_factory=lambda: list(_LABELS))
    models: list[str] = Field(default_factory=lambda: ["*"])
    quotas: Quotas = Field(default_factory=Quotas)
    deadlines: dict[str, float] = Field(default_factory=dict)
    admin: bool = False

    @field_validator("deadlines")
    @classmethod
    def _deadlines(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(_LABELS)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; use {sorted(_LABELS)}")
        if any(v <= 0 for v in value.values()):
            raise ValueError("deadlines must be positive seconds")
        return value

    @field_validator("api_key_hashes")
    @classmethod
    def _hashed(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.startswith(HASH_SCHEME) or len(item) != len(HASH_SCHEME) + 64:
                raise ValueError("api_key_hashes must hold 'sha256:<64 hex>' values, never keys")
        return value

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        unknown = set(value) - set(_LABELS)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; use {sorted(_LABELS)}")
        return value


class TenantsFile(BaseModel):
    """The whole tenants file."""

    model_config = ConfigDict(extra="forbid")

    tenants: list[TenantSpec]


@dataclass(frozen=True)
class Tenant:
    """A tenant as the scheduler uses it."""

    name: str
    weight: float
    classes: frozenset[WorkloadClass]
    models: frozenset[str]
    key_hashes: tuple[str, ...] = field(repr=False)
    quotas: Quotas = field(default_factory=Quotas)
    deadlines: Mapping[WorkloadClass, float] = field(default_factory=dict, hash=False)
    """Default deadline in seconds per class, for calls that set none."""
    admin: bool = False
    """May read any tenant's usage."""

    def deadline_for(self, workload_class: WorkloadClass, fallback: float) -> float:
        """Seconds a call of ``workload_class`` without a deadline may take."""
        return self.deadlines.get(workload_class, fallback)

    def may_use_model(self, model: str) -> bool:
        """True when the tenant may call ``model``."""
        return "*" in self.models or model in self.models

    def may_use_class(self, workload_class: int) -> bool:
        """True when the tenant may submit work of ``workload_class``."""
        return workload_class in self.classes


class TenantDirectory:
    """API key → tenant, from hashed keys only."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._tenants = {t.name: t for t in tenants}
        self._by_hash = {h: t for t in self._tenants.values() for h in t.key_hashes}

    @classmethod
    def from_yaml(cls, path: Path) -> TenantDirectory:
        """Load and validate a tenants file."""
        return cls(parse_tenants(path.read_text()))

    def replace(self, tenants: Iterable[Tenant]) -> None:
        """Swap in a new set of tenants at once (live reload); keys not listed stop working."""
        fresh = {t.name: t for t in tenants}
        self._tenants, self._by_hash = (
            fresh,
            {h: t for t in fresh.values() for h in t.key_hashes},
        )

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning ``key``, or None.

        The dict lookup finds the candidate by hash; ``hmac.compare_digest`` then confirms it
        in constant time, so timing reveals nothing about stored hashes.
        """
        candidate = self._by_hash.get(hash_api_key(key))
        if candidate is None:
            return None
        if any(key_matches(key, h) for h in candidate.key_hashes):
            return candidate
        return None

    def get(self, name: str) -> Tenant | None:
        """The tenant called ``name``."""
        return self._tenants.get(name)

    def all(self) -> list[Tenant]:
        """Every tenant."""
        return list(self._tenants.values())

    def names(self) -> list[str]:
        """Every tenant name, sorted."""
        return sorted(self._tenants)


def parse_tenants(text: str) -> list[Tenant]:
    """Tenants from a YAML (or JSON) document; raises ``ValueError`` when it is invalid."""
    data = yaml.safe_load(text) or {}
    spec = TenantsFile.model_validate(data)
    return [
        Tenant(
            name=t.name,
            weight=t.weight,
            classes=frozenset(WorkloadClass.from_label(c) for c in t.classes),
            models=frozenset(t.models),
            key_hashes=tuple(t.api_key_hashes),
            quotas=t.quotas,
            deadlines={WorkloadClass.from_label(c): s for c, s in t.deadlines.items()},
            admin=t.admin,
        )
        for t in spec.tenants
    ]
