"""A fuzzer of the public API, driven by the protobuf descriptors through hypothesis.

:func:`message_strategy` builds a hypothesis strategy for any message from its descriptor:
every field, by type — strings plausible, random, control characters or huge (up to 1 MiB);
integers over the type's whole range with its edges; floats with NaN, ±inf, subnormals and
the float32 extremes; enums with out-of-range values; repeated fields short or huge (up to
100,000 items); optional fields set or not; nested messages likewise. :func:`call_strategy`
picks a public call (Generate, Embed, Admin.ListNodes, Admin.GetTenantUsage), a request, and
call metadata: a valid key, none, a wrong one, garbage, a long one, another tenant's, plus a
random, long or colliding ``x-request-id``; rarely a request over the 16 MiB message limit.

Hypothesis generates the calls on a thread (``@given`` with a seed, generation phase only:
nothing to shrink, every answer is recorded) into a small queue, so a few thousand requests
with megabyte fields never sit in memory together; a few asyncio workers send them. The run
stops at ``count`` calls or ``max_s`` seconds, whichever comes first. Each answer is counted
by status code; a code outside :data:`DOCUMENTED` (``INTERNAL``, ``UNKNOWN``...) is a failure,
and so is an answer the client could not read because its trailers were too large (gRPC then
reports ``RESOURCE_EXHAUSTED`` on the client's side).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from sluice.sdk.errors import from_rpc_error
from sluice.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

DOCUMENTED = frozenset(
    {
        "OK",
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "NOT_FOUND",
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "UNIMPLEMENTED",
    }
)
"""The codes the SDK documents (``sluice.sdk.errors``); anything else is a failure."""
PLAUSIBLE: dict[str, list[str]] = {
    "model": ["tiny-random-llama", "all-minilm-l6-v2", "smollm2-135m-instruct", ""],
    "prompt": ["hello", "", "Tell me a story."],
    "role": ["user", "assistant", "system", "tool", ""],
    "content": ["hi", ""],
    "stop": ["\n", ".", ""],
    "inputs": ["a cat", ""],
    "tenant": ["victim", "tenant-a", "fuzzer", "chaos-admin", ""],
    "session_id": ["s1", ""],
}
OVERSIZED_TRAILERS = "metadata size exceeds"
"""gRPC's message when an answer's headers or trailers pass the receiver's limit (16 KiB)."""
OVERSIZE_BYTES = 17 << 20
"""Past the services' 16 MiB message limit."""
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 1e-45, -1e-45, 1e-40, 1.17e-38, 3.4e38, -0.0]


def _message_type(fd: FieldDescriptor) -> Descriptor:
    if fd.message_type is None:
        raise TypeError(f"{fd.full_name} is not a message field")
    return fd.message_type


def _descriptor(cls: type[Message]) -> Descriptor:
    return cast(Descriptor, cls.DESCRIPTOR)


