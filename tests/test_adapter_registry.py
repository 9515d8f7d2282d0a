"""Adapters registered in a real etcd, resolved per tenant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from inference_node.adapters import AdapterRef, AdapterStore
from inference_node.models import LanguageModel
from scheduler.adapters import AdapterDirectory, AdapterRecord, decode_record
from sluice.contract import ADAPTERS_PREFIX
from sluice.runtime.errors import NotFound
from sluice.runtime.registry import PrefixView, etcd_client
from sluice.v1 import common_pb2, inference_pb2
from tests.harness import API_KEY, OTHER_KEY, Suite, auth, eventually
from tests.test_lora_serving import ATTENTION, make_adapter

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


async def test_the_scheduler_serves_a_tenants_adapter_and_hides_it_from_others(
    suite: Suite, tiny_lm: LanguageModel, tmp_path: Path
) -> None:
    """A Generate for ``tiny-random-llama:pirate`` by its owner streams the adapter's answer
    (not the base model's), cached apart from the base; another tenant gets NOT_FOUND until the
    adapter is shared."""
    store = AdapterStore(tmp_path / "adapters")
    adapter = make_adapter(tiny_lm, ATTENTION, 3)
    store.publish(adapter, AdapterRef("alpha", tiny_lm.name, "pirate"))
    store.publish(adapter, AdapterRef("beta", tiny_lm.name, "pirate"))
    await suite.start_node("node-a", adapters_dir=tmp_path / "adapters")
    scheduler = await suite.start_scheduler()
    await eventually(lambda: scheduler.nodes.candidates(tiny_lm.name, 1))
    client = etcd_client(suite.etcd)
    record = AdapterRecord("alpha", tiny_lm.name, "pirate")
    await client.put(record.key.encode(), record.encode())
    await eventually(lambda: scheduler.adapter_view.get("alpha/tiny-random-llama/pirate"))
    stub = suite.inference()

    async def text(model: str, key: str = API_KEY) -> str:
        request = inference_pb2.GenerateRequest(
            model=model,
            prompt="hello there",
            options=common_pb2.GenerationOptions(max_new_tokens=8, seed=1, temperature=0),
            workload_class=common_pb2.WORKLOAD_CLASS_BATCH,
        )
        chunks = [c async for c in stub.Generate(request, metadata=auth(key), timeout=30)]
        return "".join(c.text for c in chunks)

    base = await text(tiny_lm.name)
    tuned = await text(f"{tiny_lm.name}:pirate")
    assert tuned != base
    assert await text(f"{tiny_lm.name}:pirate") == tuned  # cached apart from the base
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await text(f"{tiny_lm.name}:pirate", OTHER_KEY)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    shared = AdapterRecord("alpha", tiny_lm.name, "pirate", shared=True)
    await client.put(shared.key.encode(), shared.encode())
    await eventually(lambda: directory_shared(scheduler))
    assert await text(f"{tiny_lm.name}:pirate", OTHER_KEY) == tuned
    await client.close()


def directory_shared(scheduler: Any) -> bool:
    record = scheduler.adapter_view.get("alpha/tiny-random-llama/pirate")
    return record is not None and record.shared
