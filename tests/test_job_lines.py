"""A batch job's lines, read from Sluice's and OpenAI's JSONL formats, with every problem
reported per line; the chunks a SubmitJob stream sends; results as JSON lines. Pure: no I/O."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from sluice import (
    JobLineError,
    JobLinesError,
    WorkloadClass,
    embed_line,
    generate_line,
    parse_job_lines,
    result_record,
)
from sluice.sdk import job_lines
from sluice.sdk.job_lines import job_chunks
from sluice.sdk.requests import submit_job_requests
from sluice.v1 import common_pb2, inference_pb2, jobs_pb2

MODEL = "smollm2-135m-instruct"


def chat(custom_id: str = "q1", url: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
    """An OpenAI batch line with ``body`` over a minimal valid chat body."""
    base: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {**base, **body}}


def problems(*items: Any) -> list[tuple[int, str, str]]:
    return [(e.line_number, e.field, e.message) for e in parse_job_lines(items).errors]


# -- well-formed lines ------------------------------------------------------------------


def test_sluice_lines_become_generate_and_embed_requests() -> None:
    """Sluice's format is a GenerateRequest or EmbedRequest in protobuf's JSON mapping, under
    ``generate`` or ``embed``; proto and lowerCamelCase field names both work."""
    parsed = parse_job_lines(
        [
            {
                "custom_id": "a",
                "generate": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "options": {"max_new_tokens": 8, "temperature": 0.5, "stop": ["\n"]},
                },
            },
            {"custom_id": "b", "generate": {"model": MODEL, "prompt": "Once", "options": {}}},
            {"custom_id": "c", "generate": {"model": MODEL, "prompt": "x", "cacheBypass": True}},
            {"custom_id": "d", "embed": {"model": "all-minilm-l6-v2", "inputs": ["a", "b"]}},
        ]
    )
    assert parsed.errors == []
    a, b, c, d = parsed.lines
    assert a.custom_id == "a"
    assert a.generate.messages[0].content == "Hi"
    assert a.generate.options.max_new_tokens == 8
    assert a.generate.options.temperature == pytest.approx(0.5)
    assert list(a.generate.options.stop) == ["\n"]
    assert b.generate.prompt == "Once"
    assert not b.generate.options.HasField("max_new_tokens")
    assert c.generate.cache_bypass
    assert list(d.embed.inputs) == ["a", "b"]


def test_openai_chat_line_maps_its_body_fields() -> None:
    """An OpenAI chat line: messages (text parts joined, ``developer`` read as system),
    max_tokens, temperature, top_p, seed and a lone stop string; ignored fields pass."""
    line = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
            },
        ],
        max_tokens=32,
        temperature=0.7,
        top_p=0.9,
        seed=7,
        stop="END",
        n=1,
        stream=False,
        user="u-1",
        metadata={"k": "v"},
    )
    [parsed] = parse_job_lines([line]).check()
    request = parsed.generate
    assert parsed.custom_id == "q1"
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."),
        ("user", "Hello"),
    ]
    assert request.model == MODEL
    assert request.options.max_new_tokens == 32
    assert request.options.temperature == pytest.approx(0.7)
    assert request.options.top_p == pytest.approx(0.9)
    assert request.options.seed == 7
    assert list(request.options.stop) == ["END"]


def test_openai_completions_and_embeddings_lines() -> None:
    """``/v1/completions`` takes one prompt and ``max_completion_tokens``; ``/v1/embeddings``
    takes ``input`` as a string or a list."""
    lines = [
        {
            "custom_id": "p",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": ["Once upon"], "max_completion_tokens": 5},
        },
        {
            "custom_id": "e1",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-minilm-l6-v2", "input": "a cat", "encoding_format": "float"},
        },
        {
            "custom_id": "e2",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-minilm-l6-v2", "input": ["a", "b"]},
        },
    ]
    p, e1, e2 = parse_job_lines(lines).check()
    assert (p.generate.prompt, p.generate.options.max_new_tokens) == ("Once upon", 5)
    assert list(e1.embed.inputs) == ["a cat"]
    assert list(e2.embed.inputs) == ["a", "b"]


def test_both_formats_mix_in_one_file_and_numbers_are_the_files_lines() -> None:
    """JSON texts (an open file) are told apart per line; blank lines are skipped but
    counted, so an error names the file's line number."""
    text = "\n".join(
        [
            json.dumps(chat("a")),
            "",
            json.dumps({"custom_id": "b", "generate": {"model": MODEL, "prompt": "x"}}),
            "   ",
            json.dumps({"custom_id": "c", "generate": {"model": MODEL, "prompt": ""}}),
        ]
    )
    parsed = parse_job_lines(io.StringIO(text))
    assert [line.custom_id for line in parsed.lines] == ["a", "b"]
    assert [(e.line_number, e.field) for e in parsed.errors] == [(5, "generate.prompt")]


