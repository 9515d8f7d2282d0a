"""The SDK's and the CLI's jobs calls against ``FakeJobsServicer``: a small in-test servicer
that follows the streaming contract of ``jobs.proto`` (client-streaming submit, paged and
resumable results, a watch until a final state) on a real ``grpc.aio`` server, with scripted
dropped streams. The real Jobs service is tested with the scheduler; these pin the client side.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from sluice import (
    AsyncClient,
    Client,
    JobLinesError,
    NotFoundError,
    RetryPolicy,
    generate_line,
)
from sluice import cli as sluice_cli
from sluice.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc

FAST = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)
MODEL = "smollm2-135m-instruct"


@dataclass
class FakeJobsServicer(jobs_pb2_grpc.JobsServicer):  # type: ignore[misc]
    """Jobs kept in memory, as the contract describes them; not the real service.

    Scripted faults (each drops a stream once, as a lost connection does: UNAVAILABLE with no
    status details): ``drop_submits`` submits after reading the whole stream,
    ``drop_watch_after`` events into the first watch, ``drop_results_after`` pages into the
    first results stream. ``linger_after_final`` keeps a watch open after the final event.
    """

    drop_submits: int = 0
    drop_watch_after: int | None = None
    drop_results_after: int | None = None
    linger_after_final: bool = False
    results_page_size: int = 3
    streams: list[list[str | int]] = field(default_factory=list)
    """Per SubmitJob stream: "header", then the size of each chunk."""
    headers: list[jobs_pb2.JobHeader] = field(default_factory=list)
    lines: dict[str, list[jobs_pb2.JobLine]] = field(default_factory=dict)
    jobs: dict[str, jobs_pb2.Job] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    watch_opens: int = 0
    result_tokens: list[str] = field(default_factory=list)
    """The page_token of every GetJobResults request, in order."""

    async def SubmitJob(
        self, requests: AsyncIterator[jobs_pb2.SubmitJobRequest], ctx: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        kinds: list[str | int] = []
        self.streams.append(kinds)
        header: jobs_pb2.JobHeader | None = None
        lines: list[jobs_pb2.JobLine] = []
        async for request in requests:
            if request.HasField("header"):
                if kinds:
                    await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "header after lines")
                header = request.header
                kinds.append("header")
            else:
                if header is None:
                    await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "lines before the header")
                lines.extend(request.lines.lines)
                kinds.append(len(request.lines.lines))
        assert header is not None
        self.headers.append(header)
        if header.line_count != len(lines):
            await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "line_count differs")
        if header.idempotency_key not in self.by_key:
            job_id = f"job-{len(self.jobs) + 1}"
            self.by_key[header.idempotency_key] = job_id
            self.lines[job_id] = lines
            self.jobs[job_id] = jobs_pb2.Job(
                job_id=job_id,
                state=jobs_pb2.JOB_STATE_QUEUED,
                kind=jobs_pb2.JOB_KIND_BATCH,
                idempotency_key=header.idempotency_key,
                request_counts=jobs_pb2.RequestCounts(total=len(lines)),
                labels=header.labels,
                created_at_unix_ms=len(self.jobs),
            )
        if self.drop_submits:
            self.drop_submits -= 1
            await ctx.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
        return self.jobs[self.by_key[header.idempotency_key]]

    async def _job(self, job_id: str, ctx: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        if job_id not in self.jobs:
            await ctx.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id}")
        return self.jobs[job_id]

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, ctx: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        return await self._job(request.job_id, ctx)

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, ctx: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        job = await self._job(request.job_id, ctx)
        job.state = jobs_pb2.JOB_STATE_CANCELLING
        return job

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobEvent]:
        """The job's current state first, then one line settled per event (every fourth a
        failure) until COMPLETED."""
        job = await self._job(request.job_id, ctx)
        self.watch_opens += 1
        sent = 0
        while True:
            counts = job.request_counts
            if counts.completed + counts.failed == counts.total:
                job.state = jobs_pb2.JOB_STATE_COMPLETED
            yield jobs_pb2.JobEvent(job=job, lines_per_second=2.0)
            sent += 1
            if job.state == jobs_pb2.JOB_STATE_COMPLETED:
                break
            if self.watch_opens == 1 and sent == self.drop_watch_after:
                await ctx.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            job.state = jobs_pb2.JOB_STATE_RUNNING
            settled = counts.completed + counts.failed
            if settled % 4 == 3:
                counts.failed += 1
            else:
                counts.completed += 1
            await asyncio.sleep(0)
        if self.linger_after_final:
            await asyncio.sleep(30)

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, ctx: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        jobs = [j for j in self.jobs.values() if not request.state or j.state == request.state]
        jobs.reverse()  # newest first
        start = int(request.page_token or 0)
        end = start + (request.page_size or 50)
        return jobs_pb2.ListJobsResponse(
            jobs=jobs[start:end], next_page_token=str(end) if end < len(jobs) else ""
        )

    def _results(self, job_id: str) -> list[jobs_pb2.JobResult]:
        out = []
        for number, line in enumerate(self.lines[job_id], start=1):
            result = jobs_pb2.JobResult(custom_id=line.custom_id, line_number=number)
            if number % 4 == 0:
                result.error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                result.error.reason = "INVALID_ARGUMENT"
                result.error.message = f"line {number}: model: unknown"
            else:
                result.generate.text = f"answer to {line.custom_id}"
                result.generate.finish_reason = common_pb2.FINISH_REASON_EOS
                result.generate.model = MODEL
            out.append(result)
        return out

    async def GetJobResults(
        self, request: jobs_pb2.GetJobResultsRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobResultsPage]:
        """Pages of ``results_page_size``; the token is the offset of the next page."""
        await self._job(request.job_id, ctx)
        self.result_tokens.append(request.page_token)
        first_stream = len(self.result_tokens) == 1
        results = self._results(request.job_id)
        if request.custom_ids:
            wanted = set(request.custom_ids)
            results = [r for r in results if r.custom_id in wanted]
        size = request.page_size or self.results_page_size
        start, pages = int(request.page_token or 0), 0
        while True:
            end = start + size
            token = str(end) if end < len(results) else ""
            yield jobs_pb2.JobResultsPage(results=results[start:end], next_page_token=token)
            pages += 1
            if first_stream and pages == self.drop_results_after:
                await ctx.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            if not token:
                return
            start = end


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[tuple[FakeJobsServicer, str]]]]:
    """Starts FakeJobsServicer servers on free ports (``grpc.so_reuseport`` off)."""
    servers: list[grpc.aio.Server] = []

    async def start(**script: Any) -> tuple[FakeJobsServicer, str]:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        fake = FakeJobsServicer(**script)
        jobs_pb2_grpc.add_JobsServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return fake, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(0)


Serve = Callable[..., Awaitable[tuple[FakeJobsServicer, str]]]


@dataclass
class Calls:
    """One jobs call on a fresh client of either kind; iterators come back as lists. The
    blocking client runs on a thread, so the test's loop keeps serving."""

    kind: str
    address: str

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.kind == "async":
            async with AsyncClient(self.address, retry=FAST, health_check_interval_s=None) as c:
                out = getattr(c, method)(*args, **kwargs)
                if hasattr(out, "__aiter__"):
                    return [item async for item in out]
                return await out

        def blocking() -> Any:
            with Client(self.address, retry=FAST, health_check_interval_s=None) as c:
                out = getattr(c, method)(*args, **kwargs)
                return list(out) if isinstance(out, Iterator) else out

        return await asyncio.to_thread(blocking)


