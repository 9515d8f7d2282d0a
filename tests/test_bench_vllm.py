"""``make bench-vllm``'s pure pieces and its OpenAI target: the HTTP, SSE and completion parsers
on bytes alone, the request body, the target against a canned loopback responder, the vLLM
server's flags, the levels and verdicts, the report. The benchmark itself (vLLM and a suite
under load) is not part of ``make test``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.load.cli import cli_main
from bench.load.openai_target import (
    CompletionStream,
    HttpHead,
    HttpProtocolError,
    HttpResponseParser,
    OpenAITarget,
    SseParser,
    completion_body,
    finish_reason,
    http_error,
    parse_endpoint,
)
from bench.load.records import OUTCOME_OK, OUTCOME_REFUSED, RequestRecord
from bench.load.run import LoadResult, run_load
from bench.load.scenario import PlannedRequest, load_scenario, parse_scenario
from bench.load.targets import GenerationSettings, TargetError
from bench.overload.options import Options
from bench.overload.paired import Phase, run_paired
from bench.overload.search import SearchResult, SearchStep
from bench.vllm.cli import parse_args, scenario_entry, skip_reason
from bench.vllm.figures import capacity_verdict, level_verdict
from bench.vllm.measure import TargetBenchmark, level_plan, target_factory
from bench.vllm.report import markdown
from bench.vllm.servers import VLLM_SERVER, VllmServe, node_settings
from inference_node.loading import dtype_name
from sluice.local.stores import free_port
from sluice.local.up import UpConfig
from sluice.v1 import common_pb2

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE = REPO_ROOT / "bench" / "scenarios" / "smoke.yaml"
MODEL = "smollm2-135m-instruct"


def chunked(*parts: bytes) -> bytes:
    """``parts`` as a chunked body, with its last chunk."""
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


def event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def choice(text: str, ids: list[int], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "text": text,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": ids,
            }
        ],
    }


USAGE = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
VLLM_EVENTS = [
    event(choice(" the", [260])),
    event(choice(" time", [480])),
    event(choice(" day", [1000], "length")),
    event(USAGE),
    event("[DONE]"),
]
"""A streamed completion as vLLM 0.32 sends it (three tokens, then usage, then DONE)."""
HEAD_200 = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
)


def feed_all(parser: HttpResponseParser, data: bytes, piece: int) -> bytes:
    return b"".join(parser.feed(data[i : i + piece]) for i in range(0, len(data), piece))


def test_chunked_response_decodes_alike_whole_or_byte_by_byte() -> None:
    """A chunked body (chunk extensions and trailers too) gives the same bytes however the
    response is split, and is complete only after its last chunk and blank line."""
    body = chunked(b"hello ", b"world").replace(b"6\r\n", b"6;ext=1\r\n", 1)
    body = body.removesuffix(b"\r\n") + b"x-trailer: 1\r\n\r\n"
    data = HEAD_200 + body
    for piece in (1, 3, len(data)):
        parser = HttpResponseParser()
        assert feed_all(parser, data, piece) == b"hello world"
        assert parser.complete
        assert parser.head is not None and parser.head.status == 200
        assert parser.head.headers["content-type"].startswith("text/event-stream")
    parser = HttpResponseParser()
    parser.feed(data[:-2])
    assert not parser.complete


def test_sized_close_delimited_and_cut_short_responses() -> None:
    """``Content-Length`` ends a body at its length, a body without either ends at the close,
    and a response cut short (or not HTTP) raises ``HttpProtocolError``."""
    sized = HttpResponseParser()
    data = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\nabcdeEXTRA"
    assert sized.feed(data) == b"abcde" and sized.complete
    closed = HttpResponseParser()
    assert closed.feed(b"HTTP/1.1 200 OK\r\n\r\nsome") == b"some" and not closed.complete
    closed.eof()
    assert closed.complete
    cut = HttpResponseParser()
    cut.feed(HEAD_200 + b"5\r\nab")
    with pytest.raises(HttpProtocolError):
        cut.eof()
    with pytest.raises(HttpProtocolError):
        HttpResponseParser().eof()
    with pytest.raises(HttpProtocolError):
        HttpResponseParser().feed(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(HttpProtocolError):
        HttpResponseParser().feed(HEAD_200 + b"zz\r\n")


def test_sse_parser_joins_data_lines_and_skips_comments_across_splits() -> None:
    """Events end at a blank line (LF or CRLF), ``data:`` lines join with newlines, comments
    and other fields are skipped, and a UTF-8 character split between pieces survives."""
    stream = ": keep-alive\r\n\r\nevent: x\ndata: a\ndata:b\n\ndata: é\r\n\r\n".encode()
    for piece in (1, 2, len(stream)):
        parser = SseParser()
        events = [
            e for i in range(0, len(stream), piece) for e in parser.feed(stream[i : i + piece])
        ]
        assert events == ["a\nb", "é"]


def test_completion_stream_gives_token_chunks_then_one_last_chunk() -> None:
    """vLLM's events become one chunk per token delta (ids and text), then, at ``[DONE]``, one
    last chunk with the finish reason and the usage, as the Sluice target's stream ends."""
    parser, stream = HttpResponseParser(), CompletionStream()
    data = HEAD_200 + chunked(*VLLM_EVENTS)
    chunks = [c for i in range(0, len(data), 7) for c in stream.feed(parser.feed(data[i : i + 7]))]
    assert [list(c.token_ids) for c in chunks] == [[260], [480], [1000], []]
    assert [c.text for c in chunks[:3]] == [" the", " time", " day"]
    assert all(c.finish_reason == 0 for c in chunks[:3])
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 3)
    assert stream.done and stream.ended and stream.finish() == []


