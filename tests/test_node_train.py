"""``Node.Train`` on real node gRPC servers with the tiny Llama: a fine-tune streams its steps,
progress, durable checkpoints and the adapter it wrote, which the node then serves; a
cancelled fine-tune resumes from its checkpoint with the losses of one that never stopped;
inference beside training completes unchanged and waits for training no longer than the
yield bound; and every refusal carries its status and details."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from inference_node.adapters import AdapterRef, AdapterStore
from inference_node.app import NodeService
from inference_node.engine import BatchingEngine
from inference_node.lora import LoraAdapter
from inference_node.lora.weights import WEIGHTS_FILE
from inference_node.models import LanguageModel
from inference_node.train_request import encode_examples, plan_training
from inference_node.training import CheckpointStore, DirectoryCheckpointStore, Trainer
from sluice.contract import WorkloadClass
from sluice.v1 import common_pb2, inference_pb2, jobs_pb2, node_pb2, node_pb2_grpc
from tests.harness import Suite, eventually
from tests.test_end_to_end import details_of, unpack
from tests.test_lora_serving import merged_greedy

TENANT = "alpha"
YIELD_BOUND_S = 0.1
"""The nodes' yield bound. Twice the default: on this shared 2-core machine the tiny model's
units take 10-20 ms instead of well under 1 (the test's own event loop, serving the node's
gRPC in the same process, holds the GIL while the engine thread runs them), and the bound
holds only as well as those noisy measurements predict."""
EXAMPLES = [
    jobs_pb2.TrainingExample(prompt="Colour of the sky? ", completion="Blue, said the bot."),
    jobs_pb2.TrainingExample(prompt="Colour of grass? ", completion="Green, said the bot."),
    jobs_pb2.TrainingExample(
        messages=[
            common_pb2.ChatMessage(role="system", content="Answer as the bot."),
            common_pb2.ChatMessage(role="user", content="Colour of snow?"),
            common_pb2.ChatMessage(role="assistant", content="White, said the bot."),
        ]
    ),
    jobs_pb2.TrainingExample(prompt="Colour of coal? ", completion="Black, said the bot."),
    jobs_pb2.TrainingExample(
        messages=[
            common_pb2.ChatMessage(role="user", content="Colour of blood?"),
            common_pb2.ChatMessage(role="assistant", content="Red, said the bot."),
            common_pb2.ChatMessage(role="user", content="Thanks"),  # after the last turn
        ]
    ),
]


def finetune_spec(
    lm: LanguageModel, name: str, steps: int, **overrides: Any
) -> jobs_pb2.FinetuneSpec:
    """A spec that learns fast (rank 4 on every projection, a high rate, dropout on)."""
    spec = jobs_pb2.FinetuneSpec(
        base_model=lm.name,
        adapter_name=name,
        lora=jobs_pb2.LoraSettings(
            rank=4,
            dropout=0.1,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
        ),
        optimizer=jobs_pb2.OptimizerSettings(
            learning_rate=0.03, schedule=jobs_pb2.LR_SCHEDULE_LINEAR, warmup_steps=1
        ),
        max_steps=steps,
        micro_batch_size=2,
        seed=7,
        checkpoint_every_steps=3,
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def train_request(
    job_id: str, spec: jobs_pb2.FinetuneSpec, examples: Sequence[jobs_pb2.TrainingExample] = ()
) -> node_pb2.NodeTrainRequest:
    return node_pb2.NodeTrainRequest(
        job_id=job_id, tenant=TENANT, spec=spec, examples=list(examples or EXAMPLES)
    )


async def start_trainer(suite: Suite, node_id: str = "trainer", **overrides: Any) -> NodeService:
    """A node of the realtime and finetune pools on the suite's adapter and checkpoint
    directories."""
    settings: dict[str, Any] = {
        "pools": ["realtime", "finetune"],
        "adapters_dir": suite.tmp / "adapters",
        "checkpoint_dir": suite.tmp / "checkpoints",
        "adapter_cache_bytes": 2**24,
        "training_yield_bound_ms": YIELD_BOUND_S * 1000,
        "training_itl_budget_ms": 40.0,  # tokens every ~40 ms beside training: quick tests
        "max_sequences": 8,
        "memory_budget_bytes": 64 * 1024**2,
    }
    return await suite.start_node(node_id, **{**settings, **overrides})


def stub(suite: Suite, node: NodeService) -> node_pb2_grpc.NodeStub:
    return node_pb2_grpc.NodeStub(suite.channel(node.address))


async def events(call: Any) -> list[node_pb2.NodeTrainEvent]:
    async with asyncio.timeout(120):
        return [event async for event in call]


def of_kind(stream: list[node_pb2.NodeTrainEvent], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in stream if e.WhichOneof("event") == kind]


def started(stream: list[node_pb2.NodeTrainEvent]) -> jobs_pb2.TrainingProgress:
    """The first progress past the heartbeats of preparing (those say only the node)."""
    return next(p for p in of_kind(stream, "progress") if p.total_steps)


def losses(stream: list[node_pb2.NodeTrainEvent]) -> dict[int, float]:
    return {s.step: s.loss for s in of_kind(stream, "step")}


def generate_request(lm: LanguageModel, prompt: str, adapter: str = "", n: int = 12) -> Any:
    return node_pb2.NodeGenerateRequest(
        request=inference_pb2.GenerateRequest(
            model=lm.name,
            prompt=prompt,
            options=common_pb2.GenerationOptions(max_new_tokens=n, ignore_eos=True),
        ),
        tenant="beta",
        request_id=uuid.uuid4().hex,
        adapter=adapter,
    )


async def generate(node: node_pb2_grpc.NodeStub, request: Any) -> tuple[list[int], int]:
    """The tokens of a Generate, and its finish reason."""
    tokens, finish = [], 0
    async with asyncio.timeout(60):
        async for chunk in node.Generate(request, timeout=60):
            tokens += list(chunk.token_ids)
            finish = chunk.finish_reason or finish
    return tokens, finish


def local_trainer(lm: LanguageModel, spec: jobs_pb2.FinetuneSpec) -> Trainer:
    """What the node trains for ``spec`` on :data:`EXAMPLES`, built here."""
    plan = plan_training(train_request("local", spec), lm)
    examples = encode_examples(EXAMPLES, lm, plan.config.max_seq_len)
    return Trainer(lm, examples, plan.config)


def refusal(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    info = unpack(details_of(exc), error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return exc.code(), info.reason


async def test_train_streams_steps_progress_checkpoints_and_a_served_adapter(
    suite: Suite, tiny_lm: LanguageModel
) -> None:
    """Progress first; a step and a progress per optimizer step; checkpoint_step 3, 6 and 7
    (the end) once durable; the adapter last, in the store's peft layout with its size and
    SHA-256. The losses and weights are a local trainer's; Generate with
    ``adapter="alpha/sky"`` then gives what the peft-merged model gives, not the base's."""
    node = await start_trainer(suite)
    spec = finetune_spec(tiny_lm, "sky", 7)
    stream = await events(stub(suite, node).Train(train_request("job-sky", spec), timeout=120))
    kinds = [e.WhichOneof("event") for e in stream]
    assert kinds[0] == "progress" and kinds[-1] == "adapter" and kinds.count("adapter") == 1
    assert [s.step for s in of_kind(stream, "step")] == list(range(1, 8))
    assert of_kind(stream, "checkpoint_step") == [3, 6, 7]
    progress = of_kind(stream, "progress")
    assert len(progress) >= 8 and progress[-1].step == 7 and progress[-1].total_steps == 7
    assert {p.node_id for p in progress} == {"trainer"} and progress[-1].checkpoint_step == 6
    assert progress[-1].tokens_per_second > 0 and progress[-1].eta_unix_ms > 0
    assert all(s.tokens > 0 and s.at_unix_ms > 0 for s in of_kind(stream, "step"))

    adapter = stream[-1].adapter
    assert adapter.path == f"{TENANT}/{tiny_lm.name}/sky"
    directory = suite.tmp / "adapters" / adapter.path
    weights = (directory / WEIGHTS_FILE).read_bytes()
    assert adapter.size_bytes == len(weights)
    assert adapter.sha256 == hashlib.sha256(weights).hexdigest()
    assert sorted(p.name for p in directory.iterdir()) == [
        "adapter_config.json",
        WEIGHTS_FILE,
    ]
    assert DirectoryCheckpointStore(suite.tmp / "checkpoints").latest("job-sky") == 7

    local = local_trainer(tiny_lm, spec)
    expected = [local.train_step().loss for _ in range(7)]
    assert list(losses(stream).values()) == pytest.approx(expected, abs=1e-5)
    written = LoraAdapter.load(directory)
    for ours, theirs in zip(written.parameters(), local.adapter.parameters(), strict=True):
        assert (ours - theirs.detach()).abs().max().item() <= 1e-5

    node_stub, prompt = stub(suite, node), "Colour of the sea? "
    ids = tiny_lm.tokenizer.encode(prompt)
    adapted, finish = await generate(node_stub, generate_request(tiny_lm, prompt, "alpha/sky"))
    assert finish == common_pb2.FINISH_REASON_LENGTH
    assert adapted == merged_greedy(tiny_lm, directory, ids, 12)
    assert adapted != merged_greedy(tiny_lm, None, ids, 12)
    metrics = node.training.metrics
    assert metrics.steps.labels(tiny_lm.name)._value.get() == 7
    assert metrics.checkpoints.labels(tiny_lm.name)._value.get() == 3