@pytest.fixture(params=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def openai_lines(n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"q{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"#{i}"}]},
        }
        for i in range(n)
    ]


# -- submit ---------------------------------------------------------------------------------


async def test_submit_streams_a_header_then_chunks(serve: Serve, kind: str) -> None:
    """2,500 lines with chunk_lines=1000: the stream is the header (line count, window,
    labels, BATCH, a generated idempotency key), then chunks of 1000, 1000, 500."""
    fake, address = await serve()
    lines = [generate_line(f"id-{i}", MODEL, "hi") for i in range(2500)]
    job = await Calls(kind, address)(
        "submit_job", lines, completion_window_s=3600, labels={"team": "a"}, chunk_lines=1000
    )
    assert (job.job_id, job.request_counts.total) == ("job-1", 2500)
    assert fake.streams == [["header", 1000, 1000, 500]]
    header = fake.headers[0]
    assert header.kind == jobs_pb2.JOB_KIND_BATCH
    assert header.workload_class == common_pb2.WORKLOAD_CLASS_BATCH
    assert (header.line_count, header.completion_window_seconds) == (2500, 3600)
    assert dict(header.labels) == {"team": "a"}
    assert header.idempotency_key.startswith("sdk-")
    assert [line.custom_id for line in fake.lines["job-1"]] == [f"id-{i}" for i in range(2500)]


