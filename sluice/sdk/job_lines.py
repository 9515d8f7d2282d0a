"""The lines of a batch job, from what users have, and their results as JSON.

:func:`parse_job_lines` reads ``JobLine`` messages, dicts, or JSON text (a JSONL file's lines:
pass the open file), each dict or JSON line in one of two formats, told apart per line:

- **Sluice's own**: ``custom_id`` and either ``generate`` (a ``GenerateRequest``) or ``embed``
  (an ``EmbedRequest``), in protobuf's JSON mapping (field names as in the ``.proto`` files or
  in lowerCamelCase; ``google.protobuf.json_format``)::

      {"custom_id": "q1", "generate": {"model": "smollm2-135m-instruct",
       "messages": [{"role": "user", "content": "Hi"}], "options": {"max_new_tokens": 64}}}
      {"custom_id": "e1", "embed": {"model": "all-minilm-l6-v2", "inputs": ["a cat"]}}

  A line's own ``workload_class`` is ignored: the job's class applies.
- **OpenAI's batch format**: ``custom_id``, ``method``, ``url``, ``body``
  (:mod:`sluice.sdk.openai_lines` says which fields are read).

Every problem of every line is collected (a :class:`JobLineError` each, with the line number
and the field as named in the line), not only the first: malformed JSON, a missing or repeated
``custom_id``, a wrong type, an unknown field, and the contract limits of :mod:`sluice.limits`
(a model's own, tighter limits are the server's to check). :func:`job_chunks` cuts the lines
into the chunks a ``SubmitJob`` stream sends; :func:`result_record` is a result as one line
of a results file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from sluice import limits
from sluice.sdk.openai_lines import LINE_KEYS as OPENAI_KEYS
from sluice.sdk.openai_lines import Problems, openai_request
from sluice.v1 import common_pb2, inference_pb2, jobs_pb2

JobLineInput = jobs_pb2.JobLine | Mapping[str, Any] | str
"""One line as :func:`parse_job_lines` takes it: a message, a dict, or a JSON text."""

MAX_CHUNK_LINES = 1000
"""Most lines in one chunk of a ``SubmitJob`` stream."""
MAX_CHUNK_BYTES = 4 * 1024 * 1024
"""Most bytes of one serialized chunk (``SubmitJobRequest``): gRPC's default message limit,
so a chunk passes any proxy on the way (the scheduler itself takes up to 16 MiB)."""
MAX_LINE_BYTES = MAX_CHUNK_BYTES - 16
"""Most bytes of one serialized line: it must fit a chunk alone (16 bytes of framing)."""
SLUICE_KEYS = frozenset({"custom_id", "generate", "embed"})
"""The keys of a line in Sluice's own format."""


@dataclass(frozen=True, slots=True)
class JobLineError:
    """One thing wrong with one line of a job."""

    line_number: int
    """The line's position, from 1 (in a file: its line number, blank lines counted)."""
    field: str
    """The field at fault as named in the line (``body.messages[0].role``); "" for the
    whole line."""
    message: str
    """What is wrong."""

    def __str__(self) -> str:
        field = f"{self.field}: " if self.field else ""
        return f"line {self.line_number}: {field}{self.message}"


class JobLinesError(ValueError):
    """Some lines of a job are malformed; ``errors`` lists every problem of every line.
    Nothing was submitted."""

    SHOWN = 5

    def __init__(self, errors: Sequence[JobLineError]) -> None:
        self.errors = list(errors)
        lines = len({e.line_number for e in self.errors})
        shown = "; ".join(str(e) for e in self.errors[: self.SHOWN])
        hidden = len(self.errors) - self.SHOWN
        more = f"; and {hidden} more" if hidden > 0 else ""
        super().__init__(f"{lines} malformed job line(s): {shown}{more}")


@dataclass(frozen=True)
class ParsedLines:
    """The outcome of :func:`parse_job_lines`: the lines that are well formed, in order, and
    every problem of the others."""

    lines: list[jobs_pb2.JobLine]
    errors: list[JobLineError]

    def check(self) -> list[jobs_pb2.JobLine]:
        """The lines; raises :class:`JobLinesError` when any line is malformed, and
        ``ValueError`` when there is none at all."""
        if self.errors:
            raise JobLinesError(self.errors)
        if not self.lines:
            raise ValueError("a job needs at least one line")
        return self.lines