async def test_a_cancelled_train_resumes_from_its_checkpoint_with_the_same_losses(
    suite: Suite, tiny_lm: LanguageModel
) -> None:
    """Cancelled after its first durable checkpoint, a fine-tune leaves its checkpoints and
    no adapter; Train again with the same job id starts at the newest checkpoint, first
    sending again every step up to it (those the cancelled call's reader never took
    included) with the losses and times the first call had, and every later step's loss
    equals an uninterrupted run's within 1e-4 (same seed), as does the adapter."""
    node = await start_trainer(suite)
    node_stub = stub(suite, node)
    steps = 24
    straight = await events(
        node_stub.Train(train_request("job-straight", finetune_spec(tiny_lm, "straight", steps)))
    )
    expected = losses(straight)
    assert sorted(expected) == list(range(1, steps + 1))

    request = train_request("job-resumed", finetune_spec(tiny_lm, "resumed", steps))
    call = node_stub.Train(request, timeout=120)
    seen: list[node_pb2.NodeTrainEvent] = []
    async with asyncio.timeout(60):
        while not seen or seen[-1].WhichOneof("event") != "checkpoint_step":
            seen.append(await call.read())
    call.cancel()
    await eventually(
        lambda: not node.training.active and node.engines[tiny_lm.name].training.run is None
    )
    store = DirectoryCheckpointStore(suite.tmp / "checkpoints")
    stopped_at = store.latest("job-resumed")
    assert stopped_at is not None and 3 <= stopped_at < steps
    adapters = AdapterStore(suite.tmp / "adapters")
    assert not adapters.directory(AdapterRef(TENANT, tiny_lm.name, "resumed")).exists()

    resumed = await events(node_stub.Train(request, timeout=120))
    first = started(resumed)
    assert first.step == stopped_at and first.checkpoint_step == stopped_at
    replayed = of_kind(resumed, "step")[:stopped_at]
    assert [s.step for s in replayed] == list(range(1, stopped_at + 1))
    assert replayed[: len(of_kind(seen, "step"))] == of_kind(seen, "step")
    got = losses(resumed)
    assert sorted(got) == list(range(1, steps + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-4), step
    ours = LoraAdapter.load(adapters.directory(AdapterRef(TENANT, tiny_lm.name, "resumed")))
    theirs = LoraAdapter.load(adapters.directory(AdapterRef(TENANT, tiny_lm.name, "straight")))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert (a - b).abs().max().item() <= 1e-4


async def test_generate_beside_training_is_unchanged_and_waits_within_the_yield_bound(
    suite: Suite, tiny_lm: LanguageModel
) -> None:
    """While a fine-tune runs, the load report shows the slots it holds
    (``reserved_sequences``, no sequence of any class) and its KV budget shrinks; afterwards
    neither. Generate streams, one after another and together, complete with the
    tokens they get on an idle node; the waits training caused them were recorded, in the
    policy and the metric alike, and their p99 is within the yield bound."""
    node = await start_trainer(suite)
    node_stub = stub(suite, node)
    prompts = ["Colour of the sea? ", "Hello there", "A longer prompt, for a longer prefill."]
    alone = [await generate(node_stub, generate_request(tiny_lm, p, n=24)) for p in prompts]
    budget_idle = node.servicer.load_report().kv_budget_bytes
    call = node_stub.Train(train_request("job-long", finetune_spec(tiny_lm, "long", 100_000)))
    async with asyncio.timeout(60):
        while (await call.read()).WhichOneof("event") != "step":
            pass
    report = node.servicer.load_report()
    counts = {c.workload_class: c.running for c in report.classes}
    assert counts[WorkloadClass.FINETUNE] == 0
    engine = node.engines[tiny_lm.name]
    assert isinstance(engine, BatchingEngine)
    reserved = engine.training.reserved_slots
    assert 0 < reserved < 8 and report.reserved_sequences == reserved
    assert report.kv_budget_bytes == (8 - reserved) * budget_idle // 8

    for _ in range(2):
        one_by_one = [
            await generate(node_stub, generate_request(tiny_lm, p, n=24)) for p in prompts
        ]
        together = await asyncio.gather(
            *(generate(node_stub, generate_request(tiny_lm, p, n=24)) for p in prompts)
        )
        assert one_by_one == alone and list(together) == alone
    call.cancel()
    await eventually(lambda: node.engines[tiny_lm.name].training.run is None)
    await eventually(lambda: node.servicer.load_report().reserved_sequences == 0)

    # Whether a request arrives while a unit runs (an admission wait) or a unit fits beside
    # running sequences (a decode delay) depends on thread timing; tests/test_training.py
    # records both on a fake clock. Here: some wait was recorded, each kind reached the
    # metric, and the p99 is within the bound.
    policy = engine.training.policy
    assert policy is not None and (policy.admission_waits or policy.decode_delays)
    p99 = policy.wait_quantile(0.99)
    assert p99 is not None and p99 <= YIELD_BOUND_S
    histogram = node.training.metrics.yield_wait
    for wait, waits in (("admission", policy.admission_waits), ("decode", policy.decode_delays)):
        assert (histogram.labels(tiny_lm.name, wait)._sum.get() > 0) == bool(waits)
    logging.getLogger(__name__).info(
        f"yield waits: {len(policy.admission_waits)} admission, {len(policy.decode_delays)} "
        f"decode; p50 {policy.wait_quantile(0.5):.4f} s, p99 {p99:.4f} s, "
        f"max {max([*policy.admission_waits, *policy.decode_delays]):.4f} s"
    )
    assert node.servicer.load_report().kv_budget_bytes == budget_idle


class SlowStore:
    """The fleet's checkpoint store on a slow filesystem (a fault injected on purpose): every
    read and write takes ``delay_s`` longer."""

    def __init__(self, inner: CheckpointStore, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def save(self, job_id: str, step: int, files: Mapping[str, bytes]) -> None:
        time.sleep(self.delay_s)
        self.inner.save(job_id, step, files)

    def latest(self, job_id: str) -> int | None:
        time.sleep(self.delay_s)
        return self.inner.latest(job_id)

    def load(self, job_id: str, step: int) -> dict[str, bytes]:
        return self.inner.load(job_id, step)


async def test_a_slow_store_never_silences_the_stream_for_more_than_a_beat(
    suite: Suite, tiny_lm: LanguageModel
) -> None:
    """With every checkpoint read and write taking 3 s, events still come about every
    second (the scheduler counts a silent call as stalled): heartbeats naming the node while
    it prepares (``total_steps`` 0), progress while it saves; every checkpoint is durable
    before its ``checkpoint_step``, and the adapter comes last."""
    node = await start_trainer(suite)
    node.training.checkpoints = SlowStore(node.training.checkpoints, 3.0)
    call = stub(suite, node).Train(
        train_request("job-slow", finetune_spec(tiny_lm, "slow", 4)), timeout=120
    )
    stream, gaps, last = [], [], time.monotonic()
    async with asyncio.timeout(120):
        async for event in call:
            gaps.append(time.monotonic() - last)
            last = time.monotonic()
            stream.append(event)
    assert max(gaps) < 2.2, gaps
    heartbeat = stream[0].progress
    assert heartbeat.node_id == "trainer" and heartbeat.total_steps == 0
    assert of_kind(stream, "checkpoint_step") == [3, 4]
    assert stream[-1].WhichOneof("event") == "adapter"
    assert DirectoryCheckpointStore(suite.tmp / "checkpoints").latest("job-slow") == 4


# -- refusals ----------------------------------------------------------------------------------


async def test_a_bad_request_is_refused_naming_every_field(
    suite: Suite, tiny_lm: LanguageModel
) -> None:
    """INVALID_ARGUMENT with a BadRequest violation per field out of range, then per example
    that cannot be learned; nothing is trained."""
    node = await start_trainer(suite)
    node_stub = stub(suite, node)
    spec = finetune_spec(tiny_lm, "bad name!", 5)
    spec.lora.rank = 300
    spec.lora.dropout = 0.9
    spec.lora.target_modules.append("embed_tokens")
    spec.optimizer.learning_rate = float("nan")
    spec.micro_batch_size = -1
    request = node_pb2.NodeTrainRequest(job_id="../x", tenant=TENANT, spec=spec)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await events(node_stub.Train(request))
    assert refusal(err.value) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    bad = unpack(details_of(err.value), error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert {v.field for v in bad.field_violations} == {
        "job_id",
        "spec.adapter_name",
        "spec.lora.rank",
        "spec.lora.dropout",
        "spec.lora.target_modules",
        "spec.optimizer.learning_rate",
        "spec.micro_batch_size",
        "examples",
    }
    examples = [
        jobs_pb2.TrainingExample(prompt="no completion"),
        jobs_pb2.TrainingExample(messages=[common_pb2.ChatMessage(role="user", content="hi")]),
        jobs_pb2.TrainingExample(
            prompt="both", messages=[common_pb2.ChatMessage(role="assistant", content="x")]
        ),
        jobs_pb2.TrainingExample(prompt="x" * 600, completion="too late to learn"),
        EXAMPLES[0],
    ]
    request = train_request("job-bad", finetune_spec(tiny_lm, "fine", 5), examples)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await events(node_stub.Train(request))
    bad = unpack(details_of(err.value), error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == [
        "examples[0].completion",
        "examples[1].messages",
        "examples[2]",
        "examples[3]",
    ]
    assert not node.training.active
    assert DirectoryCheckpointStore(suite.tmp / "checkpoints").latest("job-bad") is None


async def test_a_node_that_cannot_train_refuses_with_failed_precondition(
    suite: Suite, tiny_lm: LanguageModel
) -> None:
    """Outside the finetune pool (NOT_FINETUNE_NODE), a base model not loaded
    (MODEL_NOT_TRAINABLE), and training memory that would leave no KV slot for inference
    (TRAINING_MEMORY_EXCEEDED) are FAILED_PRECONDITION."""
    spec = finetune_spec(tiny_lm, "x", 3)
    realtime = await start_trainer(suite, "realtime-only", pools=["realtime"])
    small = await start_trainer(suite, "one-slot", max_sequences=1)
    other = finetune_spec(tiny_lm, "x", 3, base_model="smollm2-135m-instruct")
    trainer = await start_trainer(suite)
    cases = [
        (realtime, spec, "NOT_FINETUNE_NODE"),
        (trainer, other, "MODEL_NOT_TRAINABLE"),
        (small, spec, "TRAINING_MEMORY_EXCEEDED"),
    ]
    for node, asked, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await events(stub(suite, node).Train(train_request("job-x", asked)))
        assert refusal(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, reason)
        assert not node.training.active


async def test_one_fine_tune_at_a_time_and_a_foreign_checkpoint_is_refused(
    suite: Suite, tiny_lm: LanguageModel
) -> None:
    """A second Train while one runs is RESOURCE_EXHAUSTED (TRAINING_BUSY) with RetryInfo; a
    job whose checkpoint was made with another seed is FAILED_PRECONDITION
    (CHECKPOINT_MISMATCH); an adapter name already taken is ALREADY_EXISTS."""
    node = await start_trainer(suite)
    node_stub = stub(suite, node)
    call = node_stub.Train(train_request("job-a", finetune_spec(tiny_lm, "a", 100_000)))
    async with asyncio.timeout(60):
        while (await call.read()).WhichOneof("event") != "checkpoint_step":
            pass
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await events(node_stub.Train(train_request("job-b", finetune_spec(tiny_lm, "b", 3))))
    assert refusal(err.value) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TRAINING_BUSY")
    retry = unpack(details_of(err.value), error_details_pb2.RetryInfo)
    assert isinstance(retry, error_details_pb2.RetryInfo) and retry.retry_delay.seconds > 0
    call.cancel()
    await eventually(lambda: node.engines[tiny_lm.name].training.run is None)

    reseeded = finetune_spec(tiny_lm, "a", 100_000, seed=8)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await events(node_stub.Train(train_request("job-a", reseeded)))
    assert refusal(err.value) == (grpc.StatusCode.FAILED_PRECONDITION, "CHECKPOINT_MISMATCH")

    await events(node_stub.Train(train_request("job-c", finetune_spec(tiny_lm, "c", 2))))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await events(node_stub.Train(train_request("job-d", finetune_spec(tiny_lm, "c", 2))))
    assert refusal(err.value) == (grpc.StatusCode.ALREADY_EXISTS, "ADAPTER_EXISTS")


async def test_a_drain_stops_training_unavailable_and_keeps_the_checkpoints(
    suite: Suite, tiny_lm: LanguageModel
) -> None:
    """A drain ends a running Train UNAVAILABLE (NODE_DRAINING) after the current unit, so
    the scheduler moves the job; its checkpoints stay and another node resumes from them."""
    node = await start_trainer(suite)
    request = train_request("job-moved", finetune_spec(tiny_lm, "moved", 100_000))
    call = stub(suite, node).Train(request)
    async with asyncio.timeout(60):
        while (await call.read()).WhichOneof("event") != "checkpoint_step":
            pass
    await node.drain(1.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(30):
            while await call.read() != grpc.aio.EOF:
                pass
    assert refusal(err.value) == (grpc.StatusCode.UNAVAILABLE, "NODE_DRAINING")
    latest = DirectoryCheckpointStore(suite.tmp / "checkpoints").latest("job-moved")
    assert latest is not None and latest >= 3

    other = await start_trainer(suite, "trainer-2")
    short = train_request("job-moved", finetune_spec(tiny_lm, "moved", 100_000))
    call = stub(suite, other).Train(short)
    first = await call.read()
    while not first.progress.total_steps:  # heartbeats while it prepares
        first = await call.read()
    assert first.progress.step >= latest and first.progress.node_id == "trainer-2"
    call.cancel()


# -- the request's translation -----------------------------------------------------------------


def test_a_spec_of_zeros_gets_the_proto_s_defaults(tiny_lm: LanguageModel) -> None:
    """Rank 8, alpha 2 × rank, the attention projections, rate 2e-4 on a cosine schedule, no
    clipping, one epoch of micro-batches of one, 512 tokens, a checkpoint every 20 steps."""
    request = node_pb2.NodeTrainRequest(
        job_id="j",
        tenant=TENANT,
        spec=jobs_pb2.FinetuneSpec(base_model=tiny_lm.name, adapter_name="zeros"),
        examples=EXAMPLES,
    )
    plan = plan_training(request, tiny_lm)
    config = plan.config
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (8, 16.0, 0.0)
    assert config.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert config.optimizer.learning_rate == 2e-4 and config.optimizer.schedule == "cosine"
    assert config.optimizer.max_grad_norm is None and config.optimizer.warmup_steps == 0
    assert (config.epochs, config.max_steps, config.micro_batch_size) == (1, None, 1)
    assert (config.accumulation_steps, config.max_seq_len, plan.checkpoint_every) == (1, 512, 20)
    assert plan.adapter == AdapterRef(TENANT, tiny_lm.name, "zeros")


def test_examples_longer_than_max_sequence_tokens_are_cut_to_it(tiny_lm: LanguageModel) -> None:
    """A prompt/completion is cut after ``max_sequence_tokens`` tokens, learning what is left
    of its completion; a chat learns its assistant turns up to its last one (later turns
    dropped), the end of turn included."""
    long = jobs_pb2.TrainingExample(prompt="p" * 20, completion="c" * 30)
    (cut,) = encode_examples([long], tiny_lm, 32)
    (chat,) = encode_examples([EXAMPLES[4]], tiny_lm, 512)
    assert len(cut.tokens) == 32 and cut.target_tokens == 12
    rendered = tiny_lm.tokenizer.apply_chat_template([("user", "Colour of blood?")])
    assert chat.tokens[: len(rendered)] == tuple(rendered)
    learned = bytes(t for t, on in zip(chat.tokens, chat.learned, strict=True) if on)
    assert learned == b"Red, said the bot.\n"
