"""The limit of every field of every public request, in one place (the table: docs/limits.md).

The scheduler checks them before anything else happens to a request; the inference node
checks them again, so a caller that bypasses the scheduler is refused the same way. Each
rule broken is a ``(field, why)`` pair, a ``google.rpc.BadRequest`` field violation: the
services raise INVALID_ARGUMENT with every pair at once.

These are the contract's bounds. A model's own limits are tighter or equal, never looser:
the scheduler's catalog (``max_new_tokens``, ``max_prompt_chars``, ``max_inputs`` per model)
and the node's (the model loaded, its context length, the KV budget).

Numbers must be safe, not merely in range: NaN, infinities and subnormal floats are refused
(a subnormal temperature overflowed logits and failed a node's whole batch), and bounds are
compared as float32, the wire's precision, so ``0.01`` sent as a protobuf ``float`` passes.

Pure functions over the generated messages: no I/O and no service imports, so every service
(and the SDK) may use them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence

from sluice import contract
from sluice.v1 import common_pb2, inference_pb2, jobs_pb2

Violations = list[tuple[str, str]]
"""``(field, why)`` pairs, one per rule broken."""

MAX_MODEL_NAME_CHARS = 128
"""``model`` of Generate and Embed: 1 to this many characters."""
MAX_PROMPT_CHARS = 1_000_000
"""Generate: characters of ``prompt`` or of every ``messages[].content`` together. With at
most 4 UTF-8 bytes a character, a request at every limit stays well under the servers'
16 MiB message limit."""
MAX_MESSAGES = 256
"""Generate: chat turns in ``messages``."""
CHAT_ROLES = frozenset({"system", "user", "assistant"})
"""Generate: the values ``messages[].role`` may take."""
MAX_NEW_TOKENS = 32_768
"""Generate: ``options.max_new_tokens`` is 1 to this (unset: the model's default)."""
MIN_TEMPERATURE = 0.01
"""Smallest non-zero ``options.temperature`` (0 is greedy): below it sampling is greedy in
all but name, and dividing logits by it can overflow float32 (vLLM warns at the same bound)."""
MAX_TEMPERATURE = 2.0
MIN_TOP_P = 2.0**-126
"""Smallest ``options.top_p``: the smallest normal float32 (0 and subnormals are refused)."""
MAX_TOP_P = 1.0
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
"""Stop strings are searched in the whole completion at every token, on the thread every
request of a node shares: their number and length are bounded."""
MAX_SESSION_ID_CHARS = 128
"""Generate: ``session_id``."""
MAX_EMBED_INPUTS = 256
"""Embed: texts in ``inputs`` (at least one)."""
MAX_EMBED_INPUT_CHARS = 32_000
"""Embed: characters of one text."""
MAX_EMBED_TOTAL_CHARS = 1_000_000
"""Embed: characters of every text together."""
MAX_TENANT_NAME_CHARS = 64
"""Tenant names (the tenants document) and ``GetTenantUsageRequest.tenant``."""
MAX_REQUEST_ID_CHARS = 128
"""The ``x-request-id`` metadata value (a correlation id for logs)."""
MAX_JOB_KEY_CHARS = 128
"""Node requests (internal): ``request_id``, the job key a scheduler makes (32 characters)."""

FINETUNE_MAX_STEPS = 100_000
"""``FinetuneSpec``: optimizer steps of one fine-tune at most (``max_steps``, or what the
epochs take)."""
FINETUNE_INT_FIELDS: dict[str, tuple[int, int, int]] = {
    # field: (low, high, the value 0 stands for)
    "lora.rank": (1, 256, 8),
    "epochs": (1, 100, 1),
    "max_steps": (0, FINETUNE_MAX_STEPS, 0),
    "micro_batch_size": (1, 64, 1),
    "gradient_accumulation_steps": (1, 1024, 1),
    "max_sequence_tokens": (16, 8192, 512),
    "checkpoint_every_steps": (1, FINETUNE_MAX_STEPS, 20),
    "optimizer.warmup_steps": (0, FINETUNE_MAX_STEPS, 0),
}
"""``FinetuneSpec``'s integer fields by their path in the spec."""
FINETUNE_FLOAT_FIELDS: dict[str, tuple[float, float]] = {
    # field: (low, high), inclusive
    "lora.alpha": (0.0, 4096.0),  # 0 stands for 2 x rank
    "lora.dropout": (0.0, 0.5),
    "optimizer.learning_rate": (0.0, 1.0),  # 0 stands for DEFAULT_LEARNING_RATE
    "optimizer.weight_decay": (0.0, 1.0),
    "optimizer.max_grad_norm": (0.0, 1e4),  # 0: no clipping
}
"""``FinetuneSpec``'s float fields by their path in the spec."""
DEFAULT_LEARNING_RATE = 2e-4
"""``FinetuneSpec.optimizer.learning_rate`` 0 stands for this."""
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""``LoraSettings.target_modules``: the projections a fine-tune may adapt."""
DEFAULT_LORA_TARGET_MODULES = LORA_TARGET_MODULES[:4]
"""No target modules stands for the four attention projections."""

METADATA_LIMITS = {contract.REQUEST_ID_METADATA: MAX_REQUEST_ID_CHARS}
"""Characters a metadata value the services read may have, by key. ``authorization`` is read
by the API-key check before the request body is parsed: a value that matches no tenant is
UNAUTHENTICATED, whatever its length; gRPC bounds all metadata together (8 KiB)."""


def float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as it arrives in a protobuf ``float`` field."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def model_violations(model: str) -> Violations:
    """``model``: required, at most :data:`MAX_MODEL_NAME_CHARS` characters."""
    if not model:
        return [("model", "required")]
    if len(model) > MAX_MODEL_NAME_CHARS:
        return [("model", f"{len(model)} characters, at most {MAX_MODEL_NAME_CHARS}")]
    return []


def class_violations(workload_class: int) -> Violations:
    """``workload_class``: a value the contract defines (unset is REALTIME)."""
    if workload_class in common_pb2.WorkloadClass.values():
        return []
    return [("workload_class", f"unknown value {workload_class}")]


def sampling_violations(temperature: float, top_p: float, stop: Sequence[str]) -> Violations:
    """Numerically safe ``temperature`` (0, or finite and in range) and ``top_p`` (normal,
    in range), and bounded stop strings. The node's engine checks its requests with this
    too, a third time."""
    out: Violations = []
    t = temperature
    if not (t == 0 or (float32(MIN_TEMPERATURE) <= t <= MAX_TEMPERATURE and math.isfinite(t))):
        out.append(
            (
                "options.temperature",
                f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]",
            )
        )
    if not MIN_TOP_P <= top_p <= MAX_TOP_P:
        out.append(("options.top_p", "must be in (0, 1] and not a denormal number"))
    if len(stop) > MAX_STOP_STRINGS:
        out.append(("options.stop", f"{len(stop)} stop strings, at most {MAX_STOP_STRINGS}"))
    for i, s in enumerate(stop[:MAX_STOP_STRINGS]):
        if not s or len(s) > MAX_STOP_CHARS:
            out.append((f"options.stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters"))
    return out


def options_violations(options: common_pb2.GenerationOptions) -> Violations:
    """``max_new_tokens`` (when set) and the sampling parameters (unset: greedy, top_p 1)."""
    out: Violations = []
    if options.HasField("max_new_tokens") and not 1 <= options.max_new_tokens <= MAX_NEW_TOKENS:
        out.append(("options.max_new_tokens", f"must be 1 to {MAX_NEW_TOKENS}"))
    temperature = options.temperature if options.HasField("temperature") else 0.0
    top_p = options.top_p if options.HasField("top_p") else MAX_TOP_P
    return out + sampling_violations(temperature, top_p, options.stop)


def _text_violations(request: inference_pb2.GenerateRequest) -> Violations:
    """A prompt or chat turns, not both, within their counts and characters."""
    out: Violations = []
    messages = request.messages
    has_prompt = bool(request.prompt.strip())
    if has_prompt and messages:
        out.append(("messages", "set either prompt or messages, not both"))
    elif not has_prompt and not messages:
        out.append(("prompt", "must not be empty (or send messages)"))
    if len(messages) > MAX_MESSAGES:
        out.append(("messages", f"{len(messages)} messages, at most {MAX_MESSAGES}"))
    for i, message in enumerate(messages[:MAX_MESSAGES]):
        if message.role not in CHAT_ROLES:
            out.append((f"messages[{i}].role", f"must be one of {sorted(CHAT_ROLES)}"))
        if not message.content.strip():
            out.append((f"messages[{i}].content", "must not be empty"))
    chars = len(request.prompt) + sum(len(m.content) for m in messages)
    if chars > MAX_PROMPT_CHARS:
        field = "messages" if messages and not has_prompt else "prompt"
        out.append((field, f"{chars} characters, at most {MAX_PROMPT_CHARS}"))
    return out


def generate_violations(request: inference_pb2.GenerateRequest) -> Violations:
    """Every contract limit a Generate request breaks (a model's own limits aside)."""
    out = model_violations(request.model)
    out += class_violations(request.workload_class)
    out += _text_violations(request)
    if len(request.session_id) > MAX_SESSION_ID_CHARS:
        out.append(
            ("session_id", f"{len(request.session_id)} characters, at most {MAX_SESSION_ID_CHARS}")
        )
    return out + options_violations(request.options)


def embed_violations(request: inference_pb2.EmbedRequest) -> Violations:
    """Every contract limit an Embed request breaks (a model's own limits aside)."""
    out = model_violations(request.model)
    out += class_violations(request.workload_class)
    inputs = request.inputs
    if not inputs:
        out.append(("inputs", "at least one text required"))
    elif len(inputs) > MAX_EMBED_INPUTS:
        out.append(("inputs", f"{len(inputs)} texts, at most {MAX_EMBED_INPUTS}"))
    for i, text in enumerate(inputs[:MAX_EMBED_INPUTS]):
        if not text.strip():
            out.append((f"inputs[{i}]", "must not be empty"))
        elif len(text) > MAX_EMBED_INPUT_CHARS:
            out.append((f"inputs[{i}]", f"{len(text)} characters, at most {MAX_EMBED_INPUT_CHARS}"))
    total = sum(len(t) for t in inputs)
    if total > MAX_EMBED_TOTAL_CHARS:
        out.append(("inputs", f"{total} characters in all, at most {MAX_EMBED_TOTAL_CHARS}"))
    return out


def tenant_name_violations(field: str, name: str) -> Violations:
    """A tenant name in a request: at most :data:`MAX_TENANT_NAME_CHARS` characters."""
    if len(name) > MAX_TENANT_NAME_CHARS:
        return [(field, f"{len(name)} characters, at most {MAX_TENANT_NAME_CHARS}")]
    return []


def metadata_violations(metadata: Iterable[tuple[str, str | bytes]] | None) -> Violations:
    """Metadata values over their limit (:data:`METADATA_LIMITS`), named ``metadata.<key>``."""
    out: Violations = []
    for key, value in metadata or ():
        limit = METADATA_LIMITS.get(key)
        if limit is not None and len(value) > limit:
            out.append((f"metadata.{key}", f"{len(value)} characters, at most {limit}"))
    return out


def finetune_field(spec: jobs_pb2.FinetuneSpec, path: str) -> float:
    """The value of a ``FinetuneSpec`` field named by its path (``lora.rank``)."""
    value: object = spec
    for part in path.split("."):
        value = getattr(value, part)
    assert isinstance(value, int | float)
    return value


def finetune_ints(spec: jobs_pb2.FinetuneSpec) -> dict[str, int]:
    """Every integer field of ``spec`` with 0 read as its default."""
    return {
        path: int(finetune_field(spec, path)) or default
        for path, (_, _, default) in FINETUNE_INT_FIELDS.items()
    }


def finetune_spec_violations(spec: jobs_pb2.FinetuneSpec, prefix: str) -> Violations:
    """The numbers, target modules and schedule of a ``FinetuneSpec`` (fields named
    ``<prefix><path>``); the names in it (base model, adapter) are each side's to check."""
    out: Violations = []
    for path, value in finetune_ints(spec).items():
        low, high, default = FINETUNE_INT_FIELDS[path]
        if not low <= value <= high:
            out.append((prefix + path, f"{low}-{high} (0: {default})"))
    for path, (low_f, high_f) in FINETUNE_FLOAT_FIELDS.items():
        number = float(finetune_field(spec, path))
        if not math.isfinite(number) or not float32(low_f) <= number <= float32(high_f):
            out.append((prefix + path, f"a number from {low_f:g} to {high_f:g}"))
    targets = list(spec.lora.target_modules)
    unknown = sorted(set(targets) - set(LORA_TARGET_MODULES))
    where = prefix + "lora.target_modules"
    if unknown:
        choices = ", ".join(LORA_TARGET_MODULES)
        out.append((where, f"unknown {unknown[:3]}; choose from {choices}"))
    elif len(set(targets)) != len(targets):
        out.append((where, "a module is named twice"))
    if spec.optimizer.schedule not in jobs_pb2.LrSchedule.values():
        out.append((prefix + "optimizer.schedule", "CONSTANT, LINEAR or COSINE"))
    return out
