"""Fine-tune jobs through the Jobs API with real services: a real scheduler (two, where a replica
dies), real Redis and etcd. Training runs on the real node where it trains; the driver's
moves, retries and takeovers are tested against ``TrainingNode``, a Node servicer scripted to
fail on purpose (a node killed mid-stream, one busy, one failing every call): faults injected,
nothing mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis.asyncio as redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from scheduler.adapters import AdapterRecord
from scheduler.app import SchedulerService
from scheduler.jobs.finetune_intake import (
    MAX_FINETUNE_EXAMPLES,
    TrainIntake,
    check_spec,
    example_violations,
    total_steps,
)
from scheduler.jobs.finetune_policy import NodeLoad, Waiting, busy_nodes, choose_node, order_waiting
from sluice.contract import NODES_PREFIX
from sluice.runtime.errors import InvalidArgument, ResourceExhausted, SluiceError
from sluice.runtime.registry import Registration, etcd_client
from sluice.v1 import common_pb2, inference_pb2, jobs_pb2, node_pb2, node_pb2_grpc
from tests import harness
from tests.harness import API_KEY, OTHER_KEY, Suite, auth, eventually

MODEL = "tiny-random-llama"
FINAL = {
    jobs_pb2.JOB_STATE_COMPLETED,
    jobs_pb2.JOB_STATE_FAILED,
    jobs_pb2.JOB_STATE_CANCELLED,
    jobs_pb2.JOB_STATE_EXPIRED,
}
FAST = {"job_reclaim_idle_seconds": 1.0, "job_heartbeat_seconds": 0.3}


# -- helpers ---------------------------------------------------------------------------------


def example(i: int) -> jobs_pb2.JobLine:
    if i % 2:
        train = jobs_pb2.TrainingExample(prompt=f"Q{i}?", completion=f"A{i}.")
    else:
        train = jobs_pb2.TrainingExample(
            messages=[
                common_pb2.ChatMessage(role="user", content=f"hi {i}"),
                common_pb2.ChatMessage(role="assistant", content=f"arr {i}"),
            ]
        )
    return jobs_pb2.JobLine(custom_id=f"ex-{i}", train=train)


def spec(name: str = "pirate", **overrides: Any) -> jobs_pb2.FinetuneSpec:
    fields: dict[str, Any] = {"base_model": MODEL, "adapter_name": name, "max_steps": 6}
    fields.update(checkpoint_every_steps=2)
    fields.update(overrides)
    return jobs_pb2.FinetuneSpec(**fields)


async def _parts(
    lines: Sequence[jobs_pb2.JobLine], header: jobs_pb2.JobHeader, chunk: int
) -> AsyncIterator[jobs_pb2.SubmitJobRequest]:
    yield jobs_pb2.SubmitJobRequest(header=header)
    for start in range(0, len(lines), chunk):
        yield jobs_pb2.SubmitJobRequest(lines=jobs_pb2.JobLines(lines=lines[start : start + chunk]))


async def submit(
    suite: Suite,
    finetune: jobs_pb2.FinetuneSpec,
    lines: Sequence[jobs_pb2.JobLine] | None = None,
    *,
    key: str = "",
    window_s: int = 0,
    api_key: str = API_KEY,
    chunk: int = 50,
) -> jobs_pb2.Job:
    header = jobs_pb2.JobHeader(
        kind=jobs_pb2.JOB_KIND_FINETUNE,
        idempotency_key=key,
        completion_window_seconds=window_s,
        finetune=finetune,
    )
    body = lines if lines is not None else [example(i) for i in range(8)]
    return await suite.jobs().SubmitJob(
        _parts(body, header, chunk), metadata=auth(api_key), timeout=60
    )


async def get(suite: Suite, job_id: str) -> jobs_pb2.Job:
    return await suite.jobs().GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=auth())


async def wait_for(suite: Suite, job_id: str, done: Any, timeout: float = 30.0) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await get(suite, job_id)
        if done(job):
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)


async def wait_final(suite: Suite, job_id: str, timeout: float = 30.0) -> jobs_pb2.Job:
    return await wait_for(suite, job_id, lambda j: j.state in FINAL, timeout)


async def steps(suite: Suite, job_id: str) -> list[jobs_pb2.JobResult]:
    out: list[jobs_pb2.JobResult] = []
    request = jobs_pb2.GetJobResultsRequest(job_id=job_id)
    async for page in suite.jobs().GetJobResults(request, metadata=auth()):
        out.extend(page.results)
    return sorted(out, key=lambda r: r.step.step)


def refusal(err: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> list[tuple[str, str]]:
    """The BadRequest field violations of a refusal."""
    status = rpc_status.from_call(err.value)
    assert status is not None
    out = []
    for packed in status.details:
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


# -- a Node servicer with training faults injected on purpose ---------------------------------


@dataclass
class Fleet:
    """What the fake nodes share, as real nodes share the fleet's checkpoint store: each job's
    last checkpointed step; every Train call, as ``(node_id, job_id, first step)``; the calls
    of each job open now, and the most ever open at once."""

    checkpoints: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    open: dict[str, int] = field(default_factory=dict)
    most_open: dict[str, int] = field(default_factory=dict)


def loss_at(step: int) -> float:
    return 2.0 / (1.0 + 0.25 * step)


class TrainingNode(node_pb2_grpc.NodeServicer):
    """Trains nothing: reports steps with a fixed loss curve, checkpoints every
    ``checkpoint_every_steps`` into the shared :class:`Fleet`, resumes from there (first sending
    the steps up to it again, as a real node sends those its checkpoint remembers), ends with
    the adapter event. Scripted faults: ``busy`` refusals (RESOURCE_EXHAUSTED + RetryInfo),
    ``refusals`` (each call takes the next, before training), ``fail_calls`` calls aborted
    after their first step, ``step_s`` per step, ``hold_s`` the call stays open after the
    adapter event."""

    def __init__(
        self,
        node_id: str,
        fleet: Fleet,
        *,
        step_s: float = 0.05,
        busy: int = 0,
        fail_calls: int = 0,
        refusals: Sequence[SluiceError] = (),
        hold_s: float = 0.0,
    ) -> None:
        self.node_id = node_id
        self.fleet = fleet
        self.step_s = step_s
        self.busy = busy
        self.fail_calls = fail_calls
        self.refusals = list(refusals)
        self.hold_s = hold_s

    async def StreamLoad(  # type: ignore[override]
        self, request: node_pb2.StreamLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.LoadReport]:
        while True:
            yield common_pb2.LoadReport(node_id=self.node_id, state=common_pb2.NODE_STATE_SERVING)
            await asyncio.sleep(0.2)

    async def Train(  # type: ignore[override]
        self, request: node_pb2.NodeTrainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.NodeTrainEvent]:
        if self.busy:
            self.busy -= 1
            refused = ResourceExhausted("already training", retry_after_s=0.3, reason="BUSY")
            await context.abort_with_status(rpc_status.to_status(refused.to_status_proto()))
        job = request.job_id
        self.fleet.calls.append((self.node_id, job, self.fleet.checkpoints.get(job, 0) + 1))
        if self.refusals:
            refused = self.refusals.pop(0)
            await context.abort_with_status(rpc_status.to_status(refused.to_status_proto()))
        fleet = self.fleet
        fleet.open[job] = fleet.open.get(job, 0) + 1
        fleet.most_open[job] = max(fleet.most_open.get(job, 0), fleet.open[job])
        try:
            async with contextlib.aclosing(self._train(request, context)) as events:
                async for event in events:
                    yield event
        except (asyncio.CancelledError, GeneratorExit):  # cancelled, wherever it waited
            fleet.cancelled.append(job)
            raise
        finally:
            fleet.open[job] -= 1

    async def _train(
        self, request: node_pb2.NodeTrainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.NodeTrainEvent]:
        job, spec_ = request.job_id, request.spec
        total = spec_.max_steps
        start = self.fleet.checkpoints.get(job, 0)
        for step in range(1, start + 1):
            yield node_pb2.NodeTrainEvent(
                step=jobs_pb2.TrainingStep(step=step, loss=loss_at(step), tokens=10)
            )
        for step in range(start + 1, total + 1):
            await asyncio.sleep(self.step_s)
            yield node_pb2.NodeTrainEvent(
                step=jobs_pb2.TrainingStep(
                    step=step, loss=loss_at(step), learning_rate=1e-3, tokens=10
                )
            )
            if self.fail_calls:
                self.fail_calls -= 1
                await context.abort(grpc.StatusCode.INTERNAL, "injected training fault")
            if step % spec_.checkpoint_every_steps == 0:
                self.fleet.checkpoints[job] = step
                yield node_pb2.NodeTrainEvent(checkpoint_step=step)
            yield node_pb2.NodeTrainEvent(
                progress=jobs_pb2.TrainingProgress(
                    step=step,
                    total_steps=total,
                    loss=loss_at(step),
                    learning_rate=1e-3,
                    tokens_per_second=200.0,
                    node_id=self.node_id,
                    checkpoint_step=self.fleet.checkpoints.get(job, 0),
                    eta_unix_ms=int(time.time() * 1000) + 1000,
                )
            )
        path = f"{request.tenant}/{spec_.base_model}/{spec_.adapter_name}"
        yield node_pb2.NodeTrainEvent(adapter=node_pb2.TrainedAdapter(path=path))
        await asyncio.sleep(self.hold_s)


@contextlib.asynccontextmanager
async def training_node(etcd: str, servicer: TrainingNode) -> AsyncIterator[grpc.aio.Server]:
    """Serve ``servicer`` as a registered SERVING node of the realtime and finetune pools
    offering the tiny model; stopping the yielded server kills it (its registration stays, as
    after ``kill -9`` until the lease lapses)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    node_pb2_grpc.add_NodeServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    info = common_pb2.NodeInfo(
        node_id=servicer.node_id,
        address=f"127.0.0.1:{port}",
        models=[common_pb2.ModelInfo(name=MODEL, kind=common_pb2.MODEL_KIND_GENERATE)],
        pools=["realtime", "finetune"],
        capacity=common_pb2.Capacity(max_sequences=8),
        state=common_pb2.NODE_STATE_SERVING,
    )
    client = etcd_client(etcd)
    registration = Registration(
        client, NODES_PREFIX + servicer.node_id, info.SerializeToString(), 2
    )
    await registration.start()
    try:
        yield server
    finally:
        await registration.stop()
        await server.stop(0)
        await client.close()


