"""Request validation: every rule broken is reported at once, as ``BadRequest`` violations.

Sampling parameters must be numerically safe, not merely in range: a temperature so small
that dividing logits by it overflows float32 (a denormal one did: NaN probabilities failed
the node's whole batch), NaN, infinities and denormal values are refused here, and again at
the node (``inference_node.engine.text.sampling_violations``, the same bounds).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

from scheduler.config import ModelSpec
from scheduler.tenants import Tenant
from sluice.contract import WorkloadClass
from sluice.runtime.errors import InvalidArgument, PermissionDenied
from sluice.v1 import common_pb2, inference_pb2

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MIN_TEMPERATURE = 0.01
"""Smallest non-zero temperature (0 is greedy): below it sampling is greedy in all but name
and logits divided by it can overflow float32."""
MAX_TEMPERATURE = 2.0
MIN_TOP_P = 2.0**-126
"""The smallest normal float32: a denormal top_p is refused."""
ROLES = frozenset({"system", "user", "assistant"})

Catalog = Callable[[str], ModelSpec | None]
"""Looks a model up by name (configured catalog, then models nodes advertise)."""


def effective_class(workload_class: int) -> int:
    """Unset class means REALTIME (any other value is kept, defined or not)."""
    return workload_class or WorkloadClass.REALTIME


def class_label(workload_class: int) -> str:
    """The metrics label of a wire class: its name (unset is ``realtime``), or ``unknown``
    for a value the contract does not define (a bounded label, never the raw number)."""
    try:
        return WorkloadClass.from_wire(workload_class).label
    except ValueError:
        return "unknown"


def _class_violations(workload_class: int) -> list[tuple[str, str]]:
    if workload_class in common_pb2.WorkloadClass.values():
        return []
    return [("workload_class", f"unknown value {workload_class}")]


def _float32(value: float) -> float:
    """``value`` rounded to float32, the wire's precision (so 0.01 sent as a float passes)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def _sampling_violations(options: common_pb2.GenerationOptions) -> list[tuple[str, str]]:
    """Numerical safety of temperature and top_p, and the stop strings' bounds."""
    out: list[tuple[str, str]] = []
    t = options.temperature
    if options.HasField("temperature") and not (
        t == 0 or (_float32(MIN_TEMPERATURE) <= t <= MAX_TEMPERATURE and math.isfinite(t))
    ):
        out.append(
            (
                "options.temperature",
                f"must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]",
            )
        )
    if options.HasField("top_p") and not MIN_TOP_P <= options.top_p <= 1.0:
        out.append(("options.top_p", "must be in (0, 1] and not a denormal number"))
    if len(options.stop) > MAX_STOP_STRINGS:
        out.append(("options.stop", f"at most {MAX_STOP_STRINGS} stop strings"))
    for i, stop in enumerate(options.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            out.append((f"options.stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters"))
    return out


def _check_access(tenant: Tenant, model: str, workload_class: int) -> None:
    if not tenant.may_use_model(model):
        raise PermissionDenied(f"tenant {tenant.name!r} may not use model {model!r}")
    if not tenant.may_use_class(workload_class):
        raise PermissionDenied(
            f"tenant {tenant.name!r} may not submit {class_label(workload_class)} work"
        )


def _model_spec(
    model: str, kind: str, catalog: Catalog, violations: list[tuple[str, str]]
) -> ModelSpec | None:
    """The model's spec; records a violation when it is missing, unknown or the wrong kind."""
    spec = catalog(model) if model else None
    if not model:
        violations.append(("model", "required"))
    elif spec is None:
        violations.append(("model", f"unknown model {model!r}"))
    elif spec.kind != kind:
        use = "Generate" if spec.kind == "generate" else "Embed"
        violations.append(("model", f"{model!r} is a {spec.kind} model; use {use}"))
    return spec if spec is not None and spec.kind == kind else None


def validate_generate(
    request: inference_pb2.GenerateRequest, tenant: Tenant, catalog: Catalog
) -> inference_pb2.GenerateRequest:
    """Check ``request`` and return a copy with defaults applied (class, max_new_tokens)."""
    violations: list[tuple[str, str]] = []
    spec = _model_spec(request.model, "generate", catalog, violations)
    violations.extend(_class_violations(request.workload_class))

    has_prompt = bool(request.prompt.strip())
    if has_prompt and request.messages:
        violations.append(("messages", "set either prompt or messages, not both"))
    elif not has_prompt and not request.messages:
        violations.append(("prompt", "must not be empty (or send messages)"))
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            violations.append((f"messages[{i}].role", f"must be one of {sorted(ROLES)}"))
        if not message.content.strip():
            violations.append((f"messages[{i}].content", "must not be empty"))
    chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
    if spec is not None and chars > spec.max_prompt_chars:
        violations.append(("prompt", f"{chars} characters, limit {spec.max_prompt_chars}"))

    options = request.options
    if options.HasField("max_new_tokens"):
        limit = spec.max_new_tokens if spec else None
        if options.max_new_tokens <= 0:
            violations.append(("options.max_new_tokens", "must be at least 1"))
        elif limit is not None and options.max_new_tokens > limit:
            violations.append(
                ("options.max_new_tokens", f"{options.max_new_tokens} > limit {limit}")
            )
    violations.extend(_sampling_violations(options))
    if violations:
        raise InvalidArgument(violations)

    assert spec is not None
    workload_class = effective_class(request.workload_class)
    _check_access(tenant, request.model, workload_class)
    normalized = inference_pb2.GenerateRequest()
    normalized.CopyFrom(request)
    normalized.workload_class = workload_class  # type: ignore[assignment]
    if not options.HasField("max_new_tokens"):
        normalized.options.max_new_tokens = spec.default_max_new_tokens
    return normalized


def validate_embed(
    request: inference_pb2.EmbedRequest, tenant: Tenant, catalog: Catalog
) -> inference_pb2.EmbedRequest:
    """Check an embedding request; returns a copy with the class defaulted."""
    violations: list[tuple[str, str]] = []
    spec = _model_spec(request.model, "embed", catalog, violations)
    violations.extend(_class_violations(request.workload_class))
    if not request.inputs:
        violations.append(("inputs", "at least one text required"))
    elif spec is not None and len(request.inputs) > spec.max_inputs:
        violations.append(("inputs", f"{len(request.inputs)} texts, limit {spec.max_inputs}"))
    for i, text in enumerate(request.inputs):
        if not text.strip():
            violations.append((f"inputs[{i}]", "must not be empty"))
        elif spec is not None and len(text) > spec.max_prompt_chars:
            violations.append((f"inputs[{i}]", f"longer than {spec.max_prompt_chars} characters"))
    if violations:
        raise InvalidArgument(violations)
    workload_class = effective_class(request.workload_class)
    _check_access(tenant, request.model, workload_class)
    normalized = inference_pb2.EmbedRequest()
    normalized.CopyFrom(request)
    normalized.workload_class = workload_class  # type: ignore[assignment]
    return normalized
