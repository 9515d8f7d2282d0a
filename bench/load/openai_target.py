"""The OpenAI-compatible target: one streamed ``POST /v1/completions`` per request, as vLLM's own
server answers it (``make bench-vllm`` drives bare vLLM through it; ``--target openai``).

No HTTP library: each request has its own connection over asyncio streams, and the response
goes through small incremental parsers that are tested on bytes alone:

* :class:`HttpResponseParser`: an HTTP/1.1 response's head, then its body (chunked, sized by
  ``Content-Length``, or ended by the connection's close);
* :class:`SseParser`: server-sent events (an event's ``data:`` lines, up to a blank line);
* :class:`CompletionStream`: each event of a streamed completion as a
  ``sluice.v1.GenerateChunk``, so :func:`bench.load.run.run_load` records an OpenAI stream
  exactly as a Sluice one: a chunk's ``token_ids`` (vLLM's ``return_token_ids``) time the first
  and each later token, and one last chunk carries the finish reason and the usage
  (``stream_options.include_usage``), given at ``data: [DONE]`` or at the connection's end.

The request is what Sluice gets (:func:`completion_body`): the same prompt text, which the
server tokenizes without special tokens as the Sluice node does (``add_special_tokens``
false), ``max_tokens`` the planned answer length and exactly that many tokens when the scenario
says ``ignore_eos`` (``ignore_eos``, and ``min_tokens`` equal to ``max_tokens``), the scenario's
temperature (0: greedy).

Failures become :class:`~bench.load.targets.TargetError` with the gRPC code names the run
already sorts by: HTTP 429 and 503 are refusals (``RESOURCE_EXHAUSTED``, ``Retry-After`` as the
retry delay), the request's own deadline passing is ``DEADLINE_EXCEEDED`` (it covers connecting
and every read; the connection is then closed, which makes vLLM abort the request), a
connection that fails is ``UNAVAILABLE``, an error event in the stream or a malformed response
``INTERNAL``, any other status ``HTTP_<status>``. Embed is ``UNIMPLEMENTED``: a server of a
generation model has no ``/v1/embeddings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.load.scenario import PlannedRequest, Scenario
from bench.load.targets import GenerationSettings, TargetError
from sluice.v1 import common_pb2, inference_pb2

COMPLETIONS_PATH = "/v1/completions"
REFUSAL_STATUSES = frozenset({429, 503})
"""Statuses read as the server saying no (or later): ``RESOURCE_EXHAUSTED``."""
_READ_SIZE = 64 * 1024
_MAX_HEAD_BYTES = 64 * 1024
_T = TypeVar("_T")


class HttpProtocolError(ValueError):
    """A response that does not parse as HTTP/1.1, or a connection closed before its end."""


@dataclass(frozen=True)
class HttpHead:
    """A response's status line and headers."""

    status: int
    reason: str
    headers: Mapping[str, str]
    """Lower-cased names; a repeated header's values joined with ``", "``."""


def parse_head(data: bytes) -> HttpHead:
    """The head of a response (status line and header lines, without the blank line)."""
    lines = data.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise HttpProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise HttpProtocolError(f"malformed header line: {line[:80]!r}")
        key, value = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return HttpHead(int(code), reason, headers)


