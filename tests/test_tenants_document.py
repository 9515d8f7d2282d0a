"""The tenants document's limits (scheduler/tenants.py): each rule refused with the field named,
the file refused at start-up, and a bad etcd update that keeps the last good tenants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from scheduler.live_config import TENANTS_KEY, LiveTenants
from scheduler.metrics import SchedulerMetrics
from scheduler.tenants import (
    MAX_DOCUMENT_BYTES,
    MAX_MODELS,
    TenantDirectory,
    TenantsDocumentError,
    parse_tenants,
)
from sluice.runtime.auth import hash_api_key
from sluice.runtime.registry import etcd_client
from tests.harness import eventually

HASH_A = hash_api_key("sk-sluice-a")
HASH_B = hash_api_key("sk-sluice-b")

GOOD = f"""
tenants:
  - name: acme
    api_key_hashes: ["{HASH_A}"]
    weight: 2
    classes: [realtime, batch]
    models: ["*"]
    quotas: {{requests_per_second: 20, burst: 40, tokens_per_minute: 200000, max_concurrent: 16}}
    deadlines: {{realtime: 30, batch: 600}}
    admin: false
  - name: other
    api_key_hashes: ["{HASH_B}"]
"""


def tenant(**fields: object) -> str:
    """A one-tenant document (JSON, which is YAML) with ``fields`` over a valid tenant."""
    spec: dict[str, object] = {"name": "acme", "api_key_hashes": [HASH_A], **fields}
    return json.dumps({"tenants": [spec]})


def refusal(document: str | bytes) -> TenantsDocumentError:
    with pytest.raises(TenantsDocumentError) as err:
        parse_tenants(document)
    return err.value


def test_a_valid_document_parses() -> None:
    """The documented example parses into tenants with every field applied."""
    acme, other = parse_tenants(GOOD)
    assert (acme.name, acme.weight, acme.quotas.bucket_size) == ("acme", 2.0, 40)
    assert other.key_hashes == (HASH_B,) and other.weight == 1.0


BILLION_LAUGHS = """
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
tenants: [*d, *d, *d, *d, *d, *d, *d, *d, *d]
"""


@pytest.mark.parametrize(
    ("document", "reason", "field"),
    [
        pytest.param(b"#" * (MAX_DOCUMENT_BYTES + 1), "too_large", "document", id="size"),
        pytest.param(b"tenants: []\n\xff\xfe", "encoding", "document", id="not-utf8"),
        pytest.param(BILLION_LAUGHS, "alias", "document", id="alias-bomb"),
        pytest.param(GOOD.replace("weight: 2", "weight: &w 2"), "alias", "document", id="anchor"),
        pytest.param(
            GOOD.replace("    weight: 2", "    <<: {weight: 2}"), "alias", "tenants[0]", id="merge"
        ),
        pytest.param("tenants: " + "[" * 40 + "]" * 40, "too_deep", "document", id="depth"),
        pytest.param(
            GOOD.replace("    admin: false", "    weight: 3"),
            "duplicate_key",
            "tenants[0].weight",
            id="duplicate-key",
        ),
        pytest.param(GOOD + "tenants: []\n", "duplicate_key", "tenants", id="duplicate-root"),
        pytest.param(
            '{"tenants": [], "tenants": []}', "duplicate_key", "tenants", id="duplicate-json"
        ),
        pytest.param("tenants: !!python/object/apply:os.getpid []", "syntax", "document", id="tag"),
        pytest.param("tenants: []\n---\ntenants: []\n", "syntax", "document", id="two-docs"),
        pytest.param("tenants: [a\n", "syntax", "document", id="broken"),
    ],
)
def test_unsafe_documents_are_refused(document: str | bytes, reason: str, field: str) -> None:
    """Oversized, non-UTF-8, aliased, anchored, merged, deeply nested, duplicate-keyed,
    python-tagged, multi-document and malformed documents are refused before validation."""
    err = refusal(document)
    assert (err.reason, err.field) == (reason, field), str(err)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"weight": float("nan")}, "tenants[0].weight"),
        ({"weight": float("inf")}, "tenants[0].weight"),
        ({"weight": 0}, "tenants[0].weight"),
        ({"weight": -1}, "tenants[0].weight"),
        ({"weight": 5e-324}, "tenants[0].weight"),  # denormal
        ({"weight": 1e6}, "tenants[0].weight"),
        ({"weight": "2"}, "tenants[0].weight"),
        ({"weight": True}, "tenants[0].weight"),
        (
            {"quotas": {"requests_per_second": float("inf")}},
            "tenants[0].quotas.requests_per_second",
        ),
        ({"quotas": {"requests_per_second": -1}}, "tenants[0].quotas.requests_per_second"),
        ({"quotas": {"requests_per_second": 1e-9}}, "tenants[0].quotas.requests_per_second"),
        ({"quotas": {"burst": 10**11}}, "tenants[0].quotas.burst"),
        ({"quotas": {"burst": 1.5}}, "tenants[0].quotas.burst"),
        ({"quotas": {"tokens_per_minute": -5}}, "tenants[0].quotas.tokens_per_minute"),
        ({"quotas": {"max_concurrent": 10**9}}, "tenants[0].quotas.max_concurrent"),
        ({"quotas": {"per_day": 1}}, "tenants[0].quotas.per_day"),
        ({"deadlines": {"realtime": 0}}, "tenants[0].deadlines.realtime"),
        ({"deadlines": {"realtime": float("nan")}}, "tenants[0].deadlines.realtime"),
        ({"deadlines": {"batch": 1e9}}, "tenants[0].deadlines.batch"),
        ({"deadlines": {"urgent": 5}}, "tenants[0].deadlines"),
        ({"classes": ["urgent"]}, "tenants[0].classes"),
        ({"models": ["m"] * (MAX_MODELS + 1)}, "tenants[0].models"),
        ({"models": [""]}, "tenants[0].models[0]"),
        ({"name": "a b"}, "tenants[0].name"),
        ({"api_key_hashes": []}, "tenants[0].api_key_hashes"),
        ({"api_key_hashes": ["sk-sluice-a-raw-key"]}, "tenants[0].api_key_hashes"),
        ({"api_key_hashes": [HASH_A.upper()]}, "tenants[0].api_key_hashes"),
        ({"api_key_hashes": [HASH_A[:-1]]}, "tenants[0].api_key_hashes"),
        ({"api_key_hashes": [HASH_A + "0"]}, "tenants[0].api_key_hashes"),
        ({"api_key_hashes": [HASH_A, HASH_A]}, "tenants[0].api_key_hashes"),
        ({"admin": "yes"}, "tenants[0].admin"),
    ],
)
def test_fields_out_of_range_are_refused_by_name(fields: dict[str, object], field: str) -> None:
    """Every number finite and in its documented range, numbers typed as numbers, hashes
    well-formed: a breach is refused naming the field and the tenant."""
    err = refusal(tenant(**fields))
    assert err.reason == "invalid_field"
    assert err.field == field, str(err)
    assert str(err).startswith(field) and "(tenant '" in str(err)


def test_yaml_non_finite_numbers_are_refused() -> None:
    """YAML's own .nan and .inf spellings are refused like JSON's."""
    assert refusal(GOOD.replace("weight: 2", "weight: .nan")).field == "tenants[0].weight"
    err = refusal(GOOD.replace("batch: 600", "batch: .inf"))
    assert err.field == "tenants[0].deadlines.batch"


def test_tenant_names_must_be_unique() -> None:
    """Two tenants of one name are refused, naming the second."""
    err = refusal(GOOD.replace("name: other", "name: acme"))
    assert (err.reason, err.field) == ("duplicate_name", "tenants[1].name")
    assert "tenants[0]" in str(err)


def test_key_hashes_must_be_unique_across_tenants() -> None:
    """A key hash given to two tenants is refused: a key must name one tenant."""
    err = refusal(GOOD.replace(f'["{HASH_B}"]', f'["{HASH_B}", "{HASH_A}"]'))
    assert (err.reason, err.field) == ("duplicate_key_hash", "tenants[1].api_key_hashes[1]")


def test_a_bad_file_fails_start_up_naming_file_and_field(tmp_path: Path) -> None:
    """The tenants file read at start-up is refused with its path and the field."""
    path = tmp_path / "tenants.yaml"
    path.write_text(GOOD.replace("weight: 2", "weight: -2"))
    with pytest.raises(TenantsDocumentError) as err:
        TenantDirectory.from_yaml(path)
    assert str(err.value).startswith(f"tenants file {path}: tenants[0].weight:")
    path.write_bytes(b"tenants: []\n" + b" " * MAX_DOCUMENT_BYTES)
    with pytest.raises(TenantsDocumentError, match="larger than"):
        TenantDirectory.from_yaml(path)
    path.write_text(GOOD)
    assert TenantDirectory.from_yaml(path).names() == ["acme", "other"]


def _live(directory: TenantDirectory) -> tuple[LiveTenants, CollectorRegistry]:
    registry = CollectorRegistry()
    client = etcd_client("127.0.0.1:1")  # never called: changes are fed directly
    return LiveTenants(client, directory, directory.all(), SchedulerMetrics(registry)), registry


async def test_a_bad_etcd_update_keeps_the_last_good_tenants_and_says_why() -> None:
    """A good document applies; bad ones after it change nothing, are logged once each with
    their reason and field, and are counted by reason."""
    directory = TenantDirectory(parse_tenants(tenant(name="file")))
    live, registry = _live(directory)

    def invalid() -> float | None:
        return registry.get_sample_value(
            "sluice_scheduler_tenant_config_reloads_total", {"result": "invalid"}
        )

    live._on_change("", GOOD.encode())
    await eventually(lambda: directory.names() == ["acme", "other"])
    with capture_logs() as logs:
        live._on_change("", GOOD.replace("weight: 2", "weight: .nan").encode())
        await eventually(lambda: invalid() == 1.0)
        live._on_change("", BILLION_LAUGHS.encode())
        await eventually(lambda: invalid() == 2.0)
    assert directory.names() == ["acme", "other"]
    assert directory.authenticate("sk-sluice-b") is not None
    refused = [e for e in logs if e["event"] == "tenant_config_invalid"]
    assert [(e["reason"], e["field"]) for e in refused] == [
        ("invalid_field", "tenants[0].weight"),
        ("alias", "document"),
    ]
    assert "finite" in refused[0]["error"]
    rejected = registry.get_sample_value(
        "sluice_scheduler_tenant_config_rejected_total", {"reason": "alias"}
    )
    assert rejected == 1.0
    await live.stop()


async def test_a_bad_document_in_etcd_keeps_the_last_good_one(etcd: str) -> None:
    """Through real etcd: the good document applies, an oversized one is refused once (the
    view's periodic re-reads do not repeat it) and the good tenants stay."""
    directory = TenantDirectory(parse_tenants(tenant(name="file")))
    client = etcd_client(etcd)
    registry = CollectorRegistry()
    live = LiveTenants(client, directory, directory.all(), SchedulerMetrics(registry))
    try:
        assert await live.start(within_s=5)
        await client.put(TENANTS_KEY.encode(), GOOD.encode())
        await eventually(lambda: directory.names() == ["acme", "other"])
        await client.put(TENANTS_KEY.encode(), b"tenants: []\n" + b"#" * MAX_DOCUMENT_BYTES)

        def rejected() -> float | None:
            return registry.get_sample_value(
                "sluice_scheduler_tenant_config_rejected_total", {"reason": "too_large"}
            )

        await eventually(lambda: rejected() == 1.0)
        assert directory.names() == ["acme", "other"]
    finally:
        await live.stop()
        await client.delete(TENANTS_KEY.encode())
        await client.close()