def parse_job_lines(items: Iterable[JobLineInput]) -> ParsedLines:
    """Read a job's lines, collecting every problem of every line.

    ``items`` holds ``JobLine`` messages, dicts in either format, or JSON texts (an open JSONL
    file works as it is: blank lines are skipped but counted, so numbers match the file's).
    Line numbers count from 1. A ``custom_id`` used twice is an error on its second line.
    """
    if isinstance(items, str | bytes):
        raise TypeError("pass the lines (e.g. an open JSONL file), not one string")
    lines: list[jobs_pb2.JobLine] = []
    errors: list[JobLineError] = []
    first_seen: dict[str, int] = {}
    for number, item in enumerate(items, start=1):
        if isinstance(item, str) and not item.strip():
            continue
        line, problems, custom_id = _read(item)
        if custom_id in first_seen:
            problems.append(("custom_id", f"{custom_id!r} repeats line {first_seen[custom_id]}"))
        elif custom_id:
            first_seen[custom_id] = number
        if line is not None and not problems and line.ByteSize() > MAX_LINE_BYTES:
            problems.append(("", f"{line.ByteSize()} bytes serialized, at most {MAX_LINE_BYTES}"))
        if problems:
            errors.extend(JobLineError(number, field, why) for field, why in problems)
        elif line is not None:
            lines.append(line)
    return ParsedLines(lines, errors)


def _read(item: JobLineInput) -> tuple[jobs_pb2.JobLine | None, Problems, str]:
    """One line, its problems and its custom_id ("" when it has none)."""
    value: object = item
    if isinstance(item, str):
        try:
            value = json.loads(item)
        except json.JSONDecodeError as exc:
            return None, [("", f"not JSON: {exc.msg} at column {exc.colno}")], ""
    line, problems = _parse(value)
    return line, problems, _custom_id(value)


def _custom_id(item: object) -> str:
    if isinstance(item, jobs_pb2.JobLine):
        return item.custom_id
    value = item.get("custom_id") if isinstance(item, Mapping) else None
    return value if isinstance(value, str) else ""


def _parse(item: object) -> tuple[jobs_pb2.JobLine | None, Problems]:
    """One line (a message, or a decoded JSON value) and its problems (the line is None
    when it has any)."""
    if isinstance(item, jobs_pb2.JobLine):
        return _checked_message(item)
    if not isinstance(item, Mapping):
        return None, [("", "must be a JSON object")]
    problems: Problems = []
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        problems.append(("custom_id", "required: a non-empty string"))
    request: inference_pb2.GenerateRequest | inference_pb2.EmbedRequest | None
    if set(item) & OPENAI_KEYS - {"custom_id"}:
        request, more = openai_request(item)
    elif set(item) & SLUICE_KEYS - {"custom_id"}:
        request, more = _sluice_request(item)
    else:
        request, more = None, [("", _NEITHER)]
    problems.extend(more)
    if problems or request is None:
        return None, problems
    return _line(str(custom_id), request), []


_NEITHER = (
    "neither a Sluice line (custom_id and generate or embed) nor an OpenAI batch line "
    "(custom_id, method, url, body)"
)


def _line(
    custom_id: str, request: inference_pb2.GenerateRequest | inference_pb2.EmbedRequest
) -> jobs_pb2.JobLine:
    if isinstance(request, inference_pb2.GenerateRequest):
        return jobs_pb2.JobLine(custom_id=custom_id, generate=request)
    return jobs_pb2.JobLine(custom_id=custom_id, embed=request)


def _checked_message(line: jobs_pb2.JobLine) -> tuple[jobs_pb2.JobLine | None, Problems]:
    problems: Problems = []
    if not line.custom_id:
        problems.append(("custom_id", "required: a non-empty string"))
    body = line.WhichOneof("body")
    if body is None:
        problems.append(("", "set generate or embed"))
    else:
        problems.extend(_limit_problems(body, getattr(line, body)))
    return (None, problems) if problems else (line, [])


def _limit_problems(
    prefix: str, request: inference_pb2.GenerateRequest | inference_pb2.EmbedRequest
) -> Problems:
    """The contract limits ``request`` breaks (its workload class aside: the job's applies),
    named under ``prefix``."""
    if isinstance(request, inference_pb2.GenerateRequest):
        request = _classless(request)
        broken = limits.generate_violations(request)
    else:
        embed = inference_pb2.EmbedRequest()
        embed.CopyFrom(request)
        embed.ClearField("workload_class")
        broken = limits.embed_violations(embed)
    return [(f"{prefix}.{field}", why) for field, why in broken]


