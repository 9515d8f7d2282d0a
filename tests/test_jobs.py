"""Durable jobs with real services: a real scheduler (two, where a replica dies), real nodes
of the tiny model, real Redis. Faults are injected on purpose only: a worker stopped without
acknowledging, a node scripted to fail every stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
import redis.asyncio as redis_asyncio
from grpc_status import rpc_status

from scheduler.jobs.model import JobKeys
from sluice.v1 import common_pb2, inference_pb2, jobs_pb2, node_pb2_grpc
from tests.harness import API_KEY, OTHER_KEY, Suite, auth, eventually, fake_node

MODEL = "tiny-random-llama"
FINAL = {
    jobs_pb2.JOB_STATE_COMPLETED,
    jobs_pb2.JOB_STATE_FAILED,
    jobs_pb2.JOB_STATE_CANCELLED,
    jobs_pb2.JOB_STATE_EXPIRED,
}


def line(custom_id: str, tokens: int = 4, **options: float) -> jobs_pb2.JobLine:
    return jobs_pb2.JobLine(
        custom_id=custom_id,
        generate=inference_pb2.GenerateRequest(
            model=MODEL,
            prompt=f"job line {custom_id}",
            options=common_pb2.GenerationOptions(max_new_tokens=tokens, **options),
        ),
    )


async def _parts(
    lines: Sequence[jobs_pb2.JobLine], header: jobs_pb2.JobHeader, chunk: int
) -> AsyncIterator[jobs_pb2.SubmitJobRequest]:
    yield jobs_pb2.SubmitJobRequest(header=header)
    for start in range(0, len(lines), chunk):
        part = jobs_pb2.JobLines(lines=lines[start : start + chunk])
        yield jobs_pb2.SubmitJobRequest(lines=part)


async def submit(
    suite: Suite,
    lines: Sequence[jobs_pb2.JobLine],
    *,
    key: str = "",
    window_s: int = 0,
    api_key: str | None = None,
    chunk: int = 3,
) -> jobs_pb2.Job:
    header = jobs_pb2.JobHeader(idempotency_key=key, completion_window_seconds=window_s)
    metadata = auth(api_key) if api_key else auth()
    return await suite.jobs().SubmitJob(_parts(lines, header, chunk), metadata=metadata, timeout=30)


async def wait_final(suite: Suite, job_id: str, timeout: float = 60.0) -> jobs_pb2.Job:
    last: list[jobs_pb2.Job] = []

    async def poll() -> bool:
        request = jobs_pb2.GetJobRequest(job_id=job_id)
        last[:] = [await suite.jobs().GetJob(request, metadata=auth())]
        return last[0].state in FINAL

    deadline = asyncio.get_running_loop().time() + timeout
    while not await poll():
        assert asyncio.get_running_loop().time() < deadline, last[0]
        await asyncio.sleep(0.1)
    return last[0]


async def results(suite: Suite, job_id: str) -> list[jobs_pb2.JobResult]:
    request = jobs_pb2.GetJobResultsRequest(job_id=job_id, page_size=2)
    out: list[jobs_pb2.JobResult] = []
    async for page in suite.jobs().GetJobResults(request, metadata=auth()):
        out.extend(page.results)
    return out


@pytest.fixture
async def jobs_suite(suite: Suite) -> Suite:
    """Cache, one node, a scheduler serving jobs (Redis)."""
    await suite.start_cache()
    await suite.start_node("node-a")
    scheduler = await suite.start_scheduler(redis_url=suite.redis_url)
    await eventually(lambda: scheduler.nodes.candidates(MODEL, 1))
    return suite


async def test_a_job_runs_every_line_and_reports_malformed_ones_per_line(
    jobs_suite: Suite,
) -> None:
    """Five good lines and one with a temperature out of range: accepted with a predicted
    completion, COMPLETED with five answers and one INVALID_ARGUMENT result naming its line
    number and field; results are read page by page, each custom_id once."""
    lines = [line(f"c{i}") for i in range(5)]
    lines.insert(3, line("bad", temperature=9.0))
    job = await submit(jobs_suite, lines)
    assert job.state == jobs_pb2.JOB_STATE_QUEUED
    assert job.predicted_completion_unix_ms > job.created_at_unix_ms
    assert job.request_counts.total == 6 and job.request_counts.failed == 1
    done = await wait_final(jobs_suite, job.job_id)
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 1)
    got = {r.custom_id: r for r in await results(jobs_suite, job.job_id)}
    assert sorted(got) == sorted(ln.custom_id for ln in lines)
    assert got["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "line 4" in got["bad"].error.message and "temperature" in got["bad"].error.message
    assert all(got[f"c{i}"].generate.usage.completion_tokens == 4 for i in range(5))


async def test_resubmitting_with_the_same_key_returns_the_same_job(jobs_suite: Suite) -> None:
    """An idempotency key names one job per tenant: the second submit returns the first."""
    first = await submit(jobs_suite, [line("a")], key="once")
    second = await submit(jobs_suite, [line("a"), line("b")], key="once")
    assert second.job_id == first.job_id
    assert second.request_counts.total == 1


async def test_a_tenant_sees_only_its_own_jobs(jobs_suite: Suite) -> None:
    """Another tenant's GetJob, CancelJob and results are NOT_FOUND; ListJobs lists own jobs
    only, newest first."""
    mine = [await submit(jobs_suite, [line(f"x{i}")]) for i in range(3)]
    stub = jobs_suite.jobs()
    theirs = auth(OTHER_KEY)
    calls = (
        stub.GetJob(jobs_pb2.GetJobRequest(job_id=mine[0].job_id), metadata=theirs),
        stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=mine[0].job_id), metadata=theirs),
    )
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=2), metadata=auth())
    assert [j.job_id for j in listed.jobs] == [mine[2].job_id, mine[1].job_id]
    rest = await stub.ListJobs(
        jobs_pb2.ListJobsRequest(page_token=listed.next_page_token), metadata=auth()
    )
    assert mine[0].job_id in [j.job_id for j in rest.jobs]
    other = await stub.ListJobs(jobs_pb2.ListJobsRequest(), metadata=auth(OTHER_KEY))
    assert not other.jobs


async def test_cancel_keeps_what_finished_and_counts_the_rest(jobs_suite: Suite) -> None:
    """Cancel a long job while it runs: CANCELLED once its lines in flight end, every line
    counted exactly once as completed or cancelled, finished results kept."""
    job = await submit(jobs_suite, [line(f"l{i}", tokens=48) for i in range(40)], chunk=10)
    stub = jobs_suite.jobs()
    for _ in range(200):
        got = await stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=auth())
        if got.request_counts.completed >= 1:
            break
        await asyncio.sleep(0.05)
    await stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=auth())
    done = await wait_final(jobs_suite, job.job_id)
    counts = done.request_counts
    assert done.state == jobs_pb2.JOB_STATE_CANCELLED
    assert counts.cancelled > 0 and counts.completed >= 1
    assert counts.completed + counts.failed + counts.cancelled == 40
    assert len(await results(jobs_suite, job.job_id)) == counts.completed + counts.failed


async def test_a_job_whose_window_closes_expires_with_partial_results(suite: Suite) -> None:
    """A job accepted (the scheduler told to count on far more capacity than there is) whose
    two-second window is shorter than its work: EXPIRED, the lines done keep their results,
    the others are counted expired, every line once."""
    await suite.start_node("node-a")
    scheduler = await suite.start_scheduler(redis_url=suite.redis_url, job_capacity_share=1e6)
    await eventually(lambda: scheduler.nodes.candidates(MODEL, 1))
    lines = [line(f"e{i}", tokens=128) for i in range(400)]
    job = await submit(suite, lines, window_s=2, chunk=100)
    done = await wait_final(suite, job.job_id, timeout=30)
    counts = done.request_counts
    assert done.state == jobs_pb2.JOB_STATE_EXPIRED
    assert counts.expired > 0
    assert counts.completed + counts.failed + counts.expired == 400
    assert len(await results(suite, job.job_id)) == counts.completed + counts.failed


async def test_an_infeasible_window_is_refused_at_submit_with_retry_info(
    jobs_suite: Suite,
) -> None:
    """A job that fits its window alone but would make an accepted job late (EDF at the
    measured rate) is refused RESOURCE_EXHAUSTED JOB_WINDOW_INFEASIBLE with RetryInfo; one
    that cannot fit even alone is INVALID_ARGUMENT JOB_WINDOW_TOO_SHORT (waiting cannot help);
    no refused job is left behind."""
    scheduler = jobs_suite.scheduler
    assert scheduler is not None and scheduler.job_worker is not None
    rate = scheduler.job_worker.current_rate()
    tokens = 1024 + 3 * 0.5  # max_new_tokens + the prompt's weighted estimate
    big = [line(f"a{i}", tokens=1024) for i in range(60)]
    need_big = len(big) * tokens / rate
    accepted = await submit(jobs_suite, big, window_s=int(need_big * 1.1) + 2, chunk=30)
    small = [line(f"b{i}", tokens=1024) for i in range(int(len(big) * 0.3))]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(jobs_suite, small, window_s=int(need_big * 0.6), chunk=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err.value)
    assert status is not None
    assert any(d.type_url.endswith("RetryInfo") for d in status.details)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await submit(jobs_suite, big, window_s=max(1, int(need_big * 0.2)), chunk=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "JOB_WINDOW_TOO_SHORT" in str(rpc_status.from_call(err.value))
    listed = await jobs_suite.jobs().ListJobs(jobs_pb2.ListJobsRequest(), metadata=auth())
    assert [j.job_id for j in listed.jobs] == [accepted.job_id]
    await jobs_suite.jobs().CancelJob(
        jobs_pb2.CancelJobRequest(job_id=accepted.job_id), metadata=auth()
    )


async def test_a_line_whose_worker_died_is_reclaimed_and_answered_once(suite: Suite) -> None:
    """Replica A takes lines and dies without acknowledging them (its worker stopped mid-line);
    replica B reclaims them after the idle bound: the job completes, one result per custom_id,
    the reclaimed lines counted. The lines A's node had started ran on without A and B
    attached to them: the node generated every line once."""
    await suite.start_cache()
    node = await suite.start_node("node-a")
    fast = {
        "redis_url": suite.redis_url,
        "job_reclaim_idle_seconds": 1.0,
        "job_heartbeat_seconds": 0.3,
    }
    a = await suite.start_scheduler(scheduler_id="replica-a", **fast)
    await eventually(lambda: a.nodes.candidates(MODEL, 1))
    job = await submit(suite, [line(f"r{i}", tokens=64) for i in range(12)], chunk=12)
    assert a.job_worker is not None
    await eventually(lambda: node.servicer.detached.running() >= 2, timeout=30)
    recorded = redis_asyncio.from_url(suite.redis_url)
    try:  # A has written where its lines run (at their first chunk)
        for _ in range(300):
            if await recorded.hlen(JobKeys(job.job_id).nodes) >= 1:
                break
            await asyncio.sleep(0.05)
    finally:
        await recorded.aclose()
    await a.job_worker.stop()  # dies holding lines: nothing acknowledged
    b = await suite.start_scheduler(scheduler_id="replica-b", **fast)
    try:
        done = await wait_final(suite, job.job_id, timeout=60)
        assert done.state == jobs_pb2.JOB_STATE_COMPLETED
        assert done.request_counts.completed == 12
        got = [r.custom_id for r in await results(suite, job.job_id)]
        assert sorted(got) == sorted(f"r{i}" for i in range(12))
        assert b.job_worker is not None
        reclaimed = b.job_worker._metrics.lines.labels("reclaimed")._value.get()
        assert reclaimed >= 1
        assert b.job_worker._metrics.lines.labels("reattached")._value.get() >= 1
        ended = node.servicer._metrics.requests.collect()[0].samples
        assert sum(x.value for x in ended if x.name.endswith("_total")) == 12
    finally:
        await a.stop(0.5)


class _FailingNode(node_pb2_grpc.NodeServicer):
    """Fails every stream after its first token (a fault injected on purpose)."""

    async def Generate(  # type: ignore[override]
        self, request: object, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[object]:
        yield inference_pb2.GenerateChunk(text="x", token_ids=[1], node_id="sick")
        await context.abort(grpc.StatusCode.INTERNAL, "injected engine fault")


async def test_a_line_failing_every_delivery_is_dead_lettered_with_its_last_error(
    suite: Suite,
) -> None:
    """A line whose every attempt fails mid-stream is tried job_max_deliveries times, then
    dead-lettered: its result carries the last error, counted failed and dead_lettered."""
    scheduler = await suite.start_scheduler(redis_url=suite.redis_url, job_max_deliveries=2)
    async with fake_node(suite.etcd, _FailingNode(), "sick"):
        await eventually(lambda: scheduler.nodes.candidates(MODEL, 1))
        job = await submit(suite, [line("doomed")])
        done = await wait_final(suite, job.job_id, timeout=60)
    assert done.state == jobs_pb2.JOB_STATE_COMPLETED
    assert (done.request_counts.failed, done.request_counts.dead_lettered) == (1, 1)
    (result,) = await results(suite, job.job_id)
    assert result.error.message and result.deliveries >= 1


async def test_the_sdk_submits_openai_batch_lines_watches_and_reads_results(
    jobs_suite: Suite,
) -> None:
    """The SDK against the real scheduler: OpenAI batch lines (chat and embeddings) are
    submitted in chunks, watched to COMPLETED, and every custom_id has its answer."""
    from sluice import AsyncClient  # noqa: PLC0415 - the SDK as a user imports it

    scheduler = jobs_suite.scheduler
    assert scheduler is not None
    lines = [
        {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"hello {i}"}],
                "max_tokens": 3,
            },
        }
        for i in range(5)
    ]
    lines.append(
        {
            "custom_id": "emb",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-minilm-l6-v2", "input": ["a", "b"]},
        }
    )
    async with AsyncClient(scheduler.address, api_key=API_KEY) as client:
        job = await client.submit_job(lines, chunk_lines=2)
        states = [event.job.state async for event in client.watch_job(job.job_id)]
        assert states[-1] == jobs_pb2.JOB_STATE_COMPLETED
        got = {r.custom_id: r async for r in client.job_results(job.job_id)}
    assert sorted(got) == sorted(line["custom_id"] for line in lines)
    assert got["chat-0"].generate.usage.completion_tokens == 3
    assert len(got["emb"].embed.embeddings) == 2
