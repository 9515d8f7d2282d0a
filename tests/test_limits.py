"""Every documented request limit (docs/limits.md, sluice/limits.py) is enforced by the
scheduler and again by the node: the boundary value passes that limit and the value just past
it is INVALID_ARGUMENT with a BadRequest violation naming the field, on both sides."""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from pydantic import ValidationError

from scheduler.config import ModelSpec
from sluice import limits
from sluice.contract import REQUEST_ID_METADATA
from sluice.v1 import admin_pb2, common_pb2, inference_pb2, node_pb2, node_pb2_grpc
from tests.harness import Suite, auth
from tests.test_end_to_end import TINY, details_of, unpack

MINILM = "all-minilm-l6-v2"
DOC = Path(__file__).resolve().parents[1] / "docs" / "limits.md"

Metadata = tuple[tuple[str, str], ...]
Call = tuple[inference_pb2.GenerateRequest | inference_pb2.EmbedRequest, Metadata]

AT_THE_LIMITS = [
    # The scheduler's catalog as loose as the contract allows, so its limits are the contract's.
    ModelSpec(
        name=TINY,
        kind="generate",
        max_new_tokens=limits.MAX_NEW_TOKENS,
        max_prompt_chars=limits.MAX_PROMPT_CHARS,
    ),
    ModelSpec(
        name=MINILM,
        kind="embed",
        max_prompt_chars=limits.MAX_EMBED_INPUT_CHARS,
        max_inputs=limits.MAX_EMBED_INPUTS,
    ),
]