def _classless(request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateRequest:
    if request.workload_class == common_pb2.WORKLOAD_CLASS_UNSPECIFIED:
        return request
    copy = inference_pb2.GenerateRequest()
    copy.CopyFrom(request)
    copy.ClearField("workload_class")
    return copy


def _sluice_request(
    item: Mapping[str, Any],
) -> tuple[inference_pb2.GenerateRequest | inference_pb2.EmbedRequest | None, Problems]:
    problems: Problems = [(key, "unknown field") for key in sorted(set(item) - SLUICE_KEYS)]
    if "generate" in item and "embed" in item:
        return None, [*problems, ("", "set generate or embed, not both")]
    key = "generate" if "generate" in item else "embed"
    value = item[key]
    if not isinstance(value, Mapping):
        return None, [*problems, (key, "must be an object")]
    request = inference_pb2.GenerateRequest() if key == "generate" else inference_pb2.EmbedRequest()
    try:
        json_format.ParseDict(dict(value), request)
    except json_format.ParseError as exc:
        return None, [*problems, _json_problem(key, str(exc))]
    problems.extend(_limit_problems(key, request))
    return (None, problems) if problems else (request, [])


_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field: ")
_AT_PATH = re.compile(r' at "?\w+((?:\.\w+|\[\d+\])*)\.?"?\.*$')
_NO_FIELD = re.compile(r'has no field named "([^"]+)"')


def _json_problem(prefix: str, error: str) -> tuple[str, str]:
    """``json_format``'s error as ``(field, message)``: it names the field in nested
    ``Failed to parse X field:`` prefixes and an ``at Type.path`` suffix."""
    text = error.split("\n", 1)[0]
    path: list[str] = []
    while match := _FAILED_FIELD.match(text):
        path.append(match.group(1))
        text = text[match.end() :]
    field = ".".join(path)
    if at := _AT_PATH.search(text):
        found = at.group(1).lstrip(".")
        field = found if len(found) > len(field) else field
        text = text[: at.start()]
    if unknown := _NO_FIELD.search(text):
        field = f"{field}.{unknown.group(1)}" if field else unknown.group(1)
        text = "unknown field"
    return (f"{prefix}.{field}" if field else prefix), text.rstrip(".") or "malformed"


def job_chunks(
    lines: Iterable[jobs_pb2.JobLine],
    *,
    max_lines: int = MAX_CHUNK_LINES,
    max_bytes: int = MAX_CHUNK_BYTES,
) -> Iterator[jobs_pb2.JobLines]:
    """``lines`` in order, in chunks of at most ``max_lines`` lines whose
    ``SubmitJobRequest`` serializes to at most ``max_bytes`` (a line bigger than that alone
    goes in a chunk of its own)."""
    if max_lines < 1:
        raise ValueError("max_lines must be at least 1")
    budget = max_bytes - 6  # the chunk's own tag and length in SubmitJobRequest
    chunk: list[jobs_pb2.JobLine] = []
    size = 0
    for line in lines:
        n = line.ByteSize()
        entry = 1 + _varint_bytes(n) + n
        if chunk and (len(chunk) == max_lines or size + entry > budget):
            yield jobs_pb2.JobLines(lines=chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += entry
    if chunk:
        yield jobs_pb2.JobLines(lines=chunk)


def _varint_bytes(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_FINISH = {
    common_pb2.FINISH_REASON_EOS: "eos",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


def result_record(result: jobs_pb2.JobResult) -> dict[str, Any]:
    """A result as one line of a results file, shaped like OpenAI's batch output::

        {"custom_id": "q1", "line_number": 1, "error": null,
         "response": {"model": "...", "text": "...", "finish_reason": "eos",
                      "usage": {"prompt_tokens": 9, "completion_tokens": 12}}}

    An embedding's ``response`` is ``{"embeddings": [[...], ...], "dimensions": 384, "usage":
    {...}}``; a fine-tune's step (``custom_id`` ``step-00000012``) is ``{"step": 12, "loss":
    ..., "learning_rate": ..., "tokens": ..., "at_unix_ms": ...}``; a failed line has
    ``"response": null`` and ``"error": {"code": "INVALID_ARGUMENT", "reason": "...",
    "message": "..."}``.
    """
    record: dict[str, Any] = {
        "custom_id": result.custom_id,
        "line_number": result.line_number,
        "response": None,
        "error": None,
    }
    outcome = result.WhichOneof("outcome")
    if outcome == "generate":
        g = result.generate
        record["response"] = {
            "model": g.model,
            "text": g.text,
            "finish_reason": _FINISH.get(g.finish_reason),
            "usage": _usage(g.usage),
        }
    elif outcome == "step":
        step = result.step
        record["response"] = {
            "step": step.step,
            "loss": step.loss,
            "learning_rate": step.learning_rate,
            "tokens": step.tokens,
            "at_unix_ms": step.at_unix_ms,
        }
    elif outcome == "embed":
        e = result.embed
        record["response"] = {
            "embeddings": [list(v.values) for v in e.embeddings],
            "dimensions": e.dimensions,
            "usage": _usage(e.usage),
        }
    else:
        error = result.error
        record["error"] = {
            "code": _CODE_NAMES.get(error.code, str(error.code)),
            "reason": error.reason,
            "message": error.message or ("no result" if outcome is None else ""),
        }
    return record


def _usage(usage: common_pb2.Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
