"""Fine-tuned adapters the fleet serves: registered in etcd, resolved per tenant.

A finished fine-tune registers ``/sluice/adapters/<tenant>/<base_model>/<adapter_name>`` (a
JSON record). A Generate for ``"<base_model>:<adapter_name>"`` resolves to the caller's own
adapter of that name, else to one another tenant shared; anything else is NOT_FOUND (another
tenant's private adapter is not revealed). The node is sent the base model and the adapter's
reference ``"<owner>/<adapter_name>"``, which names its files in the fleet's adapter store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sluice.contract import ADAPTERS_PREFIX
from sluice.runtime.errors import NotFound
from sluice.runtime.registry import PrefixView

SEPARATOR = ":"


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter."""

    tenant: str
    base_model: str
    name: str
    shared: bool = False
    job_id: str = ""
    created_ms: int = 0

    @property
    def key(self) -> str:
        """Its etcd key."""
        return f"{ADAPTERS_PREFIX}{self.tenant}/{self.base_model}/{self.name}"

    @property
    def reference(self) -> str:
        """What a node is told: ``"<owner>/<adapter_name>"``."""
        return f"{self.tenant}/{self.name}"

    @property
    def served_as(self) -> str:
        """The model name callers use: ``"<base_model>:<adapter_name>"``."""
        return f"{self.base_model}{SEPARATOR}{self.name}"

    def encode(self) -> bytes:
        """The etcd value."""
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> AdapterRecord:
        """A record from its etcd value (unknown fields ignored)."""
        data = json.loads(raw)
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)


@dataclass(frozen=True)
class Resolved:
    """A model name resolved for one tenant."""

    base_model: str
    adapter: AdapterRecord | None = None


def split_model(model: str) -> tuple[str, str]:
    """``"base:adapter"`` → ``("base", "adapter")``; a plain name → ``(name, "")``."""
    base, _, adapter = model.partition(SEPARATOR)
    return base, adapter


class AdapterDirectory:
    """The registered adapters, followed live from etcd."""

    def __init__(self, view: PrefixView[AdapterRecord | None]) -> None:
        self._view = view

    def records(self) -> list[AdapterRecord]:
        """Every readable record."""
        return [r for r in self._view.items().values() if r is not None]

    def resolve(self, tenant: str, model: str) -> Resolved:
        """The base model and adapter ``model`` names for ``tenant``; NOT_FOUND when it names
        an adapter the tenant has neither registered nor been shared."""
        base, name = split_model(model)
        if not name:
            return Resolved(base)
        own = self._view.get(f"{tenant}/{base}/{name}")
        if own is not None:
            return Resolved(base, own)
        shared = [r for r in self.records() if r.shared and r.base_model == base and r.name == name]
        if len(shared) == 1:
            return Resolved(base, shared[0])
        raise NotFound(f"no adapter {name!r} of {base!r} for this tenant", reason="NO_ADAPTER")


def decode_record(raw: bytes) -> AdapterRecord | None:
    """A record, or None for a value that is not one (a bad entry is ignored, not fatal)."""
    try:
        return AdapterRecord.decode(raw)
    except (ValueError, TypeError):
        return None