class HttpResponseParser:
    """An HTTP/1.1 response fed in pieces as they arrive.

    :meth:`feed` returns the body bytes each piece completes (a chunked body decoded);
    :attr:`head` is set once the head is in, :attr:`complete` once the body has ended; a
    connection's close goes to :meth:`eof`. Malformed input raises :class:`HttpProtocolError`.
    """

    def __init__(self) -> None:
        self.head: HttpHead | None = None
        self.complete = False
        self._buffer = bytearray()
        self._framing = ""
        """``chunked``, ``length`` (``Content-Length``) or ``close`` (ends with the connection)."""
        self._remaining = 0
        """Bytes left of the current chunk, or of a sized body."""
        self._state = "size"
        """Of a chunked body: ``size`` line, chunk ``data``, its ``data_end`` CRLF, ``trailer``."""

    def feed(self, data: bytes) -> bytes:
        """Take ``data``; return the body bytes it completes."""
        self._buffer += data
        if self.complete or (self.head is None and not self._read_head()):
            return b""
        if self._framing == "chunked":
            return self._chunked()
        if self._framing == "length":
            body = bytes(self._buffer[: self._remaining])
            del self._buffer[: len(body)]
            self._remaining -= len(body)
            self.complete = self._remaining == 0
            return body
        body = bytes(self._buffer)
        self._buffer.clear()
        return body

    def eof(self) -> None:
        """The connection closed: a body the close delimits is complete; a response cut short
        raises :class:`HttpProtocolError`."""
        if self.head is None:
            raise HttpProtocolError("connection closed before the response head")
        if self._framing == "close":
            self.complete = True
        if not self.complete:
            raise HttpProtocolError("connection closed before the end of the response body")

    def _read_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD_BYTES:
                raise HttpProtocolError(f"response head longer than {_MAX_HEAD_BYTES} bytes")
            return False
        head = self.head = parse_head(bytes(self._buffer[:end]))
        del self._buffer[: end + 4]
        if "chunked" in head.headers.get("transfer-encoding", "").lower():
            self._framing = "chunked"
        elif head.status in (204, 304) or "content-length" in head.headers:
            length = head.headers.get("content-length", "0")
            if not length.isdigit():
                raise HttpProtocolError(f"bad Content-Length {length!r}")
            self._framing, self._remaining = "length", int(length)
            self.complete = self._remaining == 0
        else:
            self._framing = "close"
        return True

    def _chunked(self) -> bytes:
        out = bytearray()
        buffer = self._buffer
        while not self.complete:
            if self._state == "data":
                if not buffer:
                    break
                piece = bytes(buffer[: self._remaining])
                del buffer[: len(piece)]
                out += piece
                self._remaining -= len(piece)
                self._state = "data" if self._remaining else "data_end"
            elif self._state == "data_end":
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise HttpProtocolError("chunk data not followed by CRLF")
                del buffer[:2]
                self._state = "size"
            else:
                end = buffer.find(b"\r\n")
                if end < 0:
                    break
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if self._state == "trailer":
                    self.complete = not line  # trailer fields are skipped up to a blank line
                    continue
                size = line.split(b";", 1)[0].strip()
                try:
                    self._remaining = int(size, 16)
                except ValueError:
                    raise HttpProtocolError(f"bad chunk size {size[:20]!r}") from None
                if self._remaining < 0:
                    raise HttpProtocolError(f"bad chunk size {size[:20]!r}")
                self._state = "data" if self._remaining else "trailer"
        return bytes(out)


class SseParser:
    """Server-sent events fed in pieces: :meth:`feed` returns the ``data`` of every event the
    piece completes (its ``data:`` lines joined by newlines; an event ends at a blank line;
    comments and other fields are skipped). Lines end in LF or CRLF; a lone CR, which the format
    also allows, is not taken as a line end (OpenAI servers do not send it)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []

    def feed(self, data: bytes) -> list[str]:
        """Take ``data``; return the data of each event it completes, in order."""
        self._buffer += data
        events = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end]).removesuffix(b"\r").decode("utf-8", "replace")
            del self._buffer[: end + 1]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value.removeprefix(" "))
        return events


def finish_reason(reason: str, stop_reason: object) -> common_pb2.FinishReason:
    """An OpenAI finish reason as Sluice's, mapped as the vLLM node maps vLLM's
    (``inference_node.engine.vllm_mapping.finish_reason``): ``stop`` on a stop string is STOP,
    on EOS or a stop token EOS; ``length`` LENGTH; ``abort`` CANCELLED. Any other (vLLM's
    ``error``) is the server failing the request: ``TargetError`` ``INTERNAL``."""
    if reason == "length":
        return common_pb2.FINISH_REASON_LENGTH
    if reason == "stop":
        return (
            common_pb2.FINISH_REASON_STOP
            if isinstance(stop_reason, str)
            else common_pb2.FINISH_REASON_EOS
        )
    if reason == "abort":
        return common_pb2.FINISH_REASON_CANCELLED
    raise TargetError("INTERNAL", f"the stream finished with reason {reason!r}")


def _error_text(error: object) -> tuple[str, str]:
    """An error object's message and type (``{"message", "type"}``, else its text)."""
    if isinstance(error, dict):
        return str(error.get("message", error)), str(error.get("type", ""))
    return str(error), ""


