"""Request validation: every rule broken is reported at once, as ``BadRequest`` violations.

First the contract's limits (:mod:`sluice.limits`, the same functions the inference node
checks again: counts, lengths, characters, numerically safe sampling parameters, defined
enum values, metadata sizes), then the model's own from the catalog (``max_new_tokens``,
``max_prompt_chars``, ``max_inputs``: tighter or equal), then access. The table of every
limit: docs/limits.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from scheduler.config import ModelSpec
from scheduler.tenants import Tenant
from sluice import limits
from sluice.contract import WorkloadClass
from sluice.runtime.errors import InvalidArgument, PermissionDenied
from sluice.v1 import inference_pb2

Catalog = Callable[[str], ModelSpec | None]
"""Looks a model up by name (configured catalog, then models nodes advertise)."""

Metadata = Iterable[tuple[str, str | bytes]] | None
"""The call's metadata (``ServicerContext.invocation_metadata()``)."""


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


def _check_access(tenant: Tenant, model: str, workload_class: int) -> None:
    if not tenant.may_use_model(model):
        raise PermissionDenied(f"tenant {tenant.name!r} may not use model {model!r}")
    if not tenant.may_use_class(workload_class):
        raise PermissionDenied(
            f"tenant {tenant.name!r} may not submit {class_label(workload_class)} work"
        )


def _model_spec(
    model: str, kind: str, catalog: Catalog, violations: limits.Violations
) -> ModelSpec | None:
    """The model's spec; records a violation when it is unknown or the wrong kind (a name
    already refused by the contract's limits is not looked up)."""
    if any(field == "model" for field, _ in violations):
        return None
    spec = catalog(model)
    if spec is None:
        violations.append(("model", f"unknown model {model!r}"))
    elif spec.kind != kind:
        use = "Generate" if spec.kind == "generate" else "Embed"
        violations.append(("model", f"{model!r} is a {spec.kind} model; use {use}"))
    return spec if spec is not None and spec.kind == kind else None


def _within_model(violations: limits.Violations, field: str, why: str) -> None:
    """Add a model limit's violation unless the contract's already refused ``field``."""
    if all(f != field for f, _ in violations):
        violations.append((field, why))


def _generate_model_violations(
    request: inference_pb2.GenerateRequest, spec: ModelSpec, violations: limits.Violations
) -> None:
    chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
    if chars > spec.max_prompt_chars:
        field = "messages" if request.messages and not request.prompt.strip() else "prompt"
        _within_model(violations, field, f"{chars} characters, limit {spec.max_prompt_chars}")
    asked = request.options.max_new_tokens
    if request.options.HasField("max_new_tokens") and asked > spec.max_new_tokens:
        _within_model(
            violations, "options.max_new_tokens", f"{asked} > limit {spec.max_new_tokens}"
        )


def validate_generate(
    request: inference_pb2.GenerateRequest,
    tenant: Tenant,
    catalog: Catalog,
    metadata: Metadata = (),
) -> inference_pb2.GenerateRequest:
    """Check ``request`` and return a copy with defaults applied (class, max_new_tokens)."""
    violations = limits.generate_violations(request) + limits.metadata_violations(metadata)
    spec = _model_spec(request.model, "generate", catalog, violations)
    if spec is not None:
        _generate_model_violations(request, spec, violations)
    if violations:
        raise InvalidArgument(violations)

    assert spec is not None
    workload_class = effective_class(request.workload_class)
    _check_access(tenant, request.model, workload_class)
    normalized = inference_pb2.GenerateRequest()
    normalized.CopyFrom(request)
    normalized.workload_class = workload_class  # type: ignore[assignment]
    if not request.options.HasField("max_new_tokens"):
        normalized.options.max_new_tokens = spec.default_max_new_tokens
    return normalized


def validate_embed(
    request: inference_pb2.EmbedRequest,
    tenant: Tenant,
    catalog: Catalog,
    metadata: Metadata = (),
) -> inference_pb2.EmbedRequest:
    """Check an embedding request; returns a copy with the class defaulted."""
    violations = limits.embed_violations(request) + limits.metadata_violations(metadata)
    spec = _model_spec(request.model, "embed", catalog, violations)
    if spec is not None:
        if len(request.inputs) > spec.max_inputs:
            _within_model(
                violations, "inputs", f"{len(request.inputs)} texts, limit {spec.max_inputs}"
            )
        for i, text in enumerate(request.inputs[: spec.max_inputs]):
            if len(text) > spec.max_prompt_chars:
                why = f"longer than {spec.max_prompt_chars} characters"
                _within_model(violations, f"inputs[{i}]", why)
    if violations:
        raise InvalidArgument(violations)
    workload_class = effective_class(request.workload_class)
    _check_access(tenant, request.model, workload_class)
    normalized = inference_pb2.EmbedRequest()
    normalized.CopyFrom(request)
    normalized.workload_class = workload_class  # type: ignore[assignment]
    return normalized
