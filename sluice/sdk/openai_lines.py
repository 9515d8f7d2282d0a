"""OpenAI batch lines as Sluice requests: :func:`openai_request`.

A line of OpenAI's Batch API input file::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "smollm2-135m-instruct", "max_tokens": 64,
              "messages": [{"role": "user", "content": "Hi"}]}}

``url`` picks the request: ``/v1/chat/completions`` (``messages``) and ``/v1/completions`` (one
``prompt``) become a ``GenerateRequest``, ``/v1/embeddings`` (``input``: a text or a list of
texts) an ``EmbedRequest``. Generation fields: ``model``, ``max_tokens`` or
``max_completion_tokens`` (``max_new_tokens``), ``temperature``, ``top_p``, ``seed`` (at least
0), ``stop`` (a string or a list). A chat message's ``content`` is a string or a list of text
parts; its role is ``system``, ``user`` or ``assistant`` (``developer`` is read as
``system``); its ``name`` is ignored. ``n`` may only be 1 and ``stream`` only false; ``user``,
``metadata``, ``store`` and ``service_tier`` are ignored (they do not change the answer), and
an embedding's ``encoding_format`` may only be ``"float"``. Any other body field is refused
rather than silently dropped, since it would change the answer OpenAI gives.

Each problem is a ``(field, message)`` pair named as in the line (``body.messages[1].role``),
including the contract limits of :mod:`sluice.limits` the request breaks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sluice import limits
from sluice.v1 import common_pb2, inference_pb2

Problems = list[tuple[str, str]]
"""``(field, message)`` pairs, one per thing wrong with a line."""
Request = inference_pb2.GenerateRequest | inference_pb2.EmbedRequest

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL)
LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
"""The keys of an OpenAI batch line."""
IGNORED_BODY_KEYS = frozenset({"user", "metadata", "store", "service_tier"})
"""Body fields accepted and ignored: they do not change the answer."""
ROLE_ALIASES = {"developer": "system"}
"""OpenAI's newer name for the system role."""
MAX_SEED = 2**64 - 1


class _Body:
    """Typed reads of a request body; remembers which keys were read, to refuse the rest."""

    def __init__(self, body: Mapping[str, Any], problems: Problems) -> None:
        self.body = body
        self.problems = problems
        self.read: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], what: str) -> Any:
        """``body[key]`` when it is a ``kind`` (never a bool unless asked); None when absent
        or null; a problem and None when of another type."""
        self.read.add(key)
        value = self.body.get(key)
        if value is None:
            return None
        wants_bool = kind is bool or (isinstance(kind, tuple) and bool in kind)
        if not isinstance(value, kind) or (isinstance(value, bool) and not wants_bool):
            self.problems.append((f"body.{key}", f"must be {what}"))
            return None
        return value

    def only(self, key: str, allowed: object, what: str) -> None:
        """``body[key]`` may be absent or ``allowed``, nothing else."""
        self.read.add(key)
        if key in self.body and self.body[key] is not None and self.body[key] != allowed:
            self.problems.append((f"body.{key}", what))

    def refuse_unread(self) -> None:
        for key in sorted(set(self.body) - self.read - IGNORED_BODY_KEYS):
            self.problems.append((f"body.{key}", "not supported by Sluice"))


def openai_request(line: Mapping[str, Any]) -> tuple[Request | None, Problems]:
    """The request of an OpenAI batch line (its ``custom_id`` aside) and every problem found
    in it; the request is None when there is any problem."""
    problems: Problems = [
        (key, "unknown field of an OpenAI batch line") for key in sorted(set(line) - LINE_KEYS)
    ]
    if line.get("method") != "POST":
        problems.append(("method", 'must be "POST"'))
    url, body = line.get("url"), line.get("body")
    if url not in URLS:
        problems.append(("url", f"must be one of {', '.join(URLS)}"))
    if not isinstance(body, Mapping):
        problems.append(("body", "must be an object"))
        return None, problems
    reader = _Body(body, problems)
    if url == EMBEDDINGS_URL:
        return _checked(_embed(reader), problems, _EMBED_FIELDS), problems
    if url in (CHAT_URL, COMPLETIONS_URL):
        request, fields = _generate(reader, chat=url == CHAT_URL)
        return _checked(request, problems, fields), problems
    return None, problems


def _checked(request: Request | None, problems: Problems, fields: dict[str, str]) -> Request | None:
    """``request`` unless anything is wrong with it. The contract limits it breaks are added
    to ``problems``, named as in the line, except on fields already found wrong."""
    if request is None:
        return None
    if isinstance(request, inference_pb2.GenerateRequest):
        broken = limits.generate_violations(request)
    else:
        broken = limits.embed_violations(request)
    reported = [field for field, _ in problems]
    for field, why in broken:
        name = _rename(field, fields)
        if not any(_overlap(name, other) for other in reported):
            problems.append((name, why))
    return None if problems else request


def _overlap(a: str, b: str) -> bool:
    """Whether two field names are the same field, or one is inside the other."""
    short, long = sorted((a, b), key=len)
    return long == short or long.startswith((short + ".", short + "["))


def _rename(field: str, fields: dict[str, str]) -> str:
    """A request field's name in the OpenAI line (``options.stop[1]`` → ``body.stop[1]``)."""
    for name in sorted(fields, key=len, reverse=True):
        if field == name or field.startswith((name + "[", name + ".")):
            return fields[name] + field[len(name) :]
    return f"body.{field}"