def stream_error(error: object) -> TargetError:
    """An ``{"error": ...}`` event in the stream: ``INTERNAL``, or a refusal when its code is
    429 or 503."""
    message, kind = _error_text(error)
    code = error.get("code") if isinstance(error, dict) else None
    name = "RESOURCE_EXHAUSTED" if code in REFUSAL_STATUSES else "INTERNAL"
    return TargetError(name, f"error event in the stream: {message}", reason=kind)


def http_error(head: HttpHead, body: bytes) -> TargetError:
    """A response whose status is not 200: a refusal for 429 and 503 (with ``Retry-After`` in
    seconds as its retry delay), else ``HTTP_<status>``; the message is the body's error
    message when it is OpenAI's error JSON, else its start."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        message, kind = _error_text(parsed["error"])
    else:
        message, kind = body[:200].decode("utf-8", "replace").strip(), ""
    if head.status not in REFUSAL_STATUSES:
        return TargetError(f"HTTP_{head.status}", f"HTTP {head.status}: {message}", reason=kind)
    retry_after: float | None = None
    with contextlib.suppress(ValueError):  # absent, or an HTTP date: no delay the run can use
        retry_after = float(head.headers.get("retry-after", ""))
    return TargetError(
        "RESOURCE_EXHAUSTED",
        f"HTTP {head.status}: {message}",
        reason=kind,
        retry_after_s=retry_after,
    )


class CompletionStream:
    """A streamed completion's events as ``GenerateChunk`` messages (module doc)."""

    def __init__(self) -> None:
        self._sse = SseParser()
        self._finish: common_pb2.FinishReason | None = None
        self._usage = common_pb2.Usage()
        self.done = False
        """``data: [DONE]`` arrived."""
        self.ended = False
        """The last chunk (finish reason, usage) was given."""

    def feed(self, payload: bytes) -> list[inference_pb2.GenerateChunk]:
        """Take body bytes; return the chunks they complete (the last one at ``[DONE]``)."""
        chunks: list[inference_pb2.GenerateChunk] = []
        for data in self._sse.feed(payload):
            if data.strip() == "[DONE]":
                self.done = True
                chunks += self.finish()
            elif not self.ended:
                chunks += self._event(data)
        return chunks

    def finish(self) -> list[inference_pb2.GenerateChunk]:
        """The last chunk, once: the finish reason and the usage; nothing when no finish
        reason came (the run then records the stream as incomplete)."""
        if self.ended or self._finish is None:
            return []
        self.ended = True
        return [inference_pb2.GenerateChunk(finish_reason=self._finish, usage=self._usage)]

    def _event(self, data: str) -> list[inference_pb2.GenerateChunk]:
        try:
            event: Any = json.loads(data)
        except ValueError:
            raise TargetError("INTERNAL", f"stream event is not JSON: {data[:80]!r}") from None
        if not isinstance(event, dict):
            raise TargetError("INTERNAL", f"stream event is not an object: {data[:80]!r}")
        if "error" in event:
            raise stream_error(event["error"])
        chunks = []
        for choice in event.get("choices") or []:
            token_ids = [int(t) for t in choice.get("token_ids") or []]
            text = str(choice.get("text") or "")
            if token_ids or text:
                chunks.append(inference_pb2.GenerateChunk(text=text, token_ids=token_ids))
            if choice.get("finish_reason"):
                self._finish = finish_reason(choice["finish_reason"], choice.get("stop_reason"))
        usage = event.get("usage")
        if isinstance(usage, dict):
            self._usage = common_pb2.Usage(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
        return chunks


def completion_body(request: PlannedRequest, settings: GenerationSettings) -> dict[str, Any]:
    """The JSON body of ``request`` (module doc: the same prompt and lengths as Sluice's)."""
    body: dict[str, Any] = {
        "model": request.model or settings.model,
        "prompt": request.prompt,
        "max_tokens": request.max_new_tokens,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "add_special_tokens": False,
        "return_token_ids": True,
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = request.max_new_tokens
    return body


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` or ``http://host:port`` (IPv6 in brackets) → ``(host, port)``."""
    rest = endpoint.strip().removeprefix("http://").rstrip("/")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port.isdigit() or "/" in rest:
        raise ValueError(f"endpoint {endpoint!r}: expected host:port or http://host:port")
    return host.removeprefix("[").removesuffix("]"), int(port)


def encode_post(host: str, port: int, path: str, body: Mapping[str, Any]) -> bytes:
    """A ``POST`` of ``body`` as JSON, asking for an event stream, the connection closed after."""
    content = json.dumps(body, separators=(",", ":")).encode()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(content)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + content


class _Exchange:
    """One request on a connection of its own; every wait ends at ``deadline`` (loop time)."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        self._host, self._port, self._deadline = host, port, deadline
        self._parser = HttpResponseParser()
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._early = b""
        """Body bytes that came with the head."""

    async def send(self, message: bytes) -> HttpHead:
        """Connect, send ``message``, return the response's head."""
        connect = asyncio.open_connection(self._host, self._port)
        self._reader, writer = await self._bounded(connect)
        self._writer = writer
        writer.write(message)
        await self._bounded(writer.drain())
        while self._parser.head is None:
            self._early += await self._next()
        return self._parser.head

    async def body(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, until it is complete."""
        if self._early:
            yield self._early
        while not self._parser.complete:
            piece = await self._next()
            if piece:
                yield piece

    async def read_all(self) -> bytes:
        """The whole body."""
        return b"".join([piece async for piece in self.body()])

    def close(self) -> None:
        """Close the connection (the server aborts an unfinished request)."""
        if self._writer is not None:
            self._writer.close()

    async def _next(self) -> bytes:
        assert self._reader is not None
        data = await self._bounded(self._reader.read(_READ_SIZE))
        try:
            if data:
                return self._parser.feed(data)
            self._parser.eof()
        except HttpProtocolError as exc:
            raise TargetError("INTERNAL", f"malformed response: {exc}") from exc
        return b""

    async def _bounded(self, step: Awaitable[_T]) -> _T:
        try:
            async with asyncio.timeout_at(self._deadline):
                return await step
        except TimeoutError:  # before OSError: it is one
            raise TargetError("DEADLINE_EXCEEDED", "the request's deadline passed") from None
        except OSError as exc:
            raise TargetError("UNAVAILABLE", f"{type(exc).__name__}: {exc}") from exc


class OpenAITarget:
    """An OpenAI-compatible server (vLLM's own) through streamed completions."""

    name = "openai"

    def __init__(self, endpoint: str, settings: GenerationSettings) -> None:
        """``endpoint``: ``host:port`` or ``http://host:port``."""
        self._host, self._port = parse_endpoint(endpoint)
        self._settings = settings

    async def generate(self, request: PlannedRequest) -> AsyncIterator[inference_pb2.GenerateChunk]:
        """One streamed completion, within the request's deadline."""
        deadline = asyncio.get_running_loop().time() + request.timeout_s
        body = completion_body(request, self._settings)
        exchange = _Exchange(self._host, self._port, deadline)
        try:
            head = await exchange.send(encode_post(self._host, self._port, COMPLETIONS_PATH, body))
            if head.status != 200:
                raise http_error(head, await exchange.read_all())
            stream = CompletionStream()
            async for payload in exchange.body():
                for chunk in stream.feed(payload):
                    yield chunk
            for chunk in stream.finish():  # a body that ended without [DONE]
                yield chunk
        finally:
            exchange.close()

    async def embed(self, request: PlannedRequest) -> int:
        """Always ``UNIMPLEMENTED`` (module doc)."""
        raise TargetError("UNIMPLEMENTED", "an OpenAI completions server does not embed here")

    async def close(self) -> None:
        """Nothing to release: every request closes its own connection."""


def openai_target(scenario: Scenario, endpoint: str) -> OpenAITarget:
    """The target at ``endpoint`` with the scenario's generation settings (as
    :func:`bench.load.run.make_target` gives the other targets)."""
    settings = GenerationSettings(
        model=scenario.model,
        ignore_eos=scenario.ignore_eos,
        temperature=scenario.temperature,
        cache_bypass=scenario.cache_bypass,
    )
    return OpenAITarget(endpoint, settings)
