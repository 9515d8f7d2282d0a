"""A default per-tenant cap on requests in flight, even for a tenant without quotas."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from sluice.runtime.errors import STATUS_DETAILS_METADATA
from sluice.v1 import common_pb2, inference_pb2
from tests.harness import OTHER_KEY, Suite, auth, eventually

TINY = "tiny-random-llama"


def request(max_new_tokens: int, **kw: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=TINY,
        prompt="hello",
        options=common_pb2.GenerationOptions(max_new_tokens=max_new_tokens, ignore_eos=True),
        **kw,  # type: ignore[arg-type]
    )


async def test_a_tenant_without_quotas_is_capped_and_others_are_not(suite: Suite) -> None:
    """With ``tenant_max_in_flight=1``, a second request of a tenant without quotas while its
    first streams is refused RESOURCE_EXHAUSTED ``TENANT_CONCURRENCY`` with RetryInfo and a
    QuotaFailure; another tenant is served meanwhile, and the first stream is untouched."""
    await suite.start_cache()
    await suite.start_node("node-a")
    scheduler = await suite.start_scheduler(tenant_max_in_flight=1)
    await eventually(lambda: scheduler.nodes.candidates(TINY, 1))
    stub = suite.inference()
    long = stub.Generate(request(1000), metadata=auth())
    await long.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(request(2), metadata=auth()):
            pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(err.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers[STATUS_DETAILS_METADATA])  # type: ignore[arg-type]
    kinds = {d.type_url.rsplit(".", 1)[-1] for d in status.details}
    assert {"RetryInfo", "QuotaFailure", "ErrorInfo"} <= kinds
    info = error_details_pb2.ErrorInfo()
    next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
    assert info.reason == "TENANT_CONCURRENCY"
    other = [
        c
        async for c in stub.Generate(
            request(2, workload_class=common_pb2.WORKLOAD_CLASS_BATCH), metadata=auth(OTHER_KEY)
        )
    ]
    assert other
    last = None
    while (chunk := await long.read()) is not grpc.aio.EOF:
        last = chunk
    assert last is not None
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
