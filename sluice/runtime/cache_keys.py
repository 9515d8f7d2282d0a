"""Cache keys and cacheability, shared by the scheduler (whether to look up) and the cache
service (the keys): tenant + model + SHA-256 of the canonical request.

Only deterministic requests are cacheable: greedy (temperature unset or 0), or sampled with a
fixed seed. The canonical form is JSON with sorted keys of every field that changes the output
(never Python ``hash()``, which is salted per process), so equal requests give equal keys in
every replica and every run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote

from sluice.v1 import inference_pb2

KEY_PREFIX = "sluice:cache:v1"


def is_cacheable(request: inference_pb2.GenerateRequest) -> bool:
    """True when the request's output is a function of its fields alone."""
    if request.cache_bypass:
        return False
    options = request.options
    greedy = not options.HasField("temperature") or options.temperature == 0.0
    return greedy or options.HasField("seed")


def canonical_request(request: inference_pb2.GenerateRequest) -> dict[str, Any]:
    """The fields that decide the output, in a stable shape (absent options stay absent)."""
    options = request.options
    opts: dict[str, Any] = {
        "stop": list(options.stop),
        "ignore_eos": options.ignore_eos,
    }
    for name in ("max_new_tokens", "temperature", "top_p", "seed"):
        if options.HasField(name):
            opts[name] = getattr(options, name)
    if opts.get("temperature", 0.0) == 0.0:
        # Greedy decoding ignores sampling knobs: requests differing only there are equal.
        for name in ("temperature", "top_p", "seed"):
            opts.pop(name, None)
    return {
        "model": request.model,
        "prompt": request.prompt,
        "messages": [[m.role, m.content] for m in request.messages],
        "options": opts,
    }


def request_digest(request: inference_pb2.GenerateRequest) -> str:
    """SHA-256 (hex) of the canonical request."""
    blob = json.dumps(canonical_request(request), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _escape(part: str) -> str:
    # Percent-encode everything but [A-Za-z0-9._~-]: no name can add a ':' to the key's structure
    # or a glob character to an invalidation pattern.
    return quote(part, safe="._~-")


def cache_key(tenant: str, request: inference_pb2.GenerateRequest) -> str:
    """``sluice:cache:v1:<tenant>:<model>:<sha256>``."""
    return f"{KEY_PREFIX}:{_escape(tenant)}:{_escape(request.model)}:{request_digest(request)}"


def invalidation_pattern(tenant: str, model: str = "") -> str:
    """SCAN pattern matching a tenant's keys, for one model or all."""
    return f"{KEY_PREFIX}:{_escape(tenant)}:{_escape(model) if model else '*'}:*"