def test_message_lines_pass_through_and_are_checked_too() -> None:
    """JobLine messages (from generate_line and embed_line) are taken as they are, after the
    same checks: custom_id, a body, the contract limits."""
    good = [
        generate_line("g", MODEL, [("user", "Hi")], max_new_tokens=4),
        embed_line("e", "m", "x"),
    ]
    assert parse_job_lines(good).check() == good
    bad = [
        jobs_pb2.JobLine(custom_id="x"),
        generate_line("", MODEL, "Hi"),
        generate_line("t", MODEL, "Hi", temperature=5.0),
    ]
    assert [(e.line_number, e.field) for e in parse_job_lines(bad).errors] == [
        (1, ""),
        (2, "custom_id"),
        (3, "generate.options.temperature"),
    ]


def test_a_lines_own_workload_class_is_not_an_error() -> None:
    """The job's class applies to every line, so a class set on a line is ignored."""
    line = {"custom_id": "a", "generate": {"model": MODEL, "prompt": "x", "workload_class": 1}}
    assert parse_job_lines([line]).errors == []


# -- malformed lines ------------------------------------------------------------------


def gen(**fields: Any) -> dict[str, Any]:
    """A Sluice generate line with ``fields`` over a minimal valid request (None: drop)."""
    request = {"model": MODEL, "prompt": "x", **fields}
    return {"custom_id": "a", "generate": {k: v for k, v in request.items() if v is not None}}


def embeddings(**body: Any) -> dict[str, Any]:
    """An OpenAI embeddings line with ``body`` over a minimal valid one (None: drop)."""
    line = chat(url="/v1/embeddings")
    full = {"model": MODEL, "input": "x", **body}
    return {**line, "body": {k: v for k, v in full.items() if v is not None}}


def completion(**body: Any) -> dict[str, Any]:
    line = chat(url="/v1/completions")
    return {**line, "body": {"model": MODEL, **body}}


USER = {"role": "user", "content": "x"}


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ("{not json", "", "not JSON"),
        ("[1, 2]", "", "must be a JSON object"),
        ({"custom_id": "a"}, "", "neither a Sluice line"),
        ({"generate": {"model": MODEL, "prompt": "x"}}, "custom_id", "required"),
        ({**gen(), "custom_id": 7}, "custom_id", "required"),
        ({**gen(), "x": 1}, "x", "unknown"),
        ({**gen(), "embed": {}}, "", "not both"),
        ({"custom_id": "a", "generate": "hi"}, "generate", "must be an object"),
        (gen(foo=1), "generate.foo", "unknown field"),
        (gen(options={"temperature": "hot"}), "generate.options.temperature", "float"),
        (
            gen(prompt=None, messages=[{"role": "user", "x": 1}]),
            "generate.messages[0].x",
            "unknown",
        ),
        (gen(options={"seed": -1}), "generate.options.seed", "out of range"),
        (gen(model=""), "generate.model", "required"),
        (
            gen(prompt=None, messages=[{**USER, "role": "bot"}]),
            "generate.messages[0].role",
            "one of",
        ),
        (
            {"custom_id": "a", "embed": {"model": MODEL, "inputs": []}},
            "embed.inputs",
            "at least one",
        ),
        ({**chat(), "method": "GET"}, "method", '"POST"'),
        (chat(url="/v1/responses"), "url", "must be one of"),
        ({**chat(), "body": []}, "body", "must be an object"),
        ({**chat(), "extra": 1}, "extra", "unknown field"),
        (chat(messages=[]), "body.messages", "at least one message"),
        (chat(messages="hi"), "body.messages", "a list"),
        (chat(messages=[{**USER, "role": "tool"}]), "body.messages[0].role", "must be one of"),
        (
            chat(messages=[{**USER, "content": [{"type": "image_url"}]}]),
            "body.messages[0].content[0]",
            "text",
        ),
        (
            chat(messages=[{**USER, "tool_calls": []}]),
            "body.messages[0].tool_calls",
            "not supported",
        ),
        (chat(model=3), "body.model", "a string"),
        (chat(model=None), "body.model", "required"),
        (chat(max_tokens="8"), "body.max_tokens", "an integer"),
        (chat(max_tokens=True), "body.max_tokens", "an integer"),
        (chat(max_tokens=0), "body.max_tokens", "must be 1 to"),
        (chat(max_completion_tokens=99999), "body.max_completion_tokens", "must be 1 to"),
        (chat(max_tokens=8, max_completion_tokens=9), "body.max_tokens", "differs"),
        (chat(temperature=3), "body.temperature", "must be 0 (greedy) or in"),
        (chat(top_p=0), "body.top_p", "must be in"),
        (chat(seed=-1), "body.seed", "must be 0 to"),
        (chat(stop=["a", 1]), "body.stop[1]", "must be a string"),
        (chat(stop=["x"] * 9), "body.stop", "at most 8"),
        (chat(n=2), "body.n", "only 1"),
        (chat(stream=True), "body.stream", "only false"),
        (chat(logprobs=True), "body.logprobs", "not supported"),
        (completion(prompt=["a", "b"]), "body.prompt", "one prompt"),
        (completion(), "body.prompt", "required"),
        (embeddings(input=None), "body.input", "required"),
        (embeddings(input=[[1, 2]]), "body.input[0]", "token arrays"),
        (embeddings(input=["", "x"]), "body.input[0]", "must not be empty"),
        (embeddings(dimensions=8), "body.dimensions", "not supported"),
        (embeddings(encoding_format="base64"), "body.encoding_format", "float"),
    ],
)
def test_each_malformed_line_names_its_line_and_field(line: Any, field: str, message: str) -> None:
    """A malformed line is reported with its number and the field at fault, named as in the
    line, after a good line (so numbers are not all 1)."""
    text = line if isinstance(line, str) else json.dumps(line)
    found = problems(json.dumps(chat("good")), text)
    assert any(n == 2 and f == field and message in m for n, f, m in found), found
    assert all(n == 2 for n, _, _ in found)


