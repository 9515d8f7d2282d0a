"""Failure isolation (issue 17, deliverable 1): one request cannot end its neighbours' streams.

Engine: a fault in one sequence's own work (sampling, decoding, setting it up) ends that
request alone with ``RequestFaultError``; only a failed shared step ends the batch. Node: the
statuses (INVALID_ARGUMENT ``REQUEST_FAULT``, ALREADY_EXISTS for a live job key). Scheduler:
numerically unsafe parameters are refused at the edge, request-caused errors trip no breaker
and are not retried, node job keys are the scheduler's own, undefined classes are
INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from prometheus_client import Counter

from inference_node.engine import (
    BatchingConfig,
    BatchingEngine,
    DuplicateRequestError,
    EngineFaultError,
    EngineRequest,
    FinishReason,
    InvalidRequestError,
    RequestFaultError,
    SamplingParams,
    SerialEngine,
    TokenDelta,
)
from inference_node.engine import batching as engine_batching
from inference_node.engine import serial as engine_serial
from inference_node.engine import text as engine_text
from inference_node.engine.text import SamplingError, TextStream, sample
from inference_node.models import LanguageModel
from scheduler.blame import Blame, blame
from scheduler.config import DEFAULT_MODELS, ModelSpec
from scheduler.tenants import Tenant
from scheduler.validation import class_label, validate_embed, validate_generate
from sluice.contract import REQUEST_ID_METADATA, WorkloadClass
from sluice.runtime.errors import Internal, InvalidArgument, SluiceError
from sluice.v1 import common_pb2, inference_pb2, node_pb2, node_pb2_grpc
from tests.harness import OTHER_KEY, Suite, auth, eventually, fake_node
from tests.test_end_to_end import TINY, details_of, gen_request, unpack

POISON_SEED = 666

# -- helpers -----------------------------------------------------------------------------------


def engine_request(
    key: str, n: int, prompt: bytes = b"hello there", **params: Any
) -> EngineRequest:
    params.setdefault("ignore_eos", True)
    return EngineRequest(key, tuple(prompt), SamplingParams(max_new_tokens=n, **params))


async def collect(stream: AsyncIterator[TokenDelta]) -> list[TokenDelta]:
    async with asyncio.timeout(60):
        return [d async for d in stream]


def ids_of(deltas: list[TokenDelta]) -> list[int]:
    return [i for d in deltas for i in d.token_ids]


@pytest.fixture
def batching(tiny_lm: LanguageModel) -> Iterator[BatchingEngine]:
    engine = BatchingEngine(tiny_lm, BatchingConfig(max_sequences=4, kv_budget_bytes=16 * 1024**2))
    engine.start()
    yield engine
    engine.close()


def poison_logits(
    monkeypatch: pytest.MonkeyPatch, engine: Any, poisoned: Callable[[str, int], bool]
) -> None:
    """Make the forward pass return NaN logits for the rows of the requests ``poisoned(job
    key, tokens generated so far)`` picks: numerical trouble in one row of a real batch."""
    runner = engine._runner
    real = runner.step

    def step(
        decode_tokens: list[int], positions: list[int], prefills: list[Any], lora: Any = None
    ) -> torch.Tensor:
        logits = real(decode_tokens, positions, prefills, lora).clone()  # a normal tensor
        seqs = [engine._slots[i] for i in range(len(decode_tokens))]
        seqs += [engine._slots[p.slot] for p in prefills if p.wants_logits]
        for row, seq in enumerate(seqs):
            if poisoned(seq.job.request.request_id, seq.job.generated):
                logits[row] = math.nan
        return logits

    monkeypatch.setattr(runner, "step", step)


# -- the engine: what broke the batch, and isolation -------------------------------------------


async def test_denormal_temperature_that_slips_past_validation_no_longer_ends_the_batch(
    batching: BatchingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported bug: a request with temperature 1e-45 (a denormal float32 the scheduler
    accepted, in [0, 2]) made logits / temperature overflow to inf, softmax gave NaN and
    ``torch.multinomial`` raised inside the shared step, which failed every sequence of the
    batch. With the node's validation switched off, the poison request now runs in the same
    batch as a greedy neighbour: sampling cannot overflow any more (it samples greedily) and
    the neighbour gets every token it gets alone."""
    alone = ids_of(await collect(batching.submit(engine_request("alone", 40))))
    monkeypatch.setattr(engine_text, "sampling_violations", lambda _params: [])
    victim = batching.submit(engine_request("victim", 40))
    first = await anext(victim)
    poison = batching.submit(engine_request("poison", 8, temperature=1e-45, seed=1))
    poisoned = await collect(poison)
    rest = await collect(victim)
    assert ids_of([first, *rest]) == alone
    assert rest[-1].finish_reason is FinishReason.LENGTH
    assert poisoned[-1].completion_tokens == 8


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"temperature": 1e-45}, "options.temperature"),
        ({"temperature": 1e-3}, "options.temperature"),
        ({"temperature": math.nan}, "options.temperature"),
        ({"temperature": math.inf}, "options.temperature"),
        ({"temperature": 2.5}, "options.temperature"),
        ({"top_p": 1e-45}, "options.top_p"),
        ({"top_p": math.nan}, "options.top_p"),
        ({"top_p": 0.0}, "options.top_p"),
        ({"stop": ("x" * 65,)}, "options.stop[0]"),
        ({"stop": tuple("abcdefghi")}, "options.stop"),
    ],
)
def test_engine_refuses_numerically_unsafe_parameters_naming_the_field(
    tiny_lm: LanguageModel, params: dict[str, Any], field: str
) -> None:
    """The node's second line of defence: unsafe sampling parameters raise
    ``InvalidRequestError`` (a ``ValueError``) at submit, with the field."""
    engine = SerialEngine(tiny_lm)  # never started: submit validates on the caller's thread
    try:
        with pytest.raises(InvalidRequestError) as err:
            engine.submit(engine_request("bad", 4, **params))
    finally:
        engine.close()
    assert field in [f for f, _ in err.value.violations]