def float32_next(value: float, *, up: bool) -> float:
    """The float32 next to the positive float32 ``value``, above or below it."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0] + (1 if up else -1)
    return float(struct.unpack("<f", struct.pack("<I", bits))[0])


def generate(metadata: Metadata = (), **fields: Any) -> Call:
    """A valid one-token Generate with ``fields`` changed (``options`` a dict)."""
    options = fields.pop("options", {})
    request = inference_pb2.GenerateRequest(**{"model": TINY, "prompt": "hi", **fields})
    request.options.max_new_tokens = 1
    for name, value in options.items():
        if name == "stop":
            request.options.stop.extend(value)
        else:
            setattr(request.options, name, value)
    return request, metadata


def chat(*contents: str, role: str = "user") -> dict[str, Any]:
    return {
        "prompt": "",
        "messages": [common_pb2.ChatMessage(role=role, content=c) for c in contents],
    }


def embed(metadata: Metadata = (), **fields: Any) -> Call:
    """A valid Embed of one text with ``fields`` changed."""
    return inference_pb2.EmbedRequest(**{"model": MINILM, "inputs": ["hi"], **fields}), metadata


def texts(total: int) -> list[str]:
    """Texts of at most ``MAX_EMBED_INPUT_CHARS`` characters, ``total`` in all."""
    size = limits.MAX_EMBED_INPUT_CHARS
    return ["x" * min(size, total - start) for start in range(0, total, size)]


def request_id(n: int) -> Metadata:
    return ((REQUEST_ID_METADATA, "r" * n),)


@dataclass(frozen=True)
class Limit:
    """One limit: the request at ``ok`` passes it, the request at ``bad`` breaks it with a
    violation of ``field`` whose description contains ``why``."""

    name: str
    field: str
    why: str
    ok: Any
    bad: Any
    build: Callable[[Any], Call]


MAX_PROMPT, MAX_TOKENS = limits.MAX_PROMPT_CHARS, limits.MAX_NEW_TOKENS
MAX_EMBED_TOTAL = limits.MAX_EMBED_TOTAL_CHARS
TEMPERATURE = "must be 0 (greedy) or in"
TOP_P = "must be in (0, 1]"
MIN_TEMPERATURE = limits.float32(limits.MIN_TEMPERATURE)

LIMITS = [
    Limit("model name", "model", "at most 128", 128, 129, lambda n: generate(model="m" * n)),
    Limit("model required", "model", "required", TINY, "", lambda m: generate(model=m)),
    Limit("prompt blank", "prompt", "must not be empty", "x", " \n", lambda p: generate(prompt=p)),
    Limit(
        "prompt characters",
        "prompt",
        f"at most {MAX_PROMPT}",
        MAX_PROMPT,
        MAX_PROMPT + 1,
        lambda n: generate(prompt="x" * n),
    ),
    Limit(
        "message characters",
        "messages",
        f"at most {MAX_PROMPT}",
        MAX_PROMPT,
        MAX_PROMPT + 1,
        lambda n: generate(**chat("x" * (n - 1), "y")),
    ),
    Limit(
        "prompt or messages",
        "messages",
        "not both",
        0,
        1,
        lambda n: generate(messages=[common_pb2.ChatMessage(role="user", content="hi")] * n),
    ),
    Limit("messages", "messages", "at most 256", 256, 257, lambda n: generate(**chat(*["hi"] * n))),
    Limit(
        "message role",
        "messages[0].role",
        "must be one of",
        "assistant",
        "robot",
        lambda r: generate(**chat("hi", role=r)),
    ),
    Limit(
        "message content",
        "messages[0].content",
        "must not be empty",
        "x",
        " ",
        lambda c: generate(**chat(c)),
    ),
    Limit(
        "max_new_tokens",
        "options.max_new_tokens",
        f"must be 1 to {MAX_TOKENS}",
        MAX_TOKENS,
        MAX_TOKENS + 1,
        lambda n: generate(options={"max_new_tokens": n}),
    ),
    Limit(
        "max_new_tokens at least 1",
        "options.max_new_tokens",
        f"must be 1 to {MAX_TOKENS}",
        1,
        0,
        lambda n: generate(options={"max_new_tokens": n}),
    ),
    *(
        Limit(
            f"temperature {name}",
            "options.temperature",
            TEMPERATURE,
            ok,
            bad,
            lambda t: generate(options={"temperature": t}),
        )
        for name, ok, bad in [
            ("max", 2.0, float32_next(2.0, up=True)),
            ("min", MIN_TEMPERATURE, float32_next(MIN_TEMPERATURE, up=False)),
            ("subnormal", 0.0, 2.0**-149),
            ("negative", 0.0, -0.5),
            ("nan", 1.0, math.nan),
            ("inf", 1.0, math.inf),
        ]
    ),
    *(
        Limit(
            f"top_p {name}",
            "options.top_p",
            TOP_P,
            ok,
            bad,
            lambda p: generate(options={"top_p": p}),
        )
        for name, ok, bad in [
            ("max", 1.0, float32_next(1.0, up=True)),
            ("subnormal", limits.MIN_TOP_P, float32_next(limits.MIN_TOP_P, up=False)),
            ("zero", 0.5, 0.0),
            ("nan", 0.5, math.nan),
            ("inf", 0.5, math.inf),
        ]
    ),
    Limit(
        "stop strings",
        "options.stop",
        "at most 8",
        8,
        9,
        lambda n: generate(options={"stop": [f"s{i}" for i in range(n)]}),
    ),
    Limit(
        "stop length",
        "options.stop[0]",
        "must be 1 to 64",
        64,
        65,
        lambda n: generate(options={"stop": ["s" * n]}),
    ),
    Limit(
        "stop empty",
        "options.stop[0]",
        "must be 1 to 64",
        1,
        0,
        lambda n: generate(options={"stop": ["s" * n]}),
    ),
    Limit(
        "session id", "session_id", "at most 128", 128, 129, lambda n: generate(session_id="s" * n)
    ),
    Limit("class", "workload_class", "unknown value", 3, 4, lambda c: generate(workload_class=c)),
    Limit(
        "class negative",
        "workload_class",
        "unknown value",
        0,
        -1,
        lambda c: generate(workload_class=c),
    ),
    Limit(
        "x-request-id",
        f"metadata.{REQUEST_ID_METADATA}",
        "at most 128",
        128,
        129,
        lambda n: generate(request_id(n)),
    ),
    Limit("embed model name", "model", "at most 128", 128, 129, lambda n: embed(model="m" * n)),
    Limit("embed inputs", "inputs", "at most 256", 256, 257, lambda n: embed(inputs=["hi"] * n)),
    Limit("embed no input", "inputs", "at least one", 1, 0, lambda n: embed(inputs=["hi"] * n)),
    Limit(
        "embed input characters",
        "inputs[0]",
        "at most 32000",
        32_000,
        32_001,
        lambda n: embed(inputs=["x" * n]),
    ),
    Limit(
        "embed input blank", "inputs[0]", "must not be empty", "x", " ", lambda t: embed(inputs=[t])
    ),
    Limit(
        "embed characters in all",
        "inputs",
        f"at most {MAX_EMBED_TOTAL}",
        MAX_EMBED_TOTAL,
        MAX_EMBED_TOTAL + 1,
        lambda n: embed(inputs=texts(n)),
    ),
    Limit(
        "embed class", "workload_class", "unknown value", 3, 4, lambda c: embed(workload_class=c)
    ),
    Limit(
        "embed x-request-id",
        f"metadata.{REQUEST_ID_METADATA}",
        "at most 128",
        128,
        129,
        lambda n: embed(request_id(n)),
    ),
]


def violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    bad = unpack(details_of(error), error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    return [(v.field, v.description) for v in bad.field_violations]


def refused_for(limit: Limit, error: grpc.aio.AioRpcError | None) -> bool:
    """True when ``error`` is INVALID_ARGUMENT with ``limit``'s violation."""
    if error is None or error.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return False
    return any(f == limit.field and limit.why in d for f, d in violations(error))


