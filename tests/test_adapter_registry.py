"""Adapters registered in a real etcd, resolved per tenant."""

from __future__ import annotations

import pytest

from scheduler.adapters import AdapterDirectory, AdapterRecord, decode_record
from sluice.contract import ADAPTERS_PREFIX
from sluice.runtime.errors import NotFound
from sluice.runtime.registry import PrefixView, etcd_client
from tests.harness import eventually

BASE = "smollm2-135m-instruct"


async def test_a_tenant_gets_its_own_or_a_shared_adapter_and_nothing_else(etcd: str) -> None:
    """``base:name`` resolves to the caller's own adapter, else to one shared by another
    tenant; another tenant's private adapter is NOT_FOUND, as is an unknown name; a plain
    model name has no adapter."""
    client = etcd_client(etcd)
    records = [
        AdapterRecord("alpha", BASE, "pirate"),
        AdapterRecord("beta", BASE, "secret"),
        AdapterRecord("beta", BASE, "public", shared=True),
    ]
    for record in records:
        await client.put(record.key.encode(), record.encode())
    await client.put(f"{ADAPTERS_PREFIX}junk/x/y".encode(), b"not json")
    view = PrefixView(client, ADAPTERS_PREFIX, decode_record)
    await view.start()
    directory = AdapterDirectory(view)
    try:
        await eventually(lambda: len(directory.records()) == 3)
        own = directory.resolve("alpha", f"{BASE}:pirate")
        assert own.base_model == BASE and own.adapter == records[0]
        assert own.adapter.reference == "alpha/pirate"
        shared = directory.resolve("alpha", f"{BASE}:public")
        assert shared.adapter is not None and shared.adapter.reference == "beta/public"
        for name in ("secret", "missing"):
            with pytest.raises(NotFound):
                directory.resolve("alpha", f"{BASE}:{name}")
        assert directory.resolve("alpha", BASE).adapter is None
    finally:
        await view.stop()
        await client.close()