async def adapter_in_etcd(etcd: str, tenant: str, name: str) -> AdapterRecord | None:
    client = etcd_client(etcd)
    try:
        found = await client.get(f"/sluice/adapters/{tenant}/{MODEL}/{name}".encode())
    finally:
        await client.close()
    return AdapterRecord.decode(found.value) if found is not None else None


async def finetune_nodes(scheduler: SchedulerService, count: int) -> None:
    def ready() -> bool:
        return len(scheduler.nodes.candidates(MODEL, 3)) >= count  # 3: FINETUNE

    await eventually(ready)


# -- pure parts --------------------------------------------------------------------------------


def test_a_spec_gets_the_protos_defaults_and_every_bad_field_is_named() -> None:
    """Zero fields take the proto's defaults (rank 8, alpha 2 x rank, lr 2e-4, cosine, the four
    attention projections, 512 tokens, a checkpoint every 20 steps); out-of-range fields are
    all named under header.finetune."""
    tenant = harness.test_tenants().get("alpha")
    assert tenant is not None
    filled = check_spec(
        jobs_pb2.FinetuneSpec(base_model=MODEL, adapter_name="ok-1"), tenant, lambda m: True
    )
    assert (filled.lora.rank, filled.lora.alpha) == (8, 16.0)
    assert filled.optimizer.learning_rate == pytest.approx(2e-4)
    assert filled.optimizer.schedule == jobs_pb2.LR_SCHEDULE_COSINE
    assert list(filled.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (filled.epochs, filled.micro_batch_size, filled.gradient_accumulation_steps) == (1, 1, 1)
    assert (filled.max_sequence_tokens, filled.checkpoint_every_steps) == (512, 20)
    bad = jobs_pb2.FinetuneSpec(
        base_model="nope",
        adapter_name="Bad_Name",
        lora=jobs_pb2.LoraSettings(rank=300, dropout=0.9, target_modules=["q_proj", "wq"]),
        optimizer=jobs_pb2.OptimizerSettings(learning_rate=float("nan")),
        micro_batch_size=-1,
        epochs=1000,
    )
    with pytest.raises(InvalidArgument) as err:
        check_spec(bad, tenant, lambda m: m == MODEL)
    fields = {f for f, _ in err.value.violations}
    assert fields == {
        f"header.finetune.{f}"
        for f in (
            "base_model",
            "adapter_name",
            "lora.rank",
            "lora.dropout",
            "lora.target_modules",
            "optimizer.learning_rate",
            "micro_batch_size",
            "epochs",
        )
    }


def test_examples_are_checked_one_by_one_and_steps_counted_as_the_node_counts() -> None:
    """A prompt without completion, a chat ending with the user, a bad role and a batch line are
    each named by field; steps are max_steps, else ceil(epochs x micro-batches / accumulation)."""
    assert example_violations(example(1)) == []
    assert example_violations(example(2)) == []
    no_completion = jobs_pb2.JobLine(train=jobs_pb2.TrainingExample(prompt="x"))
    assert [f for f, _ in example_violations(no_completion)] == ["train.completion"]
    chat = jobs_pb2.JobLine(
        train=jobs_pb2.TrainingExample(
            messages=[
                common_pb2.ChatMessage(role="robot", content="a"),
                common_pb2.ChatMessage(role="user", content="b"),
            ]
        )
    )
    assert [f for f, _ in example_violations(chat)] == [
        "train.messages[0].role",
        "train.messages[1]",
    ]
    batch = jobs_pb2.JobLine(generate={"model": MODEL, "prompt": "x"})
    assert [f for f, _ in example_violations(batch)] == ["body"]
    assert total_steps(jobs_pb2.FinetuneSpec(max_steps=7), 100) == 7
    s = jobs_pb2.FinetuneSpec(epochs=3, micro_batch_size=4, gradient_accumulation_steps=2)
    assert total_steps(s, 10) == 5  # 3 epochs x 3 micro-batches = 9, over 2 → 5


def test_examples_beyond_the_limit_refuse_the_job_whole() -> None:
    """One example more than MAX_FINETUNE_EXAMPLES refuses the job (INVALID_ARGUMENT lines)."""
    intake = TrainIntake(0, 4.0)
    chunk = jobs_pb2.JobLines(lines=[example(1)] * 1000)
    with pytest.raises(InvalidArgument) as err:
        for _ in range(MAX_FINETUNE_EXAMPLES // 1000 + 1):
            intake.take(chunk)
    assert err.value.violations[0][0] == "lines"
    assert intake.count == MAX_FINETUNE_EXAMPLES + 1


def test_waiting_fine_tunes_are_taken_tenant_fair_then_by_deadline() -> None:
    """The tenant training fewest per weight goes first; within it, the earliest deadline."""
    jobs = [
        Waiting("a1", "a", 300, 1),
        Waiting("a2", "a", 100, 2),
        Waiting("b1", "b", 200, 3),
        Waiting("c1", "c", 50, 4),
    ]
    got = order_waiting(jobs, {"a": 0, "b": 0, "c": 1}, {"a": 1.0, "b": 1.0, "c": 1.0})
    assert [j.job_id for j in got] == ["a2", "b1", "c1", "a1"]
    heavy = order_waiting(jobs, {"a": 1, "b": 1, "c": 1}, {"a": 4.0, "b": 1.0, "c": 1.0})
    assert heavy[0].job_id == "a2"


def test_a_node_is_chosen_by_spare_capacity_skipping_busy_and_avoided_ones() -> None:
    """Fewest sequences per slot wins; nodes training another job (seen recently) or avoided
    until later are skipped; none left → None."""
    loads = [NodeLoad("n1", 6, 8), NodeLoad("n2", 1, 8), NodeLoad("n3", 0, 8)]
    busy = busy_nodes([("j1", "n3", 1_000), ("j2", "n1", 0)], 1_500, 1_000, exclude="j9")
    assert busy == frozenset({"n3"})
    assert choose_node(loads, busy, {}, 10.0) == loads[1]
    assert choose_node(loads, busy, {"n2": 11.0}, 10.0) == loads[0]
    assert choose_node(loads, busy, {"n2": 9.0}, 10.0) == loads[1]
    assert choose_node(loads, frozenset({"n1", "n2", "n3"}), {}, 10.0) is None


# -- intake against the real scheduler -----------------------------------------------------------


@pytest.fixture
async def scheduler(suite: Suite) -> SchedulerService:
    """A scheduler serving jobs (Redis), no node yet."""
    return await suite.start_scheduler(redis_url=suite.redis_url, **FAST)


async def test_a_bad_spec_or_bad_examples_are_refused_whole_with_line_numbers(
    suite: Suite, scheduler: SchedulerService
) -> None:
    """A bad spec field is INVALID_ARGUMENT naming header.finetune.<field>; malformed examples
    are listed as lines[N].train.<field> with "line N", nothing is stored; a batch line in a
    fine-tune, a spec on a batch job, and a class the tenant lacks are refused too."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(suite, spec(lora=jobs_pb2.LoraSettings(rank=999)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in refusal(err)] == ["header.finetune.lora.rank"]
    lines = [example(i) for i in range(6)]
    lines[2] = jobs_pb2.JobLine(custom_id="x", train=jobs_pb2.TrainingExample(prompt="only"))
    lines[4] = jobs_pb2.JobLine(custom_id="y", generate={"model": MODEL, "prompt": "hi"})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(suite, spec(), lines, chunk=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = refusal(err)
    assert violations[0][0] == "lines" and "2 of 6" in violations[0][1]
    assert violations[1] == ("lines[3].train.completion", violations[1][1])
    assert violations[1][1].startswith("line 3:")
    assert violations[2][0] == "lines[5].body"
    batch_with_spec = jobs_pb2.JobHeader(kind=jobs_pb2.JOB_KIND_BATCH, finetune=spec())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await suite.jobs().SubmitJob(_parts([example(1)], batch_with_spec, 1), metadata=auth())
    assert "header.finetune" in [f for f, _ in refusal(err)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(suite, spec(), api_key=OTHER_KEY)
    assert [f for f, _ in refusal(err)] == ["header.workload_class"]
    listed = await suite.jobs().ListJobs(jobs_pb2.ListJobsRequest(), metadata=auth())
    assert not listed.jobs


async def test_an_adapter_name_is_taken_by_a_registered_adapter_or_a_live_job(
    suite: Suite, scheduler: SchedulerService
) -> None:
    """A name registered in etcd, or claimed by a fine-tune job not final, is ALREADY_EXISTS;
    the same idempotency key still returns the first job; once that job is cancelled the name
    is free again."""
    record = AdapterRecord("alpha", MODEL, "taken")
    client = etcd_client(suite.etcd)
    await client.put(record.key.encode(), record.encode())
    await client.close()
    await eventually(lambda: scheduler.adapter_view.get(f"alpha/{MODEL}/taken"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(suite, spec("taken"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first = await submit(suite, spec("fresh"), key="k1")
    assert first.state == jobs_pb2.JOB_STATE_QUEUED
    assert first.kind == jobs_pb2.JOB_KIND_FINETUNE
    assert (first.request_counts.total, first.training.total_steps) == (8, 6)
    again = await submit(suite, spec("fresh"), key="k1")
    assert again.job_id == first.job_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(suite, spec("fresh"), key="k2")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.job_id in (err.value.details() or "")
    cancel = jobs_pb2.CancelJobRequest(job_id=first.job_id)
    cancelled = await suite.jobs().CancelJob(cancel, metadata=auth())
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    assert cancelled.request_counts.cancelled == 8
    second = await submit(suite, spec("fresh"), key="k3")
    assert second.job_id != first.job_id


# -- running, against nodes with faults injected -----------------------------------------------


async def test_a_fine_tune_runs_records_its_loss_curve_and_registers_its_adapter(
    suite: Suite,
) -> None:
    """The job trains on the finetune node: RUNNING with GetJob's training progress and
    WatchJob events, every step stored once as a result (the loss curve), then its adapter
    registered in etcd (tenant, base, name, shared, job id) and the job COMPLETED with it."""
    fleet = Fleet()
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, step_s=0.1)):
        scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
        await finetune_nodes(scheduler, 1)
        job = await submit(suite, spec(shared=True))
        watched = [
            e.job
            async for e in suite.jobs().WatchJob(
                jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=auth(), timeout=30
            )
        ]
    done = watched[-1]
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
    assert done.adapter == f"{MODEL}:pirate"
    assert done.request_counts.completed == 8
    running = [j for j in watched if j.state == jobs_pb2.JOB_STATE_RUNNING]
    assert running and running[-1].training.node_id == "ft-a"
    assert any(j.training.checkpoint_step >= 2 for j in running)
    assert max(j.training.step for j in watched) == 6
    curve = await steps(suite, job.job_id)
    assert [r.step.step for r in curve] == [1, 2, 3, 4, 5, 6]
    assert [r.step.loss for r in curve] == pytest.approx([loss_at(s) for s in range(1, 7)])
    registered = await adapter_in_etcd(suite.etcd, "alpha", "pirate")
    assert registered is not None
    assert (registered.shared, registered.job_id) == (True, job.job_id)


async def test_cancel_stops_training_and_keeps_the_steps_so_far(suite: Suite) -> None:
    """Cancel mid-training: the node's Train call is cancelled, the job CANCELLED with its
    examples counted cancelled, the steps done kept, no adapter registered."""
    fleet = Fleet()
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, step_s=0.2)):
        scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
        await finetune_nodes(scheduler, 1)
        job = await submit(suite, spec(max_steps=100))
        await wait_for(suite, job.job_id, lambda j: j.training.step >= 2)
        await suite.jobs().CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=auth())
        done = await wait_final(suite, job.job_id)
        await eventually(lambda: fleet.cancelled == [job.job_id])
    assert done.state == jobs_pb2.JOB_STATE_CANCELLED
    assert done.request_counts.cancelled == 8 and not done.adapter
    kept = await steps(suite, job.job_id)
    assert len(kept) >= 2
    assert await adapter_in_etcd(suite.etcd, "alpha", "pirate") is None


async def test_a_node_killed_mid_training_moves_the_job_which_resumes_from_its_checkpoint(
    suite: Suite,
) -> None:
    """The training node dies mid-stream: the job moves to the other finetune node, which
    resumes after the last checkpoint; every step is stored once and the job completes."""
    fleet = Fleet()
    first, second = TrainingNode("ft-a", fleet, step_s=0.15), TrainingNode("ft-b", fleet)
    scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
    async with training_node(suite.etcd, first) as server:
        await finetune_nodes(scheduler, 1)
        job = await submit(suite, spec(max_steps=10))
        await wait_for(suite, job.job_id, lambda j: j.training.checkpoint_step >= 4)
        async with training_node(suite.etcd, second):
            await finetune_nodes(scheduler, 2)
            await server.stop(0)  # killed: no drain, the stream breaks
            done = await wait_final(suite, job.job_id)
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
    nodes = [(node, start) for node, _, start in fleet.calls]
    assert nodes[0] == ("ft-a", 1)
    assert nodes[-1][0] == "ft-b" and nodes[-1][1] >= 5
    assert [r.step.step for r in await steps(suite, job.job_id)] == list(range(1, 11))
    assert scheduler.finetune is not None
    assert scheduler.finetune.ctx.metrics.moves.labels("node_failed")._value.get() >= 1


async def test_a_busy_node_is_waited_for_and_a_failing_one_fails_the_job_after_k_attempts(
    suite: Suite,
) -> None:
    """RESOURCE_EXHAUSTED with RetryInfo is waited out and not counted (the job completes on
    the same node); a node failing every call FAILs the job after finetune_max_deliveries
    attempts, with the last error."""
    fleet = Fleet()
    scheduler = await suite.start_scheduler(
        redis_url=suite.redis_url,
        finetune_max_deliveries=2,
        finetune_avoid_node_seconds=0.2,
        **FAST,
    )
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, busy=2)):
        await finetune_nodes(scheduler, 1)
        job = await submit(suite, spec("patient"))
        done = await wait_final(suite, job.job_id)
        assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
        assert scheduler.finetune is not None
        assert scheduler.finetune.ctx.metrics.moves.labels("node_busy")._value.get() == 2
    async with training_node(suite.etcd, TrainingNode("ft-b", fleet, fail_calls=99)):
        await finetune_nodes(scheduler, 1)
        doomed = await submit(suite, spec("doomed"))
        failed = await wait_final(suite, doomed.job_id)
    assert failed.state == jobs_pb2.JOB_STATE_FAILED
    assert "injected training fault" in failed.error
    assert failed.request_counts.failed == 8
    assert [c for c in fleet.calls if c[1] == doomed.job_id] == [("ft-b", doomed.job_id, 1)] * 2


async def test_a_dead_replicas_fine_tune_is_taken_over_by_another(suite: Suite) -> None:
    """Replica A drives a fine-tune and dies (its runner stopped: nothing acknowledged, its
    Train call cut); replica B takes the driver entry over after the idle bound and the node
    resumes from the checkpoint: COMPLETED, every step once."""
    fleet = Fleet()
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, step_s=0.15)):
        a = await suite.start_scheduler(redis_url=suite.redis_url, scheduler_id="replica-a", **FAST)
        await finetune_nodes(a, 1)
        job = await submit(suite, spec(max_steps=10))
        await wait_for(suite, job.job_id, lambda j: j.training.checkpoint_step >= 2)
        assert a.finetune is not None and a.finetune.driving == [job.job_id]
        await a.finetune.stop()
        b = await suite.start_scheduler(redis_url=suite.redis_url, scheduler_id="replica-b", **FAST)
        try:
            done = await wait_final(suite, job.job_id)
        finally:
            await a.stop(0.5)
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
    assert len(fleet.calls) == 2 and fleet.calls[1][2] >= 3
    assert [r.step.step for r in await steps(suite, job.job_id)] == list(range(1, 11))
    assert b.finetune is not None
    assert b.finetune.ctx.metrics.moves.labels("taken_over")._value.get() == 1


async def test_a_fine_tune_whose_window_closes_expires(suite: Suite) -> None:
    """A fine-tune longer than its window: EXPIRED, the Train call cancelled, steps kept."""
    fleet = Fleet()
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, step_s=0.3)):
        scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
        await finetune_nodes(scheduler, 1)
        job = await submit(suite, spec(max_steps=100), window_s=4)  # 30 s of steps
        done = await wait_final(suite, job.job_id)
        await eventually(lambda: fleet.cancelled == [job.job_id])
    assert done.state == jobs_pb2.JOB_STATE_EXPIRED
    assert done.request_counts.expired == 8
    assert 1 <= len(await steps(suite, job.job_id)) < 100


# -- on a real node --------------------------------------------------------------------------


def _node_trains() -> bool:
    from inference_node.server import NodeServicer  # noqa: PLC0415 - checked at collection

    return "Train" in NodeServicer.__dict__


@pytest.mark.skipif(not _node_trains(), reason="the node does not implement Node.Train yet")
@pytest.mark.timeout(240)
async def test_a_fine_tune_on_a_real_node_serves_its_adapter_to_its_tenant_only(
    suite: Suite,
) -> None:
    """A fine-tune of the tiny model on a real node of the finetune pool runs to COMPLETED;
    its adapter is registered in etcd and served at once: Generate with "base:adapter"
    answers its tenant (differently from the base model) and is NOT_FOUND for another."""
    await suite.start_node(
        "node-a",
        pools=["realtime", "finetune"],
        adapters_dir=suite.tmp / "adapters",
        checkpoint_dir=suite.tmp / "checkpoints",
    )
    scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
    await finetune_nodes(scheduler, 1)
    finetune = spec(
        "parrot",
        max_steps=4,
        lora=jobs_pb2.LoraSettings(rank=4),
        optimizer=jobs_pb2.OptimizerSettings(learning_rate=0.05),
        max_sequence_tokens=64,
    )
    job = await submit(suite, finetune, [example(i) for i in range(6)])
    done = await wait_final(suite, job.job_id, timeout=180)
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
    assert done.adapter == f"{MODEL}:parrot"
    curve = await steps(suite, job.job_id)
    assert [r.step.step for r in curve] == [1, 2, 3, 4]
    assert all(r.step.loss > 0 and r.step.tokens > 0 for r in curve)
    assert await adapter_in_etcd(suite.etcd, "alpha", "parrot") is not None
    await eventually(lambda: scheduler.adapter_view.get(f"alpha/{MODEL}/parrot"))
    stub = suite.inference()

    async def text(model: str, key: str = API_KEY) -> str:
        request = inference_pb2.GenerateRequest(
            model=model,
            prompt="hi 0",
            options=common_pb2.GenerationOptions(max_new_tokens=8, temperature=0),
            workload_class=common_pb2.WORKLOAD_CLASS_BATCH,
            cache_bypass=True,
        )
        chunks = [c async for c in stub.Generate(request, metadata=auth(key), timeout=30)]
        return "".join(c.text for c in chunks)

    assert await text(f"{MODEL}:parrot") != await text(MODEL)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await text(f"{MODEL}:parrot", OTHER_KEY)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_scheduler_registers_adapters_under_its_own_etcd_user(
    secure_suite: Suite,
) -> None:
    """With mutual TLS and etcd auth on, the scheduler's etcd user may write an adapter's record
    (what a finished fine-tune does) and its adapter view sees it; it still serves jobs on
    the locked Redis (its ACL user covers the fine-tune keys)."""
    scheduler = await secure_suite.start_scheduler(redis_url=secure_suite.redis_for("scheduler"))
    record = AdapterRecord("alpha", MODEL, "locked", job_id="job-x", created_ms=1)
    await scheduler._register_adapter(record)
    await eventually(lambda: scheduler.adapter_view.get(f"alpha/{MODEL}/locked") == record)
    job = await submit(secure_suite, spec("locked-2"))
    assert job.state == jobs_pb2.JOB_STATE_QUEUED


async def test_a_driver_whose_entry_was_taken_over_stops_its_training(suite: Suite) -> None:
    """A driver whose entry another consumer claimed (its heartbeat lapsed: here the entry is
    moved by hand, a fault injected on purpose) cancels its Train call within a heartbeat
    and leaves the job alone: one job never trains twice at once. The entry, idle again, is
    taken over and the job completes, every step once."""
    fleet = Fleet()
    async with training_node(suite.etcd, TrainingNode("ft-a", fleet, step_s=0.15)):
        scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
        await finetune_nodes(scheduler, 1)
        job = await submit(suite, spec(max_steps=12))
        await wait_for(suite, job.job_id, lambda j: j.training.step >= 2)
        client = redis.Redis.from_url(suite.redis_url)
        lines = f"sluice:jobs:v1:lines:{{{job.job_id}}}"
        (pending,) = await client.xpending_range(lines, "workers", "-", "+", 1)
        await client.xclaim(lines, "workers", "ghost", 0, [pending["message_id"]], justid=True)
        await client.aclose()
        await eventually(lambda: fleet.cancelled == [job.job_id], timeout=5)
        done = await wait_final(suite, job.job_id)
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
    assert len(fleet.calls) == 2
    assert [r.step.step for r in await steps(suite, job.job_id)] == list(range(1, 13))


@pytest.mark.skipif(not _node_trains(), reason="the node does not implement Node.Train yet")
@pytest.mark.timeout(300)
async def test_on_real_nodes_a_killed_node_moves_the_job_and_its_losses_are_unchanged(
    suite: Suite,
) -> None:
    """Two real finetune nodes sharing the checkpoint and adapter stores, REALTIME requests
    streaming meanwhile: the training node is killed mid-job (no drain, no deregistration);
    the job moves to the other node, resumes from the last checkpoint and completes; every
    step is stored once and its loss equals, within 1e-4, that of the same fine-tune run
    uninterrupted (same seed, same data); the REALTIME requests all completed."""
    shared = {
        "pools": ["realtime", "finetune"],
        "adapters_dir": suite.tmp / "adapters",
        "checkpoint_dir": suite.tmp / "checkpoints",
    }
    first = await suite.start_node("node-a", **shared)
    await suite.start_node("node-b", **shared)
    scheduler = await suite.start_scheduler(redis_url=suite.redis_url, **FAST)
    await finetune_nodes(scheduler, 2)
    data = [example(i) for i in range(8)]

    def tune(name: str) -> jobs_pb2.FinetuneSpec:
        return spec(
            name,
            max_steps=24,
            seed=7,
            checkpoint_every_steps=3,
            lora=jobs_pb2.LoraSettings(rank=4),
            optimizer=jobs_pb2.OptimizerSettings(learning_rate=0.01),
            max_sequence_tokens=64,
        )

    stub = suite.inference()

    async def realtime(i: int) -> int:
        request = inference_pb2.GenerateRequest(
            model=MODEL,
            prompt=f"hello {i}",
            options=common_pb2.GenerationOptions(max_new_tokens=8),
            cache_bypass=True,
        )
        chunks = [c async for c in stub.Generate(request, metadata=auth(), timeout=60)]
        return sum(len(c.token_ids) for c in chunks)

    moved = await submit(suite, tune("moved"), data)
    traffic = asyncio.gather(*(realtime(i) for i in range(6)))
    running = await wait_for(
        suite, moved.job_id, lambda j: j.training.checkpoint_step >= 3, timeout=120
    )
    victim = running.training.node_id
    await (first if victim == "node-a" else suite.nodes[1]).crash()
    done = await wait_final(suite, moved.job_id, timeout=180)
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED, done
    assert sum(await traffic) > 0
    straight = await submit(suite, tune("straight"), data)
    reference = await wait_final(suite, straight.job_id, timeout=180)
    assert reference.state == jobs_pb2.JOB_STATE_COMPLETED, reference
    got = await steps(suite, moved.job_id)
    want = await steps(suite, straight.job_id)
    assert [r.step.step for r in got] == list(range(1, 25))
    assert [r.step.loss for r in got] == pytest.approx([r.step.loss for r in want], abs=1e-4)
    assert scheduler.finetune is not None
    assert scheduler.finetune.ctx.metrics.moves.labels("node_failed")._value.get() >= 1