async def test_engine_accepts_the_edges_of_the_safe_ranges(tiny_lm: LanguageModel) -> None:
    """0.01 as it arrives from the wire (float32), 2, top_p 1e-30, 8 stop strings of 64."""
    engine = SerialEngine(tiny_lm)
    try:
        for i, params in enumerate(
            [
                {"temperature": 0.009999999776482582, "seed": 1},
                {"temperature": 2.0, "top_p": 1e-30},
                {"stop": tuple(f"{c}" * 64 for c in "abcdefgh")},
            ]
        ):
            engine.submit(engine_request(f"ok{i}", 4, **params))
    finally:
        engine.close()


def test_sampling_raises_a_sampling_error_for_nan_logits_and_never_overflows() -> None:
    """``sample``: NaN logits are a ``SamplingError`` (not a multinomial crash); a temperature
    however small picks the best token."""
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    params = SamplingParams(max_new_tokens=1, temperature=1e-45, top_p=1e-45)
    generator = torch.Generator().manual_seed(0)
    assert sample(logits * 1e30, params, generator) == 1
    with pytest.raises(SamplingError):
        sample(torch.tensor([0.1, math.nan]), params, generator)
    with pytest.raises(SamplingError):
        sample(torch.tensor([0.1, math.inf]), params, None)