def described(error: grpc.aio.AioRpcError | None) -> str:
    return "served" if error is None else f"{error.code().name} {error.details()}"


async def first_answer(call: Any) -> grpc.aio.AioRpcError | None:
    """The error a call ends with, or None once it answers (a stream: its first chunk)."""
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                break
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc
    finally:
        call.cancel()
    return None


Send = Callable[[Call], Any]


async def check_every_limit(send: Send) -> list[str]:
    """Each limit at its boundary and just past it through ``send``; what went wrong."""
    wrong = []
    for limit in LIMITS:
        for value, refused in ((limit.ok, False), (limit.bad, True)):
            error = await first_answer(send(limit.build(value)))
            if refused_for(limit, error) != refused:
                expected = "refused" if refused else "passed"
                wrong.append(f"{limit.name}={value!r:.40} not {expected}: {described(error):.300}")
    return wrong


async def test_the_scheduler_enforces_every_limit_at_its_boundary(suite: Suite) -> None:
    """Through the public API (no node: a valid request ends UNAVAILABLE ``NO_NODE``), each
    limit's boundary passes it and the value past it is refused with its violation."""
    await suite.start_scheduler(models=AT_THE_LIMITS)
    stub = suite.inference()

    def send(call: Call) -> Any:
        request, metadata = call
        if isinstance(request, inference_pb2.EmbedRequest):
            return stub.Embed(request, metadata=auth() + metadata, timeout=30)
        return stub.Generate(request, metadata=auth() + metadata, timeout=30)

    assert await check_every_limit(send) == []


async def test_the_node_enforces_every_limit_again_for_a_caller_that_bypasses_the_scheduler(
    suite: Suite,
) -> None:
    """Straight to a node's internal API: the same limits, the same refusals; a request at
    every boundary passes them (served, or refused for something else: the tiny model's
    2,048-token context)."""
    node = await suite.start_node("limits")
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))

    def send(call: Call) -> Any:
        request, metadata = call
        key = uuid.uuid4().hex
        if isinstance(request, inference_pb2.EmbedRequest):
            forward = node_pb2.NodeEmbedRequest(request=request, tenant="alpha", request_id=key)
            return stub.Embed(forward, metadata=metadata, timeout=60)
        generation = node_pb2.NodeGenerateRequest(request=request, tenant="alpha", request_id=key)
        return stub.Generate(generation, metadata=metadata, timeout=60)

    assert await check_every_limit(send) == []