def test_every_problem_of_every_line_is_collected() -> None:
    """Parsing does not stop at the first problem: each bad line reports all its problems,
    and the good lines are kept in order."""
    lines = [
        chat("a"),
        chat("b", temperature=5, stop=[1], logprobs=True),
        chat("c"),
        "{oops",
        chat("d", messages=[{"role": "tool", "content": "x"}], max_tokens=0),
    ]
    parsed = parse_job_lines(json.dumps(x) if isinstance(x, dict) else x for x in lines)
    assert [line.custom_id for line in parsed.lines] == ["a", "c"]
    assert sorted((e.line_number, e.field) for e in parsed.errors) == [
        (2, "body.logprobs"),
        (2, "body.stop[0]"),
        (2, "body.temperature"),
        (4, ""),
        (5, "body.max_tokens"),
        (5, "body.messages[0].role"),
    ]


def test_a_repeated_custom_id_is_an_error_on_its_second_line() -> None:
    """custom_id is unique within a job: the second use names the first line."""
    found = problems(chat("a"), chat("b"), chat("a"))
    assert found == [(3, "custom_id", "'a' repeats line 1")]


def test_a_line_too_big_for_a_chunk_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A line that cannot fit in a chunk on its own is malformed (and says its size). The
    contract's limits keep a valid line under 4 MB today, so the bound is lowered here."""
    assert job_lines.MAX_LINE_BYTES < job_lines.MAX_CHUNK_BYTES
    monkeypatch.setattr(job_lines, "MAX_LINE_BYTES", 1000)
    line = generate_line("big", MODEL, "x" * 2000)
    [error] = parse_job_lines([generate_line("small", MODEL, "x"), line]).errors
    assert error.line_number == 2
    assert "bytes serialized" in error.message


def test_check_raises_every_error_and_refuses_an_empty_job() -> None:
    """``check()`` raises JobLinesError carrying every JobLineError; no lines at all is a
    ValueError; a lone string is refused (it is not a list of lines)."""
    with pytest.raises(JobLinesError) as caught:
        parse_job_lines([chat("a"), "{", chat("b", n=3)]).check()
    assert [e.line_number for e in caught.value.errors] == [2, 3]
    assert isinstance(caught.value.errors[0], JobLineError)
    assert "line 2" in str(caught.value)
    with pytest.raises(ValueError, match="at least one line"):
        parse_job_lines(["", "  "]).check()
    with pytest.raises(TypeError):
        parse_job_lines("batch.jsonl")


