"""Tenants from a YAML file: who may call, with which models and classes.

```yaml
tenants:
  - name: acme
    api_key_hashes: ["sha256:<hex of the key>"]   # `sluice` stores hashes only
    weight: 2                                        # fair-share weight inside a class
    classes: [realtime, batch]                       # default: all
    models: ["*"]                                    # default: all
    quotas:                                          # global across replicas; 0 = unlimited
      requests_per_second: 20
      burst: 40                                      # default: max(1, requests_per_second)
      tokens_per_minute: 200000                      # prompt + generated
      max_concurrent: 16
    deadlines: {realtime: 30, batch: 600}            # applied when the call sets no deadline
    admin: false                                     # Admin calls: nodes, every tenant's usage
    job_retention_seconds: 604800                    # finished jobs' results kept (default 7 d)
```
The tenant of a request always comes from its verified key, never from a request field. The
same document, as YAML or JSON, under the etcd key ``/sluice/config/tenants`` replaces the file's
tenants live (:mod:`scheduler.live_config`).

Limits (a document that breaks one is refused whole, with the field named):

- at most ``MAX_DOCUMENT_BYTES`` (1 MiB) of UTF-8; one document; nesting at most ``MAX_DEPTH``;
- no anchors, aliases or merge keys (``&a``, ``*a``, ``<<``: no expansion bombs), no duplicate
  mapping keys, only the safe YAML types;
- at most ``MAX_TENANTS`` tenants, names unique; each tenant at most ``MAX_KEY_HASHES`` key
  hashes, each ``sha256:`` + 64 lower-case hex and unique across every tenant;
- numbers finite and in range: weight 0.001-1000; quotas 0 (unlimited) or requests_per_second
  0.001-1e6, burst ≤ 1e7, tokens_per_minute ≤ 1e12, max_concurrent ≤ 1e6; deadlines
  0.001 s-7 days; job_retention_seconds 60 s-90 days; numbers must be numbers (``"2"`` and
  ``true`` are not).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sluice import limits
from sluice.contract import WorkloadClass
from sluice.runtime.auth import HASH_SCHEME, hash_api_key, key_matches

_LABELS = [c.label for c in WorkloadClass]
"""Class names a tenants file may use: lower case, highest priority first."""

MAX_DOCUMENT_BYTES = 1 << 20
"""Largest tenants document (file or etcd value), in bytes of UTF-8."""
MAX_DEPTH = 10
"""Deepest nesting of mappings and sequences (the schema needs 4)."""
MAX_TENANTS = 10_000
"""Most tenants in one document."""
MAX_KEY_HASHES = 64
"""Most API key hashes of one tenant."""
MAX_MODELS = 256
"""Most model names of one tenant."""
MAX_DEADLINE_S = 7 * 86_400.0
"""Longest default deadline a tenant may set for a class."""
_KEY_HASH = re.compile(re.escape(HASH_SCHEME) + r"[0-9a-f]{64}")
_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
"""Numbers must be finite numbers (not ``"2"``, not ``true``); unknown fields are errors."""

Deadline = Annotated[float, Field(ge=0.001, le=MAX_DEADLINE_S)]
ModelName = Annotated[str, Field(min_length=1, max_length=limits.MAX_MODEL_NAME_CHARS)]

DEFAULT_JOB_RETENTION_S = 7 * 86400.0


class Quotas(BaseModel):
    """Limits enforced globally (Redis token buckets shared by every scheduler replica)."""

    model_config = _STRICT

    requests_per_second: float = Field(default=0.0, ge=0, le=1e6)
    """Sustained request rate; 0 means unlimited, else at least 0.001."""
    burst: int = Field(default=0, ge=0, le=10_000_000)
    """Requests allowed at once above the rate; 0 means ``max(1, requests_per_second)``."""
    tokens_per_minute: int = Field(default=0, ge=0, le=10**12)
    """Prompt plus generated tokens per minute; 0 means unlimited."""
    max_concurrent: int = Field(default=0, ge=0, le=1_000_000)
    """Requests in flight at once (queued or running); 0 means unlimited."""

    @field_validator("requests_per_second")
    @classmethod
    def _rate(cls, value: float) -> float:
        if 0 < value < 0.001:
            raise ValueError("must be 0 (unlimited) or at least 0.001")
        return value

    @property
    def bucket_size(self) -> int:
        """Size of the requests-per-second bucket."""
        return self.burst or max(1, math.ceil(self.requests_per_second))

    @property
    def any(self) -> bool:
        """True when some quota is set."""
        return bool(self.requests_per_second or self.tokens_per_minute or self.max_concurrent)


class TenantSpec(BaseModel):
    """One tenant as written in the tenants file."""

    model_config = _STRICT

    name: str = Field(
        min_length=1, max_length=limits.MAX_TENANT_NAME_CHARS, pattern=r"^[A-Za-z0-9._-]+$"
    )
    api_key_hashes: list[str] = Field(min_length=1, max_length=MAX_KEY_HASHES)
    weight: float = Field(default=1.0, ge=0.001, le=1000)
    classes: list[str] = Field(default_factory=lambda: list(_LABELS), max_length=len(_LABELS))
    models: list[ModelName] = Field(default_factory=lambda: ["*"], max_length=MAX_MODELS)
    quotas: Quotas = Field(default_factory=Quotas)
    deadlines: dict[str, Deadline] = Field(default_factory=dict)
    admin: bool = False
    job_retention_seconds: float = Field(default=DEFAULT_JOB_RETENTION_S, ge=60, le=90 * 86400)

    @field_validator("deadlines")
    @classmethod
    def _deadlines(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(_LABELS)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; use {sorted(_LABELS)}")
        return value

    @field_validator("api_key_hashes")
    @classmethod
    def _hashed(cls, value: list[str]) -> list[str]:
        for i, item in enumerate(value):
            if not _KEY_HASH.fullmatch(item):
                raise ValueError(
                    f"item {i} is not 'sha256:' + 64 lower-case hex (store hashes, never keys)"
                )
        if len(set(value)) != len(value):
            raise ValueError("the same hash is listed twice")
        return value

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        unknown = set(value) - set(_LABELS)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}; use {sorted(_LABELS)}")
        return value


class TenantsFile(BaseModel):
    """The whole tenants file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tenants: list[TenantSpec] = Field(max_length=MAX_TENANTS)