async def test_each_submit_gets_its_own_key_and_a_given_key_is_sent(
    serve: Serve, kind: str
) -> None:
    """Without a key every submit makes a fresh one (two jobs); with one, resubmitting
    returns the first job."""
    fake, address = await serve()
    calls = Calls(kind, address)
    first = await calls("submit_job", openai_lines(2))
    second = await calls("submit_job", openai_lines(2))
    assert first.job_id != second.job_id
    assert fake.headers[0].idempotency_key != fake.headers[1].idempotency_key
    again = [await calls("submit_job", openai_lines(2), idempotency_key="k-1") for _ in range(2)]
    assert fake.headers[-1].idempotency_key == "k-1"
    assert again[0].job_id == again[1].job_id == "job-3"


async def test_a_dropped_submit_is_resent_whole_with_the_same_key(serve: Serve, kind: str) -> None:
    """A submit cut off by a lost connection is retried: the whole stream again, same
    idempotency key, so the job exists once."""
    fake, address = await serve(drop_submits=1)
    job = await Calls(kind, address)("submit_job", openai_lines(5), chunk_lines=2)
    assert fake.streams == [["header", 2, 2, 1], ["header", 2, 2, 1]]
    assert fake.headers[0].idempotency_key == fake.headers[1].idempotency_key
    assert (job.job_id, list(fake.jobs)) == ("job-1", ["job-1"])


async def test_malformed_lines_raise_before_anything_is_sent(serve: Serve, kind: str) -> None:
    """Every malformed line is in the JobLinesError, with its number; nothing reaches the
    server."""
    fake, address = await serve()
    lines: list[Any] = [*openai_lines(2), {"custom_id": "x"}, "{", *openai_lines(1)]
    with pytest.raises(JobLinesError) as caught:
        await Calls(kind, address)("submit_job", lines)
    assert [e.line_number for e in caught.value.errors] == [3, 4, 5]  # 5: repeats q0
    assert fake.streams == []


# -- get, cancel, list ----------------------------------------------------------------------


async def test_get_cancel_and_list_follow_the_contract(serve: Serve, kind: str) -> None:
    """get and cancel answer the job; list iterates every page, newest first, filtered by
    state; an unknown job is NotFoundError."""
    _, address = await serve()
    calls = Calls(kind, address)
    for _ in range(5):
        await calls("submit_job", openai_lines(1))
    assert (await calls("get_job", "job-2")).job_id == "job-2"
    cancelled = await calls("cancel_job", "job-2")
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLING
    listed = await calls("list_jobs", page_size=2)
    assert [j.job_id for j in listed] == ["job-5", "job-4", "job-3", "job-2", "job-1"]
    queued = await calls("list_jobs", state=jobs_pb2.JOB_STATE_QUEUED, page_size=2)
    assert [j.job_id for j in queued] == ["job-5", "job-4", "job-3", "job-1"]
    with pytest.raises(NotFoundError):
        await calls("get_job", "job-9")


# -- watch ----------------------------------------------------------------------------------


async def test_watch_ends_at_the_final_state(serve: Serve, kind: str) -> None:
    """The watch yields progress and ends with the COMPLETED event, even though the server
    keeps the stream open after it."""
    _, address = await serve(linger_after_final=True)
    calls = Calls(kind, address)
    job = await calls("submit_job", openai_lines(6))
    events = await asyncio.wait_for(calls("watch_job", job.job_id), timeout=10)
    settled = [e.job.request_counts.completed + e.job.request_counts.failed for e in events]
    assert settled == [0, 1, 2, 3, 4, 5, 6]
    assert events[-1].job.state == jobs_pb2.JOB_STATE_COMPLETED
    assert [e.job.state for e in events[:-1]].count(jobs_pb2.JOB_STATE_COMPLETED) == 0


async def test_a_dropped_watch_is_reopened(serve: Serve, kind: str) -> None:
    """A watch cut off mid-job is re-opened and goes on to the final state."""
    fake, address = await serve(drop_watch_after=3)
    calls = Calls(kind, address)
    job = await calls("submit_job", openai_lines(6))
    events = await calls("watch_job", job.job_id)
    assert fake.watch_opens == 2
    settled = [e.job.request_counts.completed + e.job.request_counts.failed for e in events]
    assert settled == sorted(settled)
    assert settled[-1] == 6
    assert events[-1].job.state == jobs_pb2.JOB_STATE_COMPLETED


# -- results --------------------------------------------------------------------------------


async def test_results_resume_after_a_dropped_stream(serve: Serve, kind: str) -> None:
    """Results cut off after two pages resume from the last page's token: every result
    arrives exactly once, in order."""
    fake, address = await serve(drop_results_after=2)
    calls = Calls(kind, address)
    job = await calls("submit_job", openai_lines(10))
    results = await calls("job_results", job.job_id)
    assert [r.custom_id for r in results] == [f"q{i}" for i in range(10)]
    assert fake.result_tokens == ["", "6"]
    assert results[3].error.reason == "INVALID_ARGUMENT"
    assert results[0].generate.text == "answer to q0"