def test_job_line_error_reads_as_line_field_message() -> None:
    assert str(JobLineError(3, "body.model", "required")) == "line 3: body.model: required"
    assert str(JobLineError(4, "", "not JSON")) == "line 4: not JSON"


# -- chunks of a SubmitJob stream --------------------------------------------------------


def lines_of(n: int, prompt_chars: int = 10) -> list[jobs_pb2.JobLine]:
    return [generate_line(f"id-{i}", MODEL, "p" * prompt_chars) for i in range(n)]


def test_chunks_hold_at_most_the_line_count_in_order() -> None:
    """2,500 lines in chunks of 1,000: 1,000, 1,000, 500, in the order given."""
    lines = lines_of(2500)
    chunks = list(job_chunks(lines, max_lines=1000))
    assert [len(c.lines) for c in chunks] == [1000, 1000, 500]
    assert [line for c in chunks for line in c.lines] == lines


def test_chunks_stay_under_the_byte_limit() -> None:
    """Each chunk's SubmitJobRequest serializes to at most max_bytes, even when that cuts
    chunks short of the line count; every line is sent once, in order."""
    lines = lines_of(300, prompt_chars=900)
    limit = 50_000
    chunks = list(job_chunks(lines, max_lines=1000, max_bytes=limit))
    sizes = [jobs_pb2.SubmitJobRequest(lines=c).ByteSize() for c in chunks]
    assert len(chunks) > 1
    assert max(sizes) <= limit
    assert min(sizes[:-1]) > limit - 1000  # filled, not cut early
    assert [line for c in chunks for line in c.lines] == lines


def test_a_line_bigger_than_the_byte_limit_goes_alone() -> None:
    lines = [*lines_of(2), *lines_of(1, prompt_chars=5000), *lines_of(2)]
    chunks = list(job_chunks(lines, max_bytes=2000))
    assert [len(c.lines) for c in chunks] == [2, 1, 2]


def test_submit_stream_is_a_header_then_chunks() -> None:
    """The header carries the key, the window rounded up to seconds, the class, the labels
    and the line count; the chunks follow."""
    requests = submit_job_requests(
        lines_of(5),
        idempotency_key="k-1",
        completion_window_s=90.2,
        workload_class=WorkloadClass.BATCH,
        labels={"team": "search"},
        chunk_lines=2,
    )
    assert [r.WhichOneof("part") for r in requests] == ["header", "lines", "lines", "lines"]
    header = requests[0].header
    assert header.kind == jobs_pb2.JOB_KIND_BATCH
    assert (header.idempotency_key, header.completion_window_seconds) == ("k-1", 91)
    assert header.workload_class == common_pb2.WORKLOAD_CLASS_BATCH
    assert (header.line_count, dict(header.labels)) == (5, {"team": "search"})
    assert [len(r.lines.lines) for r in requests[1:]] == [2, 2, 1]
    with pytest.raises(ValueError, match="positive"):
        submit_job_requests(
            lines_of(1),
            idempotency_key="k",
            completion_window_s=0,
            workload_class=WorkloadClass.BATCH,
            labels=None,
            chunk_lines=2,
        )


# -- results as JSON lines ---------------------------------------------------------------


def test_result_records_are_openai_like() -> None:
    """A result line is custom_id plus either the response or the error (the other null)."""
    answer = jobs_pb2.JobResult(
        custom_id="a",
        line_number=1,
        generate=jobs_pb2.GenerateResult(
            text="Hello",
            finish_reason=common_pb2.FINISH_REASON_EOS,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2),
            model=MODEL,
        ),
    )
    assert result_record(answer) == {
        "custom_id": "a",
        "line_number": 1,
        "response": {
            "model": MODEL,
            "text": "Hello",
            "finish_reason": "eos",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        },
        "error": None,
    }
    vectors = jobs_pb2.JobResult(
        custom_id="e",
        embed=inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=[0.5, 0.25])], dimensions=2
        ),
    )
    assert result_record(vectors)["response"]["embeddings"] == [[0.5, 0.25]]
    failed = jobs_pb2.JobResult(
        custom_id="b",
        error=jobs_pb2.LineError(code=3, reason="INVALID_ARGUMENT", message="line 2: model"),
    )
    record = result_record(failed)
    assert record["response"] is None
    assert record["error"] == {
        "code": "INVALID_ARGUMENT",
        "reason": "INVALID_ARGUMENT",
        "message": "line 2: model",
    }
    assert json.loads(json.dumps(record)) == record