class TenantsDocumentError(ValueError):
    """A tenants document was refused: every problem found, each as ``(field, what)``.

    ``field`` is a path such as ``tenants[2].quotas.burst`` (``document`` for the whole text);
    ``reason`` is a short, bounded code for metrics: too_large, encoding, syntax, alias,
    too_deep, duplicate_key, invalid_field, duplicate_name, duplicate_key_hash.
    """

    def __init__(self, reason: str, problems: list[tuple[str, str]], source: str = "") -> None:
        self.reason = reason
        self.problems = problems
        self.source = source
        text = "; ".join(f"{f}: {what}" for f, what in problems[:5])
        if len(problems) > 5:
            text += f" (and {len(problems) - 5} more)"
        super().__init__(f"{source}: {text}" if source else text)

    @property
    def field(self) -> str:
        """The first field refused."""
        return self.problems[0][0]

    def at(self, source: str) -> TenantsDocumentError:
        """The same error, saying where the document came from."""
        return TenantsDocumentError(self.reason, self.problems, source)


@dataclass(frozen=True)
class Tenant:
    """A tenant as the scheduler uses it."""

    name: str
    weight: float
    classes: frozenset[WorkloadClass]
    models: frozenset[str]
    key_hashes: tuple[str, ...] = field(repr=False)
    quotas: Quotas = field(default_factory=Quotas)
    deadlines: Mapping[WorkloadClass, float] = field(default_factory=dict, hash=False)
    """Default deadline in seconds per class, for calls that set none."""
    admin: bool = False
    """May use the Admin calls: list the nodes, read any tenant's usage."""
    job_retention_seconds: float = 7 * 86400.0
    """How long a finished job and its results are kept."""

    def deadline_for(self, workload_class: WorkloadClass, fallback: float) -> float:
        """Seconds a call of ``workload_class`` without a deadline may take."""
        return self.deadlines.get(workload_class, fallback)

    def may_use_model(self, model: str) -> bool:
        """True when the tenant may call ``model``."""
        return "*" in self.models or model in self.models

    def may_use_class(self, workload_class: int) -> bool:
        """True when the tenant may submit work of ``workload_class``."""
        return workload_class in self.classes


class TenantDirectory:
    """API key → tenant, from hashed keys only."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._tenants = {t.name: t for t in tenants}
        self._by_hash = {h: t for t in self._tenants.values() for h in t.key_hashes}

    @classmethod
    def from_yaml(cls, path: Path) -> TenantDirectory:
        """Load and validate a tenants file; raises :class:`TenantsDocumentError` naming the
        file and the field when it is invalid."""
        with path.open("rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)
        try:
            return cls(parse_tenants(raw))
        except TenantsDocumentError as exc:
            raise exc.at(f"tenants file {path}") from None

    def replace(self, tenants: Iterable[Tenant]) -> None:
        """Swap in a new set of tenants at once (live reload); keys not listed stop working."""
        fresh = {t.name: t for t in tenants}
        self._tenants, self._by_hash = (
            fresh,
            {h: t for t in fresh.values() for h in t.key_hashes},
        )

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning ``key``, or None.

        The dict lookup finds the candidate by hash; ``hmac.compare_digest`` then confirms it
        in constant time, so timing reveals nothing about stored hashes.
        """
        candidate = self._by_hash.get(hash_api_key(key))
        if candidate is None:
            return None
        if any(key_matches(key, h) for h in candidate.key_hashes):
            return candidate
        return None

    def get(self, name: str) -> Tenant | None:
        """The tenant called ``name``."""
        return self._tenants.get(name)

    def all(self) -> list[Tenant]:
        """Every tenant."""
        return list(self._tenants.values())

    def names(self) -> list[str]:
        """Every tenant name, sorted."""
        return sorted(self._tenants)