def test_a_stream_without_done_ends_at_the_close_and_one_without_finish_gives_nothing() -> None:
    """The last chunk also comes when the body ends without ``[DONE]`` (``finish``), and never
    without a finish reason (the run then records an incomplete stream)."""
    stream = CompletionStream()
    stream.feed(b"".join(VLLM_EVENTS[:4]))
    assert [c.finish_reason for c in stream.finish()] == [common_pb2.FINISH_REASON_LENGTH]
    cut = CompletionStream()
    assert len(cut.feed(b"".join(VLLM_EVENTS[:2]))) == 2
    assert cut.finish() == []


def test_finish_reasons_map_as_the_vllm_node_maps_them() -> None:
    assert finish_reason("length", None) == common_pb2.FINISH_REASON_LENGTH
    assert finish_reason("stop", None) == common_pb2.FINISH_REASON_EOS
    assert finish_reason("stop", 2) == common_pb2.FINISH_REASON_EOS
    assert finish_reason("stop", "\n") == common_pb2.FINISH_REASON_STOP
    assert finish_reason("abort", None) == common_pb2.FINISH_REASON_CANCELLED
    with pytest.raises(TargetError) as failed:
        finish_reason("error", None)
    assert failed.value.code == "INTERNAL"


def test_an_error_event_or_garbage_in_the_stream_fails_the_request() -> None:
    """An ``{"error": ...}`` event is ``INTERNAL`` (a refusal when its code is 429 or 503); a
    non-JSON event is ``INTERNAL``."""
    error = {"error": {"message": "boom", "type": "InternalServerError", "code": 500}}
    with pytest.raises(TargetError) as failed:
        CompletionStream().feed(event(choice(" a", [1])) + event(error))
    assert (failed.value.code, failed.value.reason) == ("INTERNAL", "InternalServerError")
    busy = {"error": {"message": "busy", "type": "x", "code": 503}}
    with pytest.raises(TargetError) as refused:
        CompletionStream().feed(event(busy))
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(TargetError) as garbage:
        CompletionStream().feed(b"data: {not json\n\n")
    assert garbage.value.code == "INTERNAL"