async def test_the_node_bounds_what_a_scheduler_adds(suite: Suite) -> None:
    """A forwarded request's tenant (64 characters) and job key (128): at the limit it is
    served, past it INVALID_ARGUMENT naming both."""
    node = await suite.start_node("limits")
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    request, _ = generate()
    ok = node_pb2.NodeGenerateRequest(request=request, tenant="t" * 64, request_id="k" * 128)
    assert [c async for c in stub.Generate(ok)][-1].usage.completion_tokens == 1
    bad = node_pb2.NodeGenerateRequest(request=request, tenant="t" * 65, request_id="k" * 129)
    error = await first_answer(stub.Generate(bad))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(error)] == ["tenant", "request_id"]


async def test_the_node_bounds_its_internal_calls(suite: Suite) -> None:
    """StreamLoad's interval (0 or 10-10000 ms) and Drain's grace (0-3600 s) are bounded:
    past them INVALID_ARGUMENT naming the field."""
    node = await suite.start_node("internal-limits")
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    error = await first_answer(stub.StreamLoad(node_pb2.StreamLoadRequest(min_interval_ms=1)))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(error)] == ["min_interval_ms"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Drain(node_pb2.DrainRequest(grace_seconds=-1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not node.draining


async def test_oversized_metadata_is_refused_before_the_api_key(suite: Suite) -> None:
    """An x-request-id past its limit is INVALID_ARGUMENT even without an API key: metadata
    alone decides, before authentication and before the body is parsed."""
    await suite.start_scheduler()
    request, _ = generate()
    error = await first_answer(
        suite.inference().Generate(request, metadata=((REQUEST_ID_METADATA, "r" * 129),))
    )
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_tenant_usage_refuses_a_tenant_name_longer_than_any_tenant(suite: Suite) -> None:
    """``GetTenantUsage.tenant``: 64 characters is looked up (NOT_FOUND here), 65 is
    INVALID_ARGUMENT ``tenant``."""
    await suite.start_scheduler()
    stub = suite.admin()
    for name, code in (
        ("t" * 64, grpc.StatusCode.NOT_FOUND),
        ("t" * 65, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetTenantUsage(admin_pb2.GetTenantUsageRequest(tenant=name), metadata=auth())
        assert err.value.code() == code
    assert [f for f, _ in violations(err.value)] == ["tenant"]


@pytest.mark.parametrize(
    "field",
    ["name", "max_new_tokens", "default_max_new_tokens", "max_prompt_chars", "max_inputs"],
)
def test_a_model_spec_looser_than_the_contract_does_not_load(field: str) -> None:
    """The catalog may be tighter than the contract, never looser."""
    over = {
        "name": "m" * (limits.MAX_MODEL_NAME_CHARS + 1),
        "max_new_tokens": limits.MAX_NEW_TOKENS + 1,
        "default_max_new_tokens": limits.MAX_NEW_TOKENS + 1,
        "max_prompt_chars": limits.MAX_PROMPT_CHARS + 1,
        "max_inputs": limits.MAX_EMBED_INPUTS + 1,
    }
    spec = {"name": "m", "kind": "generate", field: over[field]}
    with pytest.raises(ValidationError):
        ModelSpec.model_validate(spec)


def test_the_limits_table_names_every_limit() -> None:
    """docs/limits.md names each constant of sluice/limits.py; a numeric limit's row gives
    its value."""
    doc = DOC.read_text().splitlines()
    constants = {k: v for k, v in vars(limits).items() if k.isupper() and not k.startswith("_")}
    assert constants
    for name, value in constants.items():
        rows = [line for line in doc if f"`{name}`" in line]
        assert rows, f"{name} is not in docs/limits.md"
        if isinstance(value, int) and value > 1:
            assert any(f"{value:,}" in row or str(value) in row for row in rows), name