def parse_tenants(document: str | bytes) -> list[Tenant]:
    """Tenants from a YAML (or JSON) document within the module's limits; raises
    :class:`TenantsDocumentError` (a ``ValueError``) naming every field refused."""
    spec = _validate(_load_safely(document))
    _check_unique(spec)
    return [
        Tenant(
            name=t.name,
            weight=t.weight,
            classes=frozenset(WorkloadClass.from_label(c) for c in t.classes),
            models=frozenset(t.models),
            key_hashes=tuple(t.api_key_hashes),
            quotas=t.quotas,
            deadlines={WorkloadClass.from_label(c): s for c, s in t.deadlines.items()},
            admin=t.admin,
            job_retention_seconds=t.job_retention_seconds,
        )
        for t in spec.tenants
    ]


def _refuse(reason: str, what: str, where: str = "document") -> TenantsDocumentError:
    return TenantsDocumentError(reason, [(where, what)])


_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader when built (fast, iterative parser), else PyYAML's own."""


def _load_safely(document: str | bytes) -> Any:
    """The document's data: bounded size, no anchors or aliases, bounded nesting, no duplicate
    keys, safe types only. The events are checked before any node is built."""
    if isinstance(document, str):
        if len(document) > MAX_DOCUMENT_BYTES:  # a character is at least one byte
            raise _refuse("too_large", f"larger than {MAX_DOCUMENT_BYTES} bytes")
        document = document.encode()
    if len(document) > MAX_DOCUMENT_BYTES:
        raise _refuse("too_large", f"larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        text = document.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse("encoding", f"not UTF-8 (byte {exc.start})") from None
    try:
        _check_events(text)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return {}
            _check_keys(node, "")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _refuse("syntax", " ".join(str(exc).split())[:300]) from None


def _check_events(text: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        mark = event.start_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _refuse("alias", f"anchors and aliases are not allowed ({at})")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise _refuse("too_deep", f"nested deeper than {MAX_DEPTH} ({at})")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_keys(node: yaml.Node, path: str) -> None:
    """Refuse duplicate or non-scalar mapping keys and merge keys, anywhere."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(item, f"{path}[{i}]")
    elif isinstance(node, yaml.MappingNode):
        seen: set[tuple[str, str]] = set()
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise _refuse("syntax", "mapping keys must be scalars", path or "document")
            where = f"{path}.{key.value}" if path else str(key.value)
            if key.tag == "tag:yaml.org,2002:merge":
                raise _refuse("alias", "merge keys (<<) are not allowed", path or "document")
            if (key.tag, key.value) in seen:
                raise _refuse("duplicate_key", "key given twice", where)
            seen.add((key.tag, key.value))
            _check_keys(value, where)


def _validate(data: Any) -> TenantsFile:
    try:
        return TenantsFile.model_validate(data)
    except ValidationError as exc:
        problems = [
            (_field_path(err["loc"]), err["msg"] + _tenant_hint(data, err["loc"]))
            for err in exc.errors()
        ]
        raise TenantsDocumentError("invalid_field", problems) from None


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "document"


def _tenant_hint(data: Any, loc: tuple[int | str, ...]) -> str:
    """`` (tenant 'acme')`` when the error lies inside a named tenant."""
    if len(loc) < 3 or loc[0] != "tenants" or not isinstance(loc[1], int):
        return ""
    try:
        name = data["tenants"][loc[1]]["name"]
    except (KeyError, IndexError, TypeError):
        return ""
    return f" (tenant {name!r})" if isinstance(name, str) else ""


def _check_unique(spec: TenantsFile) -> None:
    """Tenant names are unique, and so is every key hash across tenants."""
    names: dict[str, int] = {}
    owners: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    reason = ""
    for i, tenant in enumerate(spec.tenants):
        if tenant.name in names:
            problems.append((f"tenants[{i}].name", _twice(tenant.name, names[tenant.name])))
            reason = reason or "duplicate_name"
        names.setdefault(tenant.name, i)
        for k, digest in enumerate(tenant.api_key_hashes):
            if digest in owners:
                where = f"tenants[{i}].api_key_hashes[{k}]"
                problems.append((where, f"hash already given to tenants[{owners[digest]}]"))
                reason = reason or "duplicate_key_hash"
            owners.setdefault(digest, i)
    if problems:
        raise TenantsDocumentError(reason, problems)


def _twice(name: str, first: int) -> str:
    return f"tenant {name!r} already defined at tenants[{first}]"