def _huge_string() -> st.SearchStrategy[str]:
    unit = st.sampled_from(["x", "é", "\x00", "🙂", "ab\n", "\u202e"])
    size = st.sampled_from([300] * 8 + [4096] * 6 + [65536] * 3 + [1 << 20])
    return st.tuples(unit, size).map(lambda t: t[0] * max(1, t[1] // len(t[0])))


def _small(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    """A small value: the element of a huge repeated field."""
    if fd.type == FieldDescriptor.TYPE_STRING:
        return st.sampled_from(PLAUSIBLE.get(fd.name, ["a"])) | st.text(max_size=8)
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        descriptor = _message_type(fd)
        fields = {f.name: _small(f) for f in descriptor.fields if not f.is_repeated}
        return st.fixed_dictionaries(fields).map(lambda values: _build(descriptor, values))
    return _scalar(fd)


def _scalar(fd: FieldDescriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """One value of a singular field of ``fd``'s type."""
    kind = fd.type
    if kind == FieldDescriptor.TYPE_STRING:
        plausible = st.sampled_from(PLAUSIBLE.get(fd.name, ["", "a"]))
        return st.one_of(
            plausible, plausible, st.text(max_size=40), st.text(max_size=300), _huge_string()
        )
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=300)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width: Literal[32, 64] = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.floats(width=width) | st.sampled_from([*_SPECIAL_FLOATS, 0.0, 0.5, 1.0, 2.0])
    if kind == FieldDescriptor.TYPE_ENUM:
        valid = [v.number for v in fd.enum_type.values] if fd.enum_type else [0]
        return (
            st.sampled_from(valid)
            | st.integers(-(2**31), 2**31 - 1)
            | st.sampled_from([-1, max(valid) + 1, 99, 2**31 - 1, -(2**31)])
        )
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(_message_type(fd), depth + 1)
    low, high = _INT_RANGES[kind]
    edges = [v for v in (0, 1, -1, 48, 1024, 1025, 2**31 - 1, low, high) if low <= v <= high]
    return st.integers(low, high) | st.sampled_from(edges)


def _field(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.is_repeated:
        element = _scalar(fd, depth)
        most = 10_000 if fd.type == FieldDescriptor.TYPE_MESSAGE else 100_000
        count = st.sampled_from([most // 100] * 3 + [most // 10] * 2 + [most])
        huge = st.tuples(_small(fd), count).map(lambda t: [t[0]] * t[1])
        short = st.lists(element, max_size=4)
        return short | short | short | huge
    value = _scalar(fd, depth)
    if fd.has_presence:
        return st.none() | value
    return value


def _build(descriptor: Descriptor, values: dict[str, Any]) -> Message:
    message = GetMessageClass(descriptor)()
    for name, value in values.items():
        fd = descriptor.fields_by_name[name]
        if value is None:
            continue
        if fd.is_repeated:
            getattr(message, name).extend(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type, every field drawn by its type (see the module
    docstring); below depth 2, nested messages are left empty."""
    if depth > 2:
        return st.just(GetMessageClass(descriptor)())
    fields = {fd.name: _field(fd, depth) for fd in descriptor.fields}
    return st.fixed_dictionaries(fields).map(lambda values: _build(descriptor, values))


@dataclass(frozen=True)
class FuzzCall:
    """One public call to make."""

    method: str
    request: Message
    metadata: tuple[tuple[str, str], ...]


def _metadata(keys: dict[str, str], own: str) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=100)
    valid = keys[own]
    others = [f"Bearer {k}" for n, k in sorted(keys.items()) if n != own]
    auth = st.one_of(
        st.sampled_from(others or [f"Bearer {valid}"]),
        st.just(f"Bearer {valid}"),
        st.just(f"Bearer {valid}"),
        st.just(f"Bearer {valid}"),
        st.none(),
        st.just("Bearer sk-sluice-" + "A" * 43),
        printable,
        printable.map(lambda s: f"Bearer {s}"),
        st.just(f"bearer  {valid}"),
        st.just(valid),
        st.just("Bearer " + "k" * 4096),
    )
    request_id = st.none() | printable | st.just("collide") | st.just("r" * 2000)

    def pack(values: tuple[str | None, str | None]) -> tuple[tuple[str, str], ...]:
        items = [("authorization", values[0]), ("x-request-id", values[1])]
        return tuple((k, v) for k, v in items if v is not None)

    return st.tuples(auth, request_id).map(pack)


def _oversize(request: Message) -> Message:
    if isinstance(request, inference_pb2.GenerateRequest):
        request.prompt = "x" * OVERSIZE_BYTES
    elif isinstance(request, inference_pb2.EmbedRequest):
        request.inputs.append("x" * OVERSIZE_BYTES)
    return request


def call_strategy(keys: dict[str, str], own: str) -> st.SearchStrategy[FuzzCall]:
    """Public calls with malformed or extreme requests and keys (see the module docstring)."""
    generate = message_strategy(_descriptor(inference_pb2.GenerateRequest))
    embed = message_strategy(_descriptor(inference_pb2.EmbedRequest))
    usage = message_strategy(_descriptor(admin_pb2.GetTenantUsageRequest))
    nodes = st.just(admin_pb2.ListNodesRequest())
    oversize = st.sampled_from([False] * 499 + [True])
    request = st.one_of(
        st.tuples(st.just("Generate"), generate),
        st.tuples(st.just("Generate"), generate),
        st.tuples(st.just("Generate"), generate),
        st.tuples(st.just("Embed"), embed),
        st.tuples(st.just("Embed"), embed),
        st.tuples(st.just("ListNodes"), nodes),
        st.tuples(st.just("GetTenantUsage"), usage),
    )
    return st.tuples(request, _metadata(keys, own), oversize).map(
        lambda t: FuzzCall(t[0][0], _oversize(t[0][1]) if t[2] else t[0][1], t[1])
    )


class _Stop(Exception):
    """The consumer has had enough."""


def produce(
    strategy: st.SearchStrategy[FuzzCall],
    count: int,
    seed: int,
    out: queue.Queue[FuzzCall | None],
    stop: threading.Event,
) -> None:
    """Generate ``count`` calls into ``out`` (blocking when full), then None; stops early when
    ``stop`` is set. Runs hypothesis's generation phase only: no shrinking, no database."""

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
        report_multiple_bugs=False,
    )
    @hypothesis_seed(seed)
    @given(strategy)
    def collect(call: FuzzCall) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                out.put(call, timeout=0.2)
                return
        raise _Stop

    try:
        collect()
    except _Stop:
        pass
    finally:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                out.put(None, timeout=0.2)
                break


@dataclass
class FuzzResult:
    """Answers of a fuzz run."""

    sent: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    by_method: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    by_reason: Counter[str] = field(default_factory=Counter)
    """Refusals by code and ``ErrorInfo.reason`` ("" when the answer had none)."""
    oversized_trailers: int = 0
    """Answers whose trailers the client refused as too large (see ``record``)."""
    examples: dict[str, str] = field(default_factory=dict)
    """The first message of each ``by_reason`` key."""
    client_errors: Counter[str] = field(default_factory=Counter)
    """Calls the client itself could not make (not answers)."""
    failures: list[dict[str, str]] = field(default_factory=list)
    """The first few answers outside DOCUMENTED."""
    elapsed_s: float = 0.0
    hit_time_cap: bool = False
    """Fewer than ``count`` calls made: the time cap stopped the run."""

    def record(self, call: FuzzCall, code: str, details: str = "", reason: str = "") -> None:
        """One answer. A RESOURCE_EXHAUSTED the client made itself because the answer's
        trailers passed its metadata limit is counted apart (the server's real answer is
        lost to the caller: a failure, whatever its code was)."""
        self.sent += 1
        self.by_code[code] += 1
        oversized = code == "RESOURCE_EXHAUSTED" and OVERSIZED_TRAILERS in details
        if oversized:
            self.oversized_trailers += 1
            reason = "trailers over the client's metadata limit"
        if code != "OK":
            key = f"{code} {reason}".strip()
            self.by_reason[key] += 1
            self.examples.setdefault(key, details[:200])
        self.by_method[call.method][code] += 1
        if (oversized or code not in DOCUMENTED) and len(self.failures) < 10:
            self.failures.append(
                {
                    "method": call.method,
                    "code": code,
                    "details": details[:300],
                    "request": str(call.request)[:300],
                }
            )

    def figures(self) -> dict[str, Any]:
        """As JSON."""
        return {
            "answers": self.sent,
            "by_code": dict(sorted(self.by_code.items())),
            "by_method": {m: dict(sorted(c.items())) for m, c in sorted(self.by_method.items())},
            "by_reason": dict(self.by_reason.most_common()),
            "examples": dict(sorted(self.examples.items())),
            "undocumented": sum(n for c, n in self.by_code.items() if c not in DOCUMENTED),
            "oversized_trailers": self.oversized_trailers,
            "internal": self.by_code["INTERNAL"],
            "unknown": self.by_code["UNKNOWN"],
            "client_errors": dict(self.client_errors),
            "failures": self.failures,
            "elapsed_s": round(self.elapsed_s, 1),
            "hit_time_cap": self.hit_time_cap,
        }


def _reason(exc: grpc.aio.AioRpcError) -> str:
    """``ErrorInfo.reason`` of a failed call ("" when none, or unreadable details)."""
    try:
        return from_rpc_error(exc).reason
    except Exception:  # malformed details are an answer too; the code is what counts
        return ""


async def _send(channel: grpc.aio.Channel, call: FuzzCall, timeout_s: float) -> str:
    """Make ``call``; returns the status code name (a stream is read to its end)."""
    if call.method == "Generate":
        stream = inference_pb2_grpc.InferenceStub(channel).Generate(
            call.request, metadata=call.metadata, timeout=timeout_s
        )
        async for _ in stream:
            pass
    elif call.method == "Embed":
        stub = inference_pb2_grpc.InferenceStub(channel)
        await stub.Embed(call.request, metadata=call.metadata, timeout=timeout_s)
    else:
        admin = admin_pb2_grpc.AdminStub(channel)
        method: Callable[..., Any] = getattr(admin, call.method)
        await method(call.request, metadata=call.metadata, timeout=timeout_s)
    return "OK"


async def fuzz(
    address: str,
    keys: dict[str, str],
    own: str,
    *,
    count: int,
    max_s: float,
    seed: int,
    concurrency: int = 8,
    call_timeout_s: float = 30.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> FuzzResult:
    """Send up to ``count`` fuzzed calls to the scheduler at ``address`` within ``max_s``,
    over TLS with ``credentials`` (the suite's CA), plaintext when None."""
    result = FuzzResult()
    calls: queue.Queue[FuzzCall | None] = queue.Queue(maxsize=concurrency * 2)
    stop = threading.Event()

    def generate() -> None:
        try:
            produce(call_strategy(keys, own), count, seed, calls, stop)
        except Exception as exc:  # counted: a run that made fewer calls says why
            result.client_errors[f"generator:{type(exc).__name__}"] += 1

    producer = threading.Thread(target=generate, daemon=True)
    started = time.monotonic()
    deadline = started + max_s
    producer.start()
    options = [("grpc.enable_http_proxy", 0)]
    channel = (
        grpc.aio.insecure_channel(address, options=options)
        if credentials is None
        else grpc.aio.secure_channel(address, credentials, options=options)
    )

    async def worker() -> None:
        while time.monotonic() < deadline:
            call = await asyncio.to_thread(calls.get)
            if call is None:
                calls.put(None)  # wake the next worker too
                return
            timeout = max(1.0, min(call_timeout_s, deadline + 5.0 - time.monotonic()))
            try:
                result.record(call, await _send(channel, call, timeout))
            except grpc.aio.AioRpcError as exc:
                result.record(call, exc.code().name, exc.details() or "", _reason(exc))
            except Exception as exc:  # the client could not even send it
                result.client_errors[type(exc).__name__] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.hit_time_cap = result.sent + sum(result.client_errors.values()) < count
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                calls.get_nowait()
        for _ in range(concurrency):  # wake workers still waiting on the queue (cancelled)
            with contextlib.suppress(queue.Full):
                calls.put_nowait(None)
        await asyncio.to_thread(producer.join, 30)
        await channel.close()
    result.elapsed_s = time.monotonic() - started
    return result