async def test_results_stop_after_the_last_page(serve: Serve, kind: str) -> None:
    """A stream that fails after its last page is not read again from the start."""
    fake, address = await serve(drop_results_after=4)  # 10 results in pages of 3: 4 pages
    calls = Calls(kind, address)
    job = await calls("submit_job", openai_lines(10))
    results = await calls("job_results", job.job_id)
    assert len(results) == 10
    assert fake.result_tokens == [""]


async def test_results_of_chosen_custom_ids(serve: Serve, kind: str) -> None:
    _, address = await serve()
    calls = Calls(kind, address)
    job = await calls("submit_job", openai_lines(10))
    results = await calls("job_results", job.job_id, ["q7", "q2"])
    assert [r.custom_id for r in results] == ["q2", "q7"]


# -- the CLI --------------------------------------------------------------------------------


async def sluice(*args: str) -> Any:
    """``sluice`` with ``args`` on a thread (the fake server runs on this test's loop)."""
    return await asyncio.to_thread(CliRunner().invoke, sluice_cli.app, list(args))


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


async def test_cli_submit_reports_a_malformed_line_and_submits_nothing(
    serve: Serve, tmp_path: Path
) -> None:
    """`sluice jobs submit` on a file with one bad line names its line number and field,
    exits 1 and submits nothing."""
    fake, address = await serve()
    bad = {**openai_lines(1)[0], "custom_id": "bad"}
    bad["body"] = {**bad["body"], "temperature": 9}
    path = write_jsonl(tmp_path / "lines.jsonl", [*openai_lines(2), bad])
    result = await sluice("jobs", "submit", str(path), "--endpoint", address, "--insecure")
    assert result.exit_code == 1, result.output
    assert "line 3: body.temperature" in result.output
    assert "nothing submitted" in result.output
    assert fake.streams == []


async def test_cli_submit_skip_invalid_wait_and_results(serve: Serve, tmp_path: Path) -> None:
    """With --skip-invalid the good lines of both formats are submitted (window, label and
    key passed on); --wait follows the job to COMPLETED and exits 0; results are JSONL."""
    fake, address = await serve()
    sluice_line = {"custom_id": "s", "generate": {"model": MODEL, "prompt": "Once"}}
    path = write_jsonl(tmp_path / "l.jsonl", [*openai_lines(3), "{oops", "", sluice_line])
    connect = ("--endpoint", address, "--insecure")
    submitted = await sluice(
        "jobs", "submit", str(path), "--skip-invalid", "--wait", "--window", "2h",
        "--label", "team=search", "--idempotency-key", "k-7", *connect,
    )  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    assert "line 4" in submitted.output
    assert submitted.stdout.splitlines()[0] == "job-1"
    header = fake.headers[0]
    assert (header.line_count, header.completion_window_seconds) == (4, 7200)
    assert (dict(header.labels), header.idempotency_key) == ({"team": "search"}, "k-7")
    assert fake.jobs["job-1"].state == jobs_pb2.JOB_STATE_COMPLETED

    results = await sluice("jobs", "results", "job-1", *connect)
    assert results.exit_code == 0, results.output
    records = [json.loads(line) for line in results.stdout.splitlines()]
    assert [r["custom_id"] for r in records] == ["q0", "q1", "q2", "s"]
    assert records[0]["response"]["text"] == "answer to q0"
    assert records[0]["error"] is None
    assert records[3]["response"] is None
    assert records[3]["error"]["code"] == "INVALID_ARGUMENT"


async def test_cli_list_show_and_cancel(serve: Serve, tmp_path: Path) -> None:
    _, address = await serve()
    path = write_jsonl(tmp_path / "l.jsonl", openai_lines(2))
    connect = ("--endpoint", address, "--insecure")
    for _ in range(2):
        assert (await sluice("jobs", "submit", str(path), *connect)).exit_code == 0
    cancelled = await sluice("jobs", "cancel", "job-1", *connect)
    assert cancelled.exit_code == 0
    assert "cancelling" in cancelled.output
    listed = await sluice("jobs", "list", "--state", "queued", *connect)
    assert listed.exit_code == 0, listed.output
    assert "job-2" in listed.stdout
    assert "job-1" not in listed.stdout
    assert (await sluice("jobs", "list", "--state", "nope", *connect)).exit_code == 2
    shown = await sluice("jobs", "show", "job-2", "--json", *connect)
    assert json.loads(shown.stdout)["job_id"] == "job-2"
    missing = await sluice("jobs", "show", "job-9", *connect)
    assert missing.exit_code == 1
    assert "NOT_FOUND" in missing.output