_EMBED_FIELDS = {"model": "body.model", "inputs": "body.input"}


def _embed(body: _Body) -> inference_pb2.EmbedRequest | None:
    model = body.get("model", str, "a string")
    raw = body.get("input", (str, list), "a string or a list of strings")
    body.only("encoding_format", "float", 'only "float" is supported')
    body.refuse_unread()
    if raw is None:
        body.problems.append(("body.input", "required"))
        return None
    texts = [raw] if isinstance(raw, str) else raw
    wrong = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    for i in wrong:
        body.problems.append((f"body.input[{i}]", "must be a string (token arrays are not)"))
    return None if wrong else inference_pb2.EmbedRequest(model=model or "", inputs=texts)


def _generate(body: _Body, *, chat: bool) -> tuple[inference_pb2.GenerateRequest, dict[str, str]]:
    """A GenerateRequest from a chat or completions body (what could be read of it), with
    the names its fields have in that body."""
    model = body.get("model", str, "a string")
    request = inference_pb2.GenerateRequest(model=model or "")
    if chat:
        _read_messages(body, request)
    else:
        _read_prompt(body, request)
    tokens_key = _read_options(body, request.options)
    body.only("n", 1, "only 1 is supported")
    body.only("stream", False, "only false is supported")
    body.refuse_unread()
    text = "body.messages" if chat else "body.prompt"
    fields = {
        "model": "body.model",
        "messages": "body.messages",
        "prompt": text,
        "options.max_new_tokens": f"body.{tokens_key}",
        "options.temperature": "body.temperature",
        "options.top_p": "body.top_p",
        "options.stop": "body.stop",
    }
    return request, fields


def _read_messages(body: _Body, request: inference_pb2.GenerateRequest) -> None:
    messages = body.get("messages", list, "a list of messages")
    if not messages:
        body.problems.append(("body.messages", "required: at least one message"))
        return
    for i, message in enumerate(messages):
        where = f"body.messages[{i}]"
        if not isinstance(message, Mapping):
            body.problems.append((where, "must be an object with role and content"))
            continue
        for key in sorted(set(message) - {"role", "content", "name"}):
            body.problems.append((f"{where}.{key}", "not supported by Sluice"))
        role = message.get("role")
        if not isinstance(role, str):
            body.problems.append((f"{where}.role", "must be a string"))
            continue
        content = _content(message.get("content"), f"{where}.content", body.problems)
        if content is not None:
            role = ROLE_ALIASES.get(role, role)
            request.messages.append(common_pb2.ChatMessage(role=role, content=content))


def _content(value: object, where: str, problems: Problems) -> str | None:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        problems.append((where, "must be a string or a list of text parts"))
        return None
    texts: list[str] = []
    for i, part in enumerate(value):
        if (
            isinstance(part, Mapping)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
        else:
            problems.append((f"{where}[{i}]", 'only {"type": "text", "text": ...} parts'))
    return "".join(texts) if len(texts) == len(value) else None


def _read_prompt(body: _Body, request: inference_pb2.GenerateRequest) -> None:
    prompt = body.get("prompt", (str, list), "a string")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        else:
            body.problems.append(("body.prompt", "one prompt (a string) per line"))
            return
    if prompt is None:
        body.problems.append(("body.prompt", "required"))
        return
    request.prompt = prompt


def _read_options(body: _Body, options: common_pb2.GenerationOptions) -> str:
    """Sampling and length options into ``options``; returns the body's name for the token
    limit (``max_tokens`` unless only ``max_completion_tokens`` is given)."""
    tokens_key = "max_tokens"
    max_tokens = body.get("max_tokens", int, "an integer")
    max_completion = body.get("max_completion_tokens", int, "an integer")
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        body.problems.append(("body.max_tokens", "differs from max_completion_tokens"))
    elif max_completion is not None:
        max_tokens, tokens_key = max_completion, "max_completion_tokens"
    if max_tokens is not None:
        _set(options, "max_new_tokens", max_tokens, f"body.{tokens_key}", body.problems)
    setters: list[tuple[str, str, Callable[[Any], object]]] = [
        ("temperature", "temperature", float),
        ("top_p", "top_p", float),
    ]
    for key, field, convert in setters:
        value = body.get(key, (int, float), "a number")
        if value is not None:
            _set(options, field, convert(value), f"body.{key}", body.problems)
    seed = body.get("seed", int, "an integer")
    if seed is not None:
        if 0 <= seed <= MAX_SEED:
            options.seed = seed
        else:
            body.problems.append(("body.seed", f"must be 0 to {MAX_SEED}"))
    _read_stop(body, options)
    return tokens_key


def _set(
    options: common_pb2.GenerationOptions, field: str, value: object, where: str, problems: Problems
) -> None:
    """Set a numeric option; a value its protobuf type cannot hold is a problem."""
    try:
        setattr(options, field, value)
    except (ValueError, TypeError) as exc:
        problems.append((where, f"out of range: {exc}"))


def _read_stop(body: _Body, options: common_pb2.GenerationOptions) -> None:
    stop = body.get("stop", (str, list), "a string or a list of strings")
    if isinstance(stop, str):
        options.stop.append(stop)
    elif isinstance(stop, list):
        for i, item in enumerate(stop):
            if isinstance(item, str):
                options.stop.append(item)
            else:
                body.problems.append((f"body.stop[{i}]", "must be a string"))