def test_http_statuses_map_to_refusals_and_errors() -> None:
    """429 and 503 are refusals (``Retry-After`` seconds as the delay, none for a date), any
    other status ``HTTP_<status>`` with OpenAI's error message."""
    busy = http_error(HttpHead(503, "Service Unavailable", {"retry-after": "2"}), b"busy")
    assert (busy.code, busy.retry_after_s) == ("RESOURCE_EXHAUSTED", 2.0)
    dated = HttpHead(429, "Too Many Requests", {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert http_error(dated, b"").retry_after_s is None
    body = json.dumps({"error": {"message": "too long", "type": "BadRequestError", "code": 400}})
    bad = http_error(HttpHead(400, "Bad Request", {}), body.encode())
    assert (bad.code, bad.reason) == ("HTTP_400", "BadRequestError")
    assert "too long" in bad.message


def planned(max_new_tokens: int = 32, model: str = "", timeout_s: float = 5.0) -> PlannedRequest:
    return PlannedRequest(
        index=0,
        tenant="A",
        workload_class="realtime",
        scheduled_s=0.0,
        prompt="time year people",
        prompt_tokens=3,
        max_new_tokens=max_new_tokens,
        timeout_s=timeout_s,
        model=model,
    )


def test_the_request_body_asks_for_what_sluice_is_asked() -> None:
    """The same prompt text without special tokens, the planned length exactly (ignore_eos and
    min_tokens), greedy, streamed with usage and token ids."""
    body = completion_body(planned(48), GenerationSettings(model=MODEL))
    assert body == {
        "model": MODEL,
        "prompt": "time year people",
        "max_tokens": 48,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "add_special_tokens": False,
        "return_token_ids": True,
        "ignore_eos": True,
        "min_tokens": 48,
    }
    free = completion_body(planned(8, model="other"), GenerationSettings(MODEL, ignore_eos=False))
    assert free["model"] == "other" and "ignore_eos" not in free and "min_tokens" not in free


def test_parse_endpoint() -> None:
    assert parse_endpoint("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_endpoint("http://localhost:8000/") == ("localhost", 8000)
    assert parse_endpoint("[::1]:9") == ("::1", 9)
    for bad in ("localhost", "http://h:1/v1", "h:port"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


Responder = Callable[[asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def responder(reply: Responder, requests: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A loopback server that reads each request (its JSON body into ``requests``), then lets
    ``reply`` answer; yields its ``host:port``; its handlers are cancelled at the end."""
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        requests.append(json.loads(await reader.readexactly(length)))
        try:
            await reply(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def stream_reply(writer: asyncio.StreamWriter) -> None:
    writer.write(HEAD_200)
    for e in VLLM_EVENTS:
        writer.write(f"{len(e):x}\r\n".encode() + e + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def test_target_streams_a_completion_and_the_run_records_it_as_sluices() -> None:
    """Through a real socket: the run records TTFT, TPOT, tokens, finish reason and usage from
    the OpenAI stream exactly as from a Sluice stream, and sent the body it builds."""
    requests: list[dict[str, Any]] = []
    data = {
        "name": "t", "model": MODEL, "duration_s": 0.3, "seed": 1,
        "tenants": [{
            "name": "A", "class": "realtime", "rate_rps": 10,
            "prompt_tokens": {"kind": "fixed", "value": 4},
            "output_tokens": {"kind": "fixed", "value": 3},
        }],
    }  # fmt: skip
    scenario = parse_scenario(data)
    async with responder(stream_reply, requests) as address:
        target = target_factory({})(VLLM_SERVER, scenario, address)
        assert isinstance(target, OpenAITarget)
        result = await run_load(scenario, target)
    assert result.records and len(requests) == len(result.records)
    for record in result.records:
        assert (record.outcome, record.status, record.finish_reason) == (OUTCOME_OK, "OK", "LENGTH")
        assert (record.output_tokens, record.prompt_tokens) == (3, 5)
        assert record.ttft_s is not None and record.tpot_s is not None and record.tpot_s > 0
    assert requests[0]["max_tokens"] == 3 and requests[0]["stream"] is True


async def test_target_reads_refusals_deadlines_and_dead_servers() -> None:
    """A 503 is a refusal with its delay, a server that never answers runs into the request's
    deadline, a closed port is ``UNAVAILABLE``, Embed is ``UNIMPLEMENTED``."""

    async def busy(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1.5\r\n")
        writer.write(b"Content-Length: 4\r\n\r\nbusy")
        await writer.drain()

    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    settings = GenerationSettings(model=MODEL)
    cases: list[tuple[Responder, str]] = [
        (busy, "RESOURCE_EXHAUSTED"),
        (silent, "DEADLINE_EXCEEDED"),
    ]
    for reply, code in cases:
        async with responder(reply, []) as address:
            with pytest.raises(TargetError) as failed:
                async for _ in OpenAITarget(address, settings).generate(planned(timeout_s=0.3)):
                    pass
        assert failed.value.code == code
    dead = OpenAITarget(f"127.0.0.1:{free_port()}", settings)
    with pytest.raises(TargetError) as refused:
        async for _ in dead.generate(planned()):
            pass
    assert refused.value.code == "UNAVAILABLE"
    with pytest.raises(TargetError) as embed:
        await dead.embed(planned())
    assert embed.value.code == "UNIMPLEMENTED"


def test_load_cli_needs_an_endpoint_for_the_openai_target(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(SMOKE, "openai", None, None, None, None) == 2
    assert "no endpoint for target openai" in capsys.readouterr().err


def test_bare_vllm_gets_the_engine_settings_of_the_node_sluice_up_starts() -> None:
    """The node's defaults (32 sequences, 512 tokens per step, 2 GiB of KV cache), ``sluice
    up``'s dtype (``auto`` resolved as the node resolves it) and batch cap, the model's
    context, prefix caching on as the node has it (vLLM's own default), off where the node's
    is."""
    node = node_settings(UpConfig(engine="vllm"))
    assert node.dtype == dtype_name("cpu", "auto") != "auto"
    serve = VllmServe.like_node(node, MODEL, Path("/models/smol"), 8192)
    argv = serve.argv(Path("/venv/bin/python"), "127.0.0.1", 8000)
    flags = dict(zip(argv[5::2], argv[6::2], strict=False))
    assert argv[:5] == [
        "/venv/bin/python",
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        "/models/smol",
    ]
    assert flags["--served-model-name"] == MODEL and flags["--port"] == "8000"
    assert flags["--dtype"] == node.dtype and flags["--max-model-len"] == "8192"
    assert flags["--max-num-seqs"] == "32" and flags["--max-num-batched-tokens"] == "512"
    assert flags["--kv-cache-memory-bytes"] == str(2 * 1024**3)
    assert "--enable-prefix-caching" in argv and "--no-enable-prefix-caching" not in argv
    uncached = node_settings(UpConfig(engine="vllm", vllm_prefix_caching=False))
    assert not uncached.vllm_prefix_caching  # `sluice up --no-prefix-caching`
    argv = VllmServe.like_node(uncached, MODEL, Path("/m"), 8192).argv(Path("/p"), "h", 1)
    assert "--no-enable-prefix-caching" in argv and "--enable-prefix-caching" not in argv
    capped = node_settings(UpConfig(engine="vllm", max_sequences=16, dtype="bfloat16"))
    assert (capped.max_sequences, capped.dtype) == (16, "bfloat16")


def test_levels_are_multiples_of_bare_vllms_capacity_or_its_lowest_probe() -> None:
    found = SearchResult(1.2, [SearchStep(1.2, 0.97, True), SearchStep(2.4, 0.5, False)])
    assert level_plan(found, 0.5) == [
        (2.4, "2x bare vLLM's capacity"),
        (4.8, "4x bare vLLM's capacity"),
    ]
    none = SearchResult(0.0, [SearchStep(0.5, 0.2, False), SearchStep(0.25, 0.6, False)])
    assert [rate for rate, _ in level_plan(none, 0.5)] == [0.5, 1.0]
    assert "no capacity at SLO found" in level_plan(none, 0.5)[0][1]


def test_capacity_verdict_needs_nine_tenths_of_bare_vllms() -> None:
    assert capacity_verdict(0.9, 1.0)["pass"] and capacity_verdict(1.5, 1.0)["ratio"] == 1.5
    assert not capacity_verdict(0.89, 1.0)["pass"]
    assert capacity_verdict(1.0, 0.0) == {
        "sluice_rps": 1.0, "bare_rps": 0.0, "ratio": None, "target": 0.9, "pass": False
    }  # fmt: skip
    assert not capacity_verdict(None, 1.0)["pass"] and not capacity_verdict(0.0, 1.0)["pass"]


def classes(admitted: float | None, met: int, requests: int) -> dict[str, dict[str, Any]]:
    return {"realtime": {"attainment_admitted": admitted, "met_slo": met, "requests": requests}}


def test_level_verdict_judges_sluice_and_reports_whether_bare_vllm_falls() -> None:
    verdict = level_verdict(classes(0.96, 24, 30), classes(0.40, 12, 30))
    assert verdict["pass"] and verdict["bare_falls"]
    assert verdict["sluice_realtime_attainment_all"] == pytest.approx(0.8)
    assert not level_verdict(classes(0.94, 47, 50), classes(0.97, 48, 50))["pass"]
    assert not level_verdict(classes(0.97, 48, 50), classes(0.97, 48, 50))["bare_falls"]
    missing = level_verdict(None, classes(0.5, 1, 2))
    assert not missing["pass"] and missing["sluice_realtime_attainment_admitted"] is None


def record(i: int, cls: str, ok: bool, refused: bool = False) -> RequestRecord:
    return RequestRecord(
        index=i, tenant="A" if cls == "realtime" else "C", workload_class=cls,
        scheduled_s=float(i), sent_s=float(i), ttft_s=0.1 if ok else 9.0, tpot_s=0.05,
        e2e_s=1.0, output_tokens=8, requested_tokens=8, prompt_tokens=4,
        status="RESOURCE_EXHAUSTED" if refused else "OK",
        outcome=OUTCOME_REFUSED if refused else OUTCOME_OK,
    )  # fmt: skip


class FakeServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.address = "127.0.0.1:1"

    def start(self) -> None: ...

    def stop(self) -> None: ...


def test_entry_and_report_from_synthetic_runs() -> None:
    """A scenario's entry pairs each level's runs on both servers with its verdict, and the
    report renders it with a skipped scenario beside it."""
    scenario = parse_scenario(
        {
            "name": "s", "model": MODEL, "duration_s": 10,
            "tenants": [
                {"name": "A", "class": "realtime", "rate_rps": 1,
                 "prompt_tokens": {"kind": "fixed", "value": 4},
                 "output_tokens": {"kind": "fixed", "value": 8}},
                {"name": "C", "class": "batch", "rate_rps": 1,
                 "prompt_tokens": {"kind": "fixed", "value": 4},
                 "output_tokens": {"kind": "fixed", "value": 8}},
            ],
        }
    )  # fmt: skip
    plan = [(2.0, "2x bare vLLM's capacity"), (4.0, "4x bare vLLM's capacity")]
    phases = {}
    for name, good in ((VLLM_SERVER, 10), ("sluice", 20)):
        bench = TargetBenchmark(scenario, {}, Options(), target_factory({}))
        records = [record(i, "realtime", i < good) for i in range(20)]
        records += [record(20 + i, "batch", True, refused=i < 5) for i in range(10)]
        bench.runs[(name, 2.0)] = LoadResult(scenario, name, records, 10.0, 12.0, 2.0, 0.0)
        phase = Phase(bench, FakeServer(name), SearchResult(1.0, [SearchStep(1.0, 0.96, True)]))
        phase.levels = [plan[0]]  # the 4x level was not run
        phases[name] = phase
    phases["sluice"].search = SearchResult(0.95, [SearchStep(0.95, 0.97, True)])
    entry = scenario_entry(scenario, {}, phases[VLLM_SERVER], phases["sluice"], plan)
    assert entry["capacity"]["pass"] and entry["capacity"]["ratio"] == pytest.approx(0.95)
    two, four = entry["levels"]
    assert two["verdict"]["pass"] and two["verdict"]["bare_falls"]
    assert two["bare"]["classes"]["realtime"]["attainment_admitted"] == 0.5
    assert two["sluice"]["classes"]["batch"]["refused"] == 5
    assert four["bare"] is None and not four["verdict"]["pass"]
    doc = {
        "generated_at": "now", "wall_s": 1.0, "smoke": True, "machine": {}, "vllm_version": "x",
        "scenarios": [entry, {"scenario": "embed-heavy", "model": MODEL, "skipped": "embed"}],
    }  # fmt: skip
    text = markdown(json.loads(json.dumps(doc)))
    assert "| s | capacity at SLO | 0.950 req/s (0.95× bare) | 1.000 req/s |" in text
    assert "100.0 % | 50.0 % (falls) | Sluice ≥ 95 % | pass |" in text
    assert "embed-heavy: not run, embed" in text and "not run |" in text


class Turns(TargetBenchmark):
    """A benchmark whose runs only note themselves in ``events``: a probe passes at or below
    ``capacity``; ``broken`` raises on the probe at that rate."""

    def __init__(
        self, events: list[tuple[Any, ...]], capacity: float, broken: float = 0.0, steps: int = 8
    ):
        scenario = load_scenario(REPO_ROOT / "bench" / "scenarios" / "overload.yaml")
        options = Options(refine_steps=1, max_search_steps=steps)
        super().__init__(scenario, {}, options, target_factory({}))
        self.events, self.capacity, self.broken = events, capacity, broken

    def warm(self, server: Any, rate: float, seconds: float) -> None:
        self.events.append(("warm", server.name))

    def attainment(self, server: Any, rate: float) -> float:
        self.events.append(("probe", server.name, rate))
        if rate == self.broken:
            raise RuntimeError("gone")
        return 1.0 if rate <= self.capacity else 0.0

    def levels(
        self, server: Any, plan: Any, realtime_judged_at: float | None = None
    ) -> list[tuple[float, str]]:
        self.events.append(("level", server.name, plan[0][0]))
        return list(plan)


def test_paired_run_takes_turns_and_the_other_server_goes_on_when_one_fails() -> None:
    """Both servers start, warm, probe and run each level in turn, bare vLLM first; a search
    that ended or failed leaves the other's probes running alone, and both are stopped."""
    events: list[tuple[Any, ...]] = []
    stopped: list[str] = []

    class Stopped(FakeServer):
        def stop(self) -> None:
            stopped.append(self.name)

    bare = Phase(Turns(events, capacity=2.0), Stopped(VLLM_SERVER))
    sluice = Phase(Turns(events, capacity=4.0), Stopped("sluice"))
    run_paired((bare, sluice), 1.0, (1.0, 5.0), lambda s: level_plan(s, 1.0))
    probes = [(e[1], e[2]) for e in events if e[0] == "probe"]
    assert probes[:6] == [
        (VLLM_SERVER, 1.0), ("sluice", 1.0), (VLLM_SERVER, 2.0), ("sluice", 2.0),
        (VLLM_SERVER, 4.0), ("sluice", 4.0),
    ]  # fmt: skip
    assert probes[6:] == [(VLLM_SERVER, 2.8284), ("sluice", 8.0), ("sluice", 5.6569)]
    assert bare.search is not None and bare.search.capacity_rps == 2.0
    assert sluice.search is not None and sluice.search.capacity_rps == 4.0
    assert [e for e in events if e[0] == "level"] == [
        ("level", VLLM_SERVER, 4.0), ("level", "sluice", 4.0),
        ("level", VLLM_SERVER, 8.0), ("level", "sluice", 8.0),
    ]  # fmt: skip
    assert events[:2] == [("warm", VLLM_SERVER), ("warm", "sluice")]
    assert stopped == [VLLM_SERVER, "sluice"] and bare.error is sluice.error is None

    events.clear()
    bare = Phase(Turns(events, capacity=2.0, broken=2.0), FakeServer(VLLM_SERVER))
    sluice = Phase(Turns(events, capacity=1.0), FakeServer("sluice"))
    run_paired((bare, sluice), 1.0, (1.0, 5.0), lambda s: level_plan(s, 1.0))
    assert [(e[1], e[2]) for e in events if e[0] == "probe"] == [
        (VLLM_SERVER, 1.0), ("sluice", 1.0), (VLLM_SERVER, 2.0), ("sluice", 2.0),
        ("sluice", 1.4142),
    ]  # fmt: skip
    assert bare.error == "RuntimeError: gone" and bare.search is None
    assert sluice.search is not None and sluice.search.capacity_rps == 1.0
    assert sluice.error == f"levels not run: {VLLM_SERVER}'s capacity was not measured"
    assert not [e for e in events if e[0] == "level"]


def test_paired_run_stops_a_failed_server_at_once_and_every_server_at_the_end(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A server that cannot start is stopped before the other's first probe; a stop that
    raises is reported and the next server is stopped all the same; a search allowed no probe
    still plans levels."""
    events: list[tuple[Any, ...]] = []

    class Recorded(FakeServer):
        def stop(self) -> None:
            events.append(("stop", self.name))

    class Broken(Recorded):
        def start(self) -> None:
            raise OSError("no port")

    class Stuck(Recorded):
        def stop(self) -> None:
            super().stop()
            raise RuntimeError("stuck")

    bare = Phase(Turns(events, capacity=2.0), Broken(VLLM_SERVER))
    sluice = Phase(Turns(events, capacity=1.0), Recorded("sluice"))
    run_paired((bare, sluice), 1.0, (1.0, 5.0), lambda s: level_plan(s, 1.0))
    assert events[0] == ("stop", VLLM_SERVER) and events[-1] == ("stop", "sluice")
    assert [e for e in events if e[0] == "stop"] == [("stop", VLLM_SERVER), ("stop", "sluice")]
    assert bare.error == "OSError: no port" and bare.search is None
    assert sluice.search is not None and sluice.search.capacity_rps == 1.0

    events.clear()
    bare = Phase(Turns(events, capacity=1.0), Stuck(VLLM_SERVER))
    sluice = Phase(Turns(events, capacity=1.0), Recorded("sluice"))
    run_paired((bare, sluice), 1.0, (1.0, 5.0), lambda s: level_plan(s, 1.0))
    assert events[-2:] == [("stop", VLLM_SERVER), ("stop", "sluice")]
    assert "stop failed: RuntimeError('stuck')" in capsys.readouterr().err
    assert bare.stopped is False and sluice.stopped is True

    def no_plan(_search: SearchResult) -> list[tuple[float, str]]:
        raise ValueError("no plan")

    bare = Phase(Turns(events, capacity=1.0), FakeServer(VLLM_SERVER))
    sluice = Phase(Turns(events, capacity=1.0, broken=2.0), FakeServer("sluice"))
    run_paired((bare, sluice), 1.0, (1.0, 5.0), no_plan)
    assert bare.error == "ValueError: no plan" and sluice.error == "RuntimeError: gone"
    assert bare.search is not None and bare.search.capacity_rps == 1.0

    events.clear()
    bare = Phase(Turns(events, capacity=2.0, steps=0), FakeServer(VLLM_SERVER))
    sluice = Phase(Turns(events, capacity=2.0, steps=0), FakeServer("sluice"))
    run_paired((bare, sluice), 1.0, (1.0, 5.0), lambda s: level_plan(s, 1.0))
    assert bare.search is not None and bare.search.steps == [] and bare.error is None
    assert [e[1:] for e in events if e[0] == "level"] == [
        (VLLM_SERVER, 2.0), ("sluice", 2.0), (VLLM_SERVER, 4.0), ("sluice", 4.0),
    ]  # fmt: skip


def test_scenarios_bare_vllm_cannot_run_are_skipped_with_the_reason() -> None:
    """Embed tenants (no /v1/embeddings) or a second model (one served) skip a scenario; the
    default generation scenarios run."""
    scenarios = REPO_ROOT / "bench" / "scenarios"
    embed = skip_reason(load_scenario(scenarios / "embed-heavy.yaml"))
    assert embed is not None and embed.startswith("embed tenants (A, C)")
    for name in ("overload.yaml", "chat-longtail.yaml"):
        assert skip_reason(load_scenario(scenarios / name)) is None
    two = load_scenario(scenarios / "overload.yaml").model_dump(by_alias=True, exclude_unset=True)
    two["tenants"][0]["model"] = "tiny-random-llama"
    assert "several models" in (skip_reason(parse_scenario(two)) or "")


def test_smoke_shortens_the_steps_but_flags_still_win() -> None:
    args = parse_args(["--smoke", "--step-s", "12"])
    assert (args.step_s, args.max_search_steps, args.warm_s) == (12.0, 2, 5.0)
    assert parse_args([]).step_s == 30.0
