"""Tenants from a YAML file: who may call, with which models and classes.

```yaml
tenants:
  - name: acme
    api_key_hashes: ["sha256:<hex of the key>"]   # `sluice` stores hashes only
    weight: 2
    classes: [realtime, batch]                       # default: all
    models: ["*"]                                    # default: all
```
The tenant of a request always comes from its verified key, never from a request field.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sluice.auth import HASH_SCHEME, hash_api_key, key_matches
from sluice.v1 import common_pb2

CLASS_NAMES = {
    "realtime": common_pb2.WORKLOAD_CLASS_REALTIME,
    "batch": common_pb2.WORKLOAD_CLASS_BATCH,
    "finetune": common_pb2.WORKLOAD_CLASS_FINETUNE,
}


class TenantSpec(BaseModel):
    """One tenant as written in the tenants file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    api_key_hashes: list[str] = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)
    classes: list[str] = Field(default_factory=lambda: list(CLASS_NAMES))
    models: list[str] = Field(default_factory=lambda: ["*"])

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
        unknown = set(value) - set(CLASS_NAMES)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; use {sorted(CLASS_NAMES)}")
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
    classes: frozenset[int]
    models: frozenset[str]
    key_hashes: tuple[str, ...] = field(repr=False)

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
        data = yaml.safe_load(path.read_text()) or {}
        spec = TenantsFile.model_validate(data)
        return cls(
            Tenant(
                name=t.name,
                weight=t.weight,
                classes=frozenset(CLASS_NAMES[c] for c in t.classes),
                models=frozenset(t.models),
                key_hashes=tuple(t.api_key_hashes),
            )
            for t in spec.tenants
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

    def names(self) -> list[str]:
        """Every tenant name, sorted."""
        return sorted(self._tenants)