async def test_nan_logits_in_one_row_fail_that_request_alone(
    batching: BatchingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN logits for one request, mid-stream, in a batch of two: that request's stream
    raises ``RequestFaultError`` (stage ``sampling``) after the tokens it already had; its
    neighbour gets exactly the tokens it gets alone, and the engine serves on."""
    alone = ids_of(await collect(batching.submit(engine_request("alone", 30))))
    poison_logits(monkeypatch, batching, lambda key, generated: key == "poison" and generated >= 3)
    victim = batching.submit(engine_request("victim", 30))
    poison = batching.submit(engine_request("poison", 30, prompt=b"other prompt"))
    got: list[TokenDelta] = []
    with pytest.raises(RequestFaultError) as err:
        async for delta in poison:
            got.append(delta)
    assert err.value.stage == "sampling"
    assert len(ids_of(got)) == 3
    assert ids_of(await collect(victim)) == alone
    after = await collect(batching.submit(engine_request("after", 5)))
    assert after[-1].completion_tokens == 5
    assert sum(batching.stats().running.values()) == 0


@pytest.mark.parametrize(
    ("target", "stage"),
    [(TextStream, "decoding"), (engine_batching, "setup")],
)
async def test_an_exception_in_one_requests_own_work_fails_it_alone(
    batching: BatchingEngine, monkeypatch: pytest.MonkeyPatch, target: Any, stage: str
) -> None:
    """An exception while detokenizing / checking stop strings (``TextStream.push``) or
    while setting up its sampler (``make_generator``), for one request only: it ends with
    ``RequestFaultError`` naming the stage, its neighbour streams to the end."""

    def poisoned(params: SamplingParams) -> None:
        if params.seed == POISON_SEED:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "poison")

    if target is TextStream:
        real_push = TextStream.push

        def push(self: TextStream, token: int) -> TokenDelta:
            poisoned(self.params)
            return real_push(self, token)

        monkeypatch.setattr(TextStream, "push", push)
    else:
        real_make = engine_batching.make_generator

        def make(params: SamplingParams, device: torch.device) -> torch.Generator | None:
            poisoned(params)
            return real_make(params, device)

        monkeypatch.setattr(engine_batching, "make_generator", make)
    victim = batching.submit(engine_request("victim", 200))  # still running beside the poison
    first = await anext(victim)
    poison = batching.submit(engine_request("poison", 20, seed=POISON_SEED))
    with pytest.raises(RequestFaultError) as err:
        await collect(poison)
    assert err.value.stage == stage
    rest = [first, *await collect(victim)]  # a slow consumer may get it merged in one delta
    assert rest[-1].finish_reason is FinishReason.LENGTH


async def test_a_failed_forward_fails_the_batch_as_an_engine_fault_and_the_engine_goes_on(
    batching: BatchingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the shared step's failure ends every running sequence, with ``EngineFaultError``
    (a node fault); the next request is served."""
    first = batching.submit(engine_request("a", 50))
    second = batching.submit(engine_request("b", 50))
    await anext(first)
    await anext(second)
    real = batching._runner.step
    calls = {"n": 0}

    def step(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real(*args)

    monkeypatch.setattr(batching._runner, "step", step)
    for stream in (first, second):
        with pytest.raises(EngineFaultError):
            await collect(stream)
    after = await collect(batching.submit(engine_request("after", 5)))
    assert after[-1].completion_tokens == 5


async def test_nan_logits_in_every_row_of_a_batch_are_an_engine_fault(
    batching: BatchingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row of a batch of several non-finite points at the node (weights, device), not at
    a request: the batch ends with ``EngineFaultError``, so the scheduler can blame the node."""
    first = batching.submit(engine_request("a", 50))
    second = batching.submit(engine_request("b", 50))
    await anext(first)
    await anext(second)
    poison_logits(monkeypatch, batching, lambda _key, _n: True)
    for stream in (first, second):
        with pytest.raises(EngineFaultError):
            await collect(stream)


async def test_serial_engine_isolates_a_sampling_fault_too(
    tiny_lm: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serial engine: a sampling fault is a ``RequestFaultError`` (not the raw error),
    and the next request is served."""
    real = engine_serial.sample

    def poisoned(logits: torch.Tensor, params: SamplingParams, gen: Any) -> int:
        if params.seed == POISON_SEED:
            raise SamplingError("poison")
        return real(logits, params, gen)

    monkeypatch.setattr(engine_serial, "sample", poisoned)
    engine = SerialEngine(tiny_lm)
    engine.start()
    try:
        with pytest.raises(RequestFaultError, match="sampling failed for this request: poison"):
            await collect(engine.submit(engine_request("poison", 4, seed=POISON_SEED)))
        assert (await collect(engine.submit(engine_request("ok", 4))))[-1].completion_tokens == 4
    finally:
        engine.close()


async def test_a_live_job_key_cannot_be_reused(batching: BatchingEngine) -> None:
    """Two live requests never share a key: ``DuplicateRequestError``; free again once done."""
    stream = batching.submit(engine_request("key", 200))
    await anext(stream)
    with pytest.raises(DuplicateRequestError):
        batching.submit(engine_request("key", 4))
    await stream.aclose()
    await eventually(lambda: "key" not in batching._jobs)
    assert (await collect(batching.submit(engine_request("key", 2))))[-1].completion_tokens == 2


# -- the node's statuses -----------------------------------------------------------------------


def node_request(key: str, max_new_tokens: int = 8, **options: Any) -> node_pb2.NodeGenerateRequest:
    return node_pb2.NodeGenerateRequest(
        request=inference_pb2.GenerateRequest(
            model=TINY,
            prompt=f"prompt of {key}",
            options=common_pb2.GenerationOptions(
                max_new_tokens=max_new_tokens, ignore_eos=True, **options
            ),
        ),
        tenant="alpha",
        request_id=key,
    )


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = unpack(details_of(exc), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return info


def violation_fields(exc: grpc.aio.AioRpcError) -> list[str]:
    bad = unpack(details_of(exc), error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    return [v.field for v in bad.field_violations]


async def test_node_answers_a_request_fault_invalid_argument_and_the_neighbour_finishes(
    suite: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the node's API: the poison request ends INVALID_ARGUMENT, ErrorInfo reason
    ``REQUEST_FAULT`` with its stage, BadRequest field ``options``; the other stream on the
    same node is undisturbed."""
    node = await suite.start_node("node-f")
    poison_logits(monkeypatch, node.engines[TINY], lambda key, n: key == "poison" and n >= 2)
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    victim = stub.Generate(node_request("victim", 120))
    await victim.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(node_request("poison", 50))]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err.value)
    assert info.reason == "REQUEST_FAULT"
    assert info.metadata["stage"] == "sampling"
    assert violation_fields(err.value) == ["options"]
    chunks = []
    while (chunk := await victim.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    assert chunks[-1].usage.completion_tokens == 120


async def test_node_refuses_unsafe_parameters_undefined_class_and_live_duplicate_keys(
    suite: Suite,
) -> None:
    """Defence in depth at the node: a denormal temperature and an undefined class are
    INVALID_ARGUMENT naming the field; a job key a live request holds is ALREADY_EXISTS."""
    node = await suite.start_node("node-v")
    stub = node_pb2_grpc.NodeStub(suite.channel(node.address))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(node_request("t", temperature=1e-45))]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err.value) == ["options.temperature"]
    undefined = node_request("c")
    undefined.request.workload_class = 7  # type: ignore[assignment]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(undefined)]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err.value) == ["workload_class"]
    live = stub.Generate(node_request("same", 300))
    await live.read()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(node_request("same"))]
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(err.value).reason == "JOB_KEY_IN_USE"
    live.cancel()


# -- the scheduler: validation at the edge -------------------------------------------------------

TENANT = Tenant("t", 1.0, frozenset(WorkloadClass), frozenset({"*"}), ("h",))


def catalog(name: str) -> ModelSpec | None:
    return next((m for m in DEFAULT_MODELS if m.name == name), None)


def refused_fields(request: inference_pb2.GenerateRequest) -> list[str]:
    with pytest.raises(InvalidArgument) as err:
        validate_generate(request, TENANT, catalog)
    return [f for f, _ in err.value.violations]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("temperature", 1e-45),
        ("temperature", 1e-39),
        ("temperature", 0.005),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", -0.5),
        ("top_p", 1e-45),
        ("top_p", math.nan),
        ("top_p", math.inf),
    ],
)
def test_scheduler_refuses_numerically_unsafe_sampling_parameters(
    option: str, value: float
) -> None:
    """NaN, infinities, denormals and temperatures so small they overflow logits are
    INVALID_ARGUMENT with the field, before any node sees them."""
    request = gen_request()
    setattr(request.options, option, value)
    assert refused_fields(request) == [f"options.{option}"]


def test_scheduler_accepts_greedy_and_the_edges_of_the_safe_ranges() -> None:
    """0 (greedy), 0.01 and 2 for temperature; a tiny but normal top_p; 1."""
    for temperature, top_p in [(0.0, 1.0), (0.01, 1e-30), (2.0, 1.0)]:
        request = gen_request()
        request.options.temperature = temperature
        request.options.top_p = top_p
        validate_generate(request, TENANT, catalog)


def test_undefined_class_is_a_field_violation_for_generate_and_embed() -> None:
    """Class 7 is INVALID_ARGUMENT + BadRequest ``workload_class`` for both kinds (Embed used
    to name the class in the access check and fail with ValueError: INTERNAL); its metrics
    label is the bounded ``unknown``."""
    request = gen_request(workload_class=7)
    assert refused_fields(request) == ["workload_class"]
    embed = inference_pb2.EmbedRequest(model="all-minilm-l6-v2", inputs=["x"], workload_class=7)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as err:
        validate_embed(embed, TENANT, catalog)
    assert [f for f, _ in err.value.violations] == ["workload_class"]
    assert class_label(7) == "unknown"
    assert class_label(0) == "realtime"
    assert class_label(2) == "batch"


def counter_value(counter: Counter, **labels: str) -> float:
    for metric in counter.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.labels == labels:
                return float(s.value)
    return 0.0


async def test_undefined_class_is_invalid_argument_end_to_end(running: Suite) -> None:
    """Over raw gRPC, Generate and Embed with class 7 answer INVALID_ARGUMENT naming
    ``workload_class`` (not INTERNAL); the refusal is counted under ``unknown``."""
    stub = running.inference()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(gen_request(workload_class=7), metadata=auth())]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err.value) == ["workload_class"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Embed(
            inference_pb2.EmbedRequest(model="all-minilm-l6-v2", inputs=["x"], workload_class=7),  # type: ignore[arg-type]
            metadata=auth(),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err.value) == ["workload_class"]
    scheduler = running.scheduler
    assert scheduler is not None
    requests = scheduler.metrics.requests
    assert counter_value(requests, kind="generate", workload_class="unknown", outcome="refused")


# -- the scheduler: whose fault, and job keys ----------------------------------------------------


def rpc_error(error: SluiceError | None, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """An ``AioRpcError`` as a node would return it (with our details when ``error``)."""
    trailing = grpc.aio.Metadata(*(error.trailing_metadata() if error else ()))
    details = error.message if error else "x"
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


def test_blame_only_node_and_transport_failures_on_the_node() -> None:
    """UNAVAILABLE and a bare INTERNAL/UNKNOWN/CANCELLED (transport) are the node's;
    RESOURCE_EXHAUSTED is the node being busy; INVALID_ARGUMENT (REQUEST_FAULT), an INTERNAL
    a node's handler answered, and any other answer are the request's."""
    code = grpc.StatusCode
    assert blame(rpc_error(None, code.UNAVAILABLE)) is Blame.NODE
    for transport in (code.INTERNAL, code.UNKNOWN, code.CANCELLED):
        assert blame(rpc_error(None, transport)) is Blame.NODE
    assert blame(rpc_error(None, code.RESOURCE_EXHAUSTED)) is Blame.BUSY
    fault = InvalidArgument([("options", "sampling failed")], reason="REQUEST_FAULT")
    assert blame(rpc_error(fault, code.INVALID_ARGUMENT)) is Blame.REQUEST
    assert blame(rpc_error(Internal("internal error"), code.INTERNAL)) is Blame.REQUEST
    for other in (code.INVALID_ARGUMENT, code.ALREADY_EXISTS, code.FAILED_PRECONDITION):
        assert blame(rpc_error(None, other)) is Blame.REQUEST


class ScriptedNode(node_pb2_grpc.NodeServicer):
    """A registered, SERVING node that sends ``chunks`` chunks, then fails with ``error``
    (a Sluice error, so with details) or a bare ``code``; it records what it was sent."""

    def __init__(self) -> None:
        self.chunks = 0
        self.error: SluiceError | None = None
        self.code = grpc.StatusCode.INTERNAL
        self.keys: list[str] = []
        self.correlation: list[str] = []

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.keys.append(request.request_id)
        metadata = dict(context.invocation_metadata() or ())
        self.correlation.append(str(metadata.get(REQUEST_ID_METADATA, "")))
        for i in range(self.chunks):
            yield inference_pb2.GenerateChunk(text="x", token_ids=[i])
        if self.error is not None:
            context.set_trailing_metadata(self.error.trailing_metadata())
            await context.abort(self.error.code, self.error.message)
        await context.abort(self.code, "bare failure")

    async def StreamLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        while True:
            yield common_pb2.LoadReport(node_id="scripted", state=common_pb2.NODE_STATE_SERVING)
            await asyncio.sleep(0.2)


@pytest.fixture
async def scripted(suite: Suite) -> AsyncIterator[ScriptedNode]:
    servicer = ScriptedNode()
    async with fake_node(suite.etcd, servicer, "scripted"):
        yield servicer


async def scheduler_with(suite: Suite, node_ids: list[str]) -> Any:
    await suite.start_cache()
    scheduler = await suite.start_scheduler()
    await eventually(lambda: len(scheduler.nodes.candidates(TINY, 1)) == len(node_ids))
    await eventually(lambda: all(n.load is not None for n in scheduler.nodes.nodes()))
    return scheduler


def spy_failures(monkeypatch: pytest.MonkeyPatch, handle: Any) -> list[int]:
    failures: list[int] = []
    real = handle.breaker.record_failure
    monkeypatch.setattr(handle.breaker, "record_failure", lambda: (failures.append(1), real()))
    return failures


@pytest.mark.parametrize("chunks", [0, 2], ids=["before-first-chunk", "mid-stream"])
async def test_a_request_fault_reaches_the_client_as_it_came_without_breaker_or_retry(
    suite: Suite, scripted: ScriptedNode, monkeypatch: pytest.MonkeyPatch, chunks: int
) -> None:
    """A node answering INVALID_ARGUMENT ``REQUEST_FAULT`` (before or after the first chunk):
    the client gets that status and its details (not UNAVAILABLE mid-stream), the node's
    breaker records no failure and the request is not tried on the healthy node."""
    await suite.start_node("healthy")
    scheduler = await scheduler_with(suite, ["scripted", "healthy"])
    scripted.chunks = chunks
    scripted.error = InvalidArgument([("options", "sampling failed")], reason="REQUEST_FAULT")
    failures = spy_failures(monkeypatch, scheduler.nodes.get("scripted"))
    healthy = suite.nodes[0].engines[TINY]
    on_healthy: list[bytes] = []
    real_submit = healthy.submit

    def submit(request: EngineRequest) -> Any:
        on_healthy.append(bytes(request.prompt_token_ids))
        return real_submit(request)

    monkeypatch.setattr(healthy, "submit", submit)
    stub = suite.inference()
    error: grpc.aio.AioRpcError | None = None
    for i in range(20):  # until power-of-two picks the scripted node
        try:
            _ = [c async for c in stub.Generate(gen_request(f"p{i}"), metadata=auth())]
        except grpc.aio.AioRpcError as exc:
            error, failed_prompt = exc, f"p{i}".encode()
            break
    assert error is not None, "the scripted node was never picked"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "REQUEST_FAULT"
    assert violation_fields(error) == ["options"]
    assert failures == []
    assert len(scripted.keys) == 1
    assert failed_prompt not in on_healthy
    assert counter_value(scheduler.metrics.retries, node="scripted") == 0


async def test_a_bare_internal_from_the_transport_is_a_node_fault_retried_elsewhere(
    suite: Suite, scripted: ScriptedNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INTERNAL without a Sluice status (what a broken transport gives) counts against the
    node's breaker and is retried on the healthy node: the client sees a success."""
    await suite.start_node("healthy")
    scheduler = await scheduler_with(suite, ["scripted", "healthy"])
    failures = spy_failures(monkeypatch, scheduler.nodes.get("scripted"))
    stub = suite.inference()
    for i in range(8):
        chunks = [c async for c in stub.Generate(gen_request(f"p{i}"), metadata=auth())]
        assert chunks[0].node_id == "healthy"
        if scripted.keys:
            break
    assert scripted.keys, "the scripted node was never picked"
    assert failures == [1]


async def test_job_keys_are_the_schedulers_own_unique_per_attempt(
    suite: Suite, scripted: ScriptedNode
) -> None:
    """The node's job key is made by the scheduler (never the client's x-request-id, which
    still arrives as correlation metadata), and differs between requests with the same id."""
    await scheduler_with(suite, ["scripted"])
    scripted.error = InvalidArgument([("options", "x")], reason="REQUEST_FAULT")
    stub = suite.inference()
    for _ in range(2):
        metadata = (*auth(), (REQUEST_ID_METADATA, "client-chosen"))
        with pytest.raises(grpc.aio.AioRpcError):
            _ = [c async for c in stub.Generate(gen_request(), metadata=metadata)]
    assert scripted.correlation == ["client-chosen", "client-chosen"]
    assert len(set(scripted.keys)) == 2
    assert all(len(k) == 32 and k != "client-chosen" for k in scripted.keys)


async def test_two_tenants_with_the_same_request_id_at_once_both_complete(running: Suite) -> None:
    """Two tenants send the same x-request-id concurrently to the same node: both streams
    complete (the client's id used to be the node's job key: the second was refused)."""
    stub = running.inference()
    same = (REQUEST_ID_METADATA, "collide")
    first = stub.Generate(gen_request("alpha's", 200), metadata=(*auth(), same))
    await first.read()
    second = gen_request("beta's", 8, workload_class=common_pb2.WORKLOAD_CLASS_BATCH)
    chunks = [c async for c in stub.Generate(second, metadata=(*auth(OTHER_KEY), same))]
    assert chunks[-1].usage.completion_tokens == 8
    rest = []
    while (chunk := await first.read()) is not grpc.aio.EOF:
        rest.append(chunk)
    assert rest[-1].usage.completion_tokens == 200


async def test_the_reported_poison_request_is_refused_and_the_neighbour_streams_on(
    running: Suite,
) -> None:
    """The report, end to end: another tenant streams; a Generate with temperature 1e-45
    used to fail the node's whole step (poison INTERNAL, the neighbour UNAVAILABLE "failed
    mid-stream ... INTERNAL"). Now the scheduler refuses it INVALID_ARGUMENT naming
    ``options.temperature`` and the neighbour's stream completes."""
    stub = running.inference()
    batch = common_pb2.WORKLOAD_CLASS_BATCH
    victim_request = gen_request("victim", 100, workload_class=batch)
    victim = stub.Generate(victim_request, metadata=auth(OTHER_KEY))
    await victim.read()
    poison = gen_request("poison", 20)
    poison.options.temperature = 1e-45
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _ = [c async for c in stub.Generate(poison, metadata=auth())]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err.value) == ["options.temperature"]
    rest = []
    while (chunk := await victim.read()) is not grpc.aio.EOF:
        rest.append(chunk)
    assert rest[-1].usage.completion_tokens == 100


async def test_poison_request_through_the_scheduler_fails_alone_mid_stream(
    running: Suite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end with the real node: a request whose logits turn NaN after 2 tokens ends
    INVALID_ARGUMENT ``REQUEST_FAULT`` at the client (not UNAVAILABLE); another tenant's
    stream on the same node completes; the node's breaker records nothing."""
    scheduler = running.scheduler
    assert scheduler is not None
    node = running.nodes[0]
    engine = node.engines[TINY]
    poison_keys: set[str] = set()
    real_submit = engine.submit

    def submit(request: EngineRequest) -> Any:
        if request.params.seed == POISON_SEED:
            poison_keys.add(request.request_id)
        return real_submit(request)

    monkeypatch.setattr(engine, "submit", submit)
    poison_logits(monkeypatch, engine, lambda key, n: key in poison_keys and n >= 2)
    failures = spy_failures(monkeypatch, scheduler.nodes.get("node-a"))
    stub = running.inference()
    victim_request = gen_request("victim", 150, workload_class=common_pb2.WORKLOAD_CLASS_BATCH)
    victim = stub.Generate(victim_request, metadata=auth(OTHER_KEY))
    await victim.read()
    poison = gen_request("poison", 50)
    poison.options.temperature = 0.7
    poison.options.seed = POISON_SEED
    call = stub.Generate(poison, metadata=auth())
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for chunk in call:
            received.append(chunk)
    assert received, "the fault came after the first chunk"
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err.value).reason == "REQUEST_FAULT"
    rest = []
    while (chunk := await victim.read()) is not grpc.aio.EOF:
        rest.append(chunk)
    assert rest[-1].usage.completion_tokens == 150
    assert failures == []
