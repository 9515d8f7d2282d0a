"""deploy/: every overlay builds with kustomize, validates against Kubernetes' schemas (and the
vendored CRD schemas for custom resources), and keeps the promises docs/deploy.md makes:
locked-down containers, gRPC health probes, highly available schedulers, GPU node pools,
fenced networking, certificates naming the identities the code checks, settings that exist."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from cache_service.config import CacheSettings
from inference_node.config import NodeSettings
from scheduler.config import SchedulerSettings
from sluice.runtime.tls import Identity, Role, node_identity
from tests.deploy_support import (
    DEPLOY,
    K8S_VERSION,
    OVERLAYS,
    PROD_OVERLAYS,
    Obj,
    build,
    containers,
    env,
    load_yaml,
    named,
    of_kind,
    pod_spec,
    sluice_role,
    workloads,
)

CUSTOM_KINDS = {"Certificate", "Issuer", "ServiceMonitor", "PrometheusRule", "ScaledObject"}
SETTINGS = {"scheduler": SchedulerSettings, "node": NodeSettings, "cache": CacheSettings}


def _closed(schema: Any) -> Any:
    """``schema`` with every object schema that lists properties closed to other fields, as the
    API server's strict field validation treats a CRD (unless it preserves unknown fields)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_schemas() -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) → the vendored openAPIV3Schema, closed."""
    schemas = {}
    for path in sorted((DEPLOY / "crds").glob("*.yaml")):
        crd = load_yaml(path)
        for version in crd["spec"]["versions"]:
            api_version = f"{crd['spec']['group']}/{version['name']}"
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schemas[(api_version, crd["spec"]["names"]["kind"])] = _closed(schema)
    return schemas


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_unique_objects(overlay: str) -> None:
    """kustomize builds the overlay, and no two objects share a kind and name."""
    objects = build(overlay)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys))
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy"} <= {k for k, _ in keys}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_objects_validate_against_kubernetes_schemas(overlay: str) -> None:
    """Every built-in object validates, strictly (no unknown field), against Kubernetes 1.33."""
    failures = []
    for obj in build(overlay):
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.path}: {exc.message}")
    assert failures == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_against_vendored_crd_schemas(overlay: str) -> None:
    """ServiceMonitor, PrometheusRule, ScaledObject, Certificate and Issuer objects validate
    against the schemas vendored in deploy/crds (unknown fields rejected)."""
    schemas = _crd_schemas()
    failures = []
    for obj in build(overlay):
        if obj["kind"] not in CUSTOM_KINDS:
            continue
        schema = schemas.get((obj["apiVersion"], obj["kind"]))
        assert schema is not None, f"no vendored schema for {obj['apiVersion']} {obj['kind']}"
        for error in jsonschema.Draft7Validator(schema).iter_errors(obj):
            where = "/".join(str(p) for p in error.absolute_path)
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {error.message}")
    assert failures == []


def test_vendored_schemas_reject_what_the_cluster_would() -> None:
    """The vendored schemas are not vacuous: a misspelt field and a wrong type both fail."""
    schemas = _crd_schemas()
    cert = named(build("prod"), "Certificate", "sluice-scheduler")
    for broken in ({"dnsName": ["x"]}, {"duration": 3}):
        bad = copy.deepcopy(cert)
        bad["spec"].update(broken)
        schema = schemas[("cert-manager.io/v1", "Certificate")]
        assert not jsonschema.Draft7Validator(schema).is_valid(bad)


def test_every_vendored_crd_is_documented_with_its_source() -> None:
    """deploy/crds/README.md names each vendored file and the commit it came from."""
    readme = (DEPLOY / "crds" / "README.md").read_text()
    for path in (DEPLOY / "crds").glob("*.yaml"):
        assert f"`{path.name}`" in readme
        first_lines = path.read_text()[:600]
        assert "commit" in first_lines and "Apache-2.0" in first_lines


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down(overlay: str) -> None:
    """Non-root, read-only root file system, no privilege escalation, every capability
    dropped, RuntimeDefault seccomp, CPU and memory requests and limits, no service token."""
    for workload in workloads(build(overlay)):
        spec = pod_spec(workload)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        for c in containers(workload):
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert sc.get("runAsNonRoot") is True, where
            assert sc.get("runAsUser", 0) > 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"].get(bound, {})), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sluice_services_are_probed_on_grpc_health(overlay: str) -> None:
    """Scheduler, node and cache: startup and liveness ask grpc.health.v1 whether the server
    answers, readiness whether its service is SERVING (sluice-probe, TLS with the pod's own
    certificate); etcd and Redis have probes of their own."""
    roles = set()
    for workload in of_kind(build(overlay), "Deployment", "StatefulSet"):
        for c in containers(workload):
            role = sluice_role(c)
            if role is None:
                assert {"livenessProbe", "readinessProbe"} <= set(c), c["name"]
                continue
            roles.add(role)
            assert c["readinessProbe"]["exec"]["command"] == ["sluice-probe", "ready", role]
            for probe in ("startupProbe", "livenessProbe"):
                assert c[probe]["exec"]["command"] == ["sluice-probe", "live", role]
            assert {"SLUICE_PORT", "SLUICE_TLS_CA", "SLUICE_TLS_CERT", "SLUICE_TLS_KEY"} <= set(
                env(c)
            )
    assert roles == {"scheduler", "node", "cache"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sluice_services_listen_on_the_pod_interfaces(overlay: str) -> None:
    """Scheduler, node and cache set SLUICE_HOST and SLUICE_METRICS_HOST to 0.0.0.0 in the
    manifest: the settings default to 127.0.0.1, which neither peers, probes through the
    Service nor Prometheus reach, and the manifests must not rely on the image's ENV."""
    roles = set()
    for workload in of_kind(build(overlay), "Deployment", "StatefulSet"):
        for c in containers(workload):
            role = sluice_role(c)
            if role is None:
                continue
            roles.add(role)
            variables = env(c)
            for name in ("SLUICE_HOST", "SLUICE_METRICS_HOST"):
                assert variables[name].get("value") == "0.0.0.0", (role, name)
    assert roles == {"scheduler", "node", "cache"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_labelled_part_of_sluice(overlay: str) -> None:
    """Every workload's pods, node pools included, carry ``app.kubernetes.io/part-of:
    sluice`` (what docs/deploy.md's plain-Prometheus recipe selects), kept out of the
    selectors, which are immutable."""
    names = set()
    for workload in workloads(build(overlay)):
        name = workload["metadata"]["name"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/part-of") == "sluice", name
        selector = workload["spec"].get("selector", {}).get("matchLabels", {})
        assert "app.kubernetes.io/part-of" not in selector, name
        names.add(name)
    assert any(n.startswith("sluice-node-") for n in names)


def test_probe_script_asks_each_role_for_its_registered_service() -> None:
    """sluice-probe asks for the services the servers register health for (the proto service
    names) and names the certificate each presents."""
    script = (DEPLOY / "images" / "sluice-probe").read_text()
    for service, server_name in (
        ("sluice.v1.Inference", Identity(Role.SCHEDULER).server_name),
        ("sluice.v1.Cache", Identity(Role.CACHE).server_name),
        ("sluice.v1.Node", ".node.sluice"),
    ):
        assert f"service={service}" in script
        assert server_name in script
    subprocess.run(["sh", "-n", str(DEPLOY / "images" / "sluice-probe")], check=True)


@pytest.mark.parametrize("overlay", PROD_OVERLAYS)
def test_prod_schedulers_are_highly_available(overlay: str) -> None:
    """At least 3 schedulers (the autoscaler's minimum: the Deployment sets no replicas),
    spread by anti-affinity, a PodDisruptionBudget keeping 2."""
    objects = build(overlay)
    scheduler = named(objects, "Deployment", "sluice-scheduler")
    autoscaler = next(
        a["spec"]
        for a in of_kind(objects, "HorizontalPodAutoscaler", "ScaledObject")
        if a["spec"]["scaleTargetRef"]["name"] == "sluice-scheduler"
    )
    assert autoscaler.get("minReplicas", autoscaler.get("minReplicaCount", 0)) >= 3
    terms = pod_spec(scheduler)["affinity"]["podAntiAffinity"]
    labels = scheduler["spec"]["selector"]["matchLabels"]
    assert any(
        t["podAffinityTerm"]["labelSelector"]["matchLabels"] == labels
        for t in terms["preferredDuringSchedulingIgnoredDuringExecution"]
    )
    pdbs = [
        p
        for p in of_kind(objects, "PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"] == labels
    ]
    assert len(pdbs) == 1 and pdbs[0]["spec"]["minAvailable"] >= 2


@pytest.mark.parametrize("overlay", PROD_OVERLAYS)
def test_prod_node_pools_run_on_their_gpus(overlay: str) -> None:
    """realtime, finetune and shared pools: one GPU each, on machines selected and tolerated
    for the pool, serving the pools their name says."""
    expected = {
        "realtime": ["realtime"],
        "finetune": ["finetune"],
        "shared": ["realtime", "finetune"],
    }
    for pool, pools in expected.items():
        sts = named(build(overlay), "StatefulSet", f"sluice-node-{pool}")
        spec = pod_spec(sts)
        node = spec["containers"][0]
        assert node["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["nodeSelector"]["sluice.io/pool"] == pool
        tolerated = {(t["key"], t.get("value")) for t in spec["tolerations"]}
        assert {("sluice.io/pool", pool), ("nvidia.com/gpu", None)} <= tolerated
        variables = env(node)
        assert json.loads(variables["SLUICE_POOLS"]["value"]) == pools
        assert variables["SLUICE_DEVICE"]["value"] == "cuda"


def test_dev_runs_one_of_each_on_cpu() -> None:
    """dev: one scheduler, one shared CPU node, one cache, one etcd member, Redis."""
    objects = build("dev")
    replicas = {
        (w["kind"], w["metadata"]["name"]): w["spec"]["replicas"]
        for w in workloads(objects)
        if w["kind"] != "Job"
    }
    assert set(replicas.values()) == {1}
    node = pod_spec(named(objects, "StatefulSet", "sluice-node-shared"))["containers"][0]
    assert env(node)["SLUICE_DEVICE"]["value"] == "cpu"
    assert "nvidia.com/gpu" not in node["resources"]["limits"]


def _settings_env(container: Obj, role: str) -> dict[str, str]:
    """The container's SLUICE_* env with values read from the cluster replaced by examples."""
    examples = {
        "metadata.name": "sluice-node-shared-0" if role == "node" else "sluice-scheduler-abc",
        "status.podIP": "10.0.0.7",
    }
    values = {}
    for name, entry in env(container).items():
        if not name.startswith("SLUICE_"):
            continue
        source = entry.get("valueFrom", {})
        if "fieldRef" in source:
            values[name] = examples[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            values[name] = "rediss://user:secret@sluice-redis:6379/0"
        else:
            values[name] = entry["value"]
    return values


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_named_exists_and_parses(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each SLUICE_* variable of a Sluice container is a field of that service's settings
    (they ignore unknown ones silently), and the settings build from them."""
    for workload in of_kind(build(overlay), "Deployment", "StatefulSet"):
        for c in containers(workload):
            role = sluice_role(c)
            if role is None:
                continue
            cls = SETTINGS[role]
            values = _settings_env(c, role)
            unknown = {
                n for n in values if n.removeprefix("SLUICE_").lower() not in cls.model_fields
            }
            assert unknown == set(), f"{role}: {unknown}"
            with monkeypatch.context() as patch:
                for name, value in values.items():
                    patch.setenv(name, value)
                settings = cls()
            assert settings.tls_files() is not None
            assert settings.port == 7000 and settings.metrics_port == 9100


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_certificates_name_the_identities_the_services_check(overlay: str) -> None:
    """Each fixed identity's Certificate carries the CN (etcd user), SPIFFE id (caller check)
    and DNS name (server check) of sluice/runtime/tls.py; each node pod's csi certificate names
    its own node id; the TLS variables point into the mounted certificate."""
    objects = build(overlay)
    for cert_name, role in (
        ("sluice-scheduler", Role.SCHEDULER),
        ("sluice-cache", Role.CACHE),
        ("sluice-etcd", Role.ETCD),
        ("sluice-etcd-root", Role.ROOT),
    ):
        spec = named(objects, "Certificate", cert_name)["spec"]
        identity = Identity(role)
        assert spec["commonName"] == identity.common_name
        assert spec["uris"] == [identity.spiffe_id]
        if role is not Role.ROOT:
            assert identity.server_name in spec["dnsNames"]
    for sts in of_kind(objects, "StatefulSet"):
        if not sts["metadata"]["name"].startswith("sluice-node-"):
            continue
        attributes = next(v for v in pod_spec(sts)["volumes"] if v["name"] == "tls")["csi"][
            "volumeAttributes"
        ]
        pod = f"{sts['metadata']['name']}-0"
        identity = node_identity(pod)

        def filled(key: str, pod: str = pod, attributes: Obj = attributes) -> str:
            return str(attributes[f"csi.cert-manager.io/{key}"]).replace("${POD_NAME}", pod)

        assert filled("common-name") == identity.common_name
        assert filled("dns-names") == identity.server_name
        assert filled("uri-sans") == identity.spiffe_id
    for workload in of_kind(objects, "Deployment", "StatefulSet"):
        for c in containers(workload):
            if sluice_role(c) is None:
                continue
            mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")["mountPath"]
            for name in ("SLUICE_TLS_CA", "SLUICE_TLS_CERT", "SLUICE_TLS_KEY"):
                assert Path(env(c)[name]["value"]).parent == Path(mount)


def _ingress_from(objects: tuple[Obj, ...], component: str) -> list[Obj]:
    policy = named(objects, "NetworkPolicy", f"sluice-{component}")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
    rules: list[Obj] = policy["spec"]["ingress"]
    return rules


def _peers(rule: Obj) -> set[str]:
    return {
        p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component", "?")
        if "namespaceSelector" not in p
        else "prometheus"
        for p in rule.get("from", [])
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_fence_the_suite(overlay: str) -> None:
    """Default deny; only schedulers reach nodes and the cache; only the suite reaches etcd,
    only the schedulers the jobs Redis and only the cache its own; Prometheus reaches the
    metrics ports."""
    objects = build(overlay)
    deny = named(objects, "NetworkPolicy", "sluice-default-deny")["spec"]
    assert deny["podSelector"] == {} and deny.get("ingress") is None
    expected = {
        "node": {"grpc": {"scheduler"}, "metrics": {"prometheus"}},
        "cache": {"grpc": {"scheduler"}, "metrics": {"prometheus"}},
        "etcd": {
            "client": {"scheduler", "node", "etcd-users"},
            "peer": {"etcd"},
            "metrics": {"prometheus"},
        },
        "redis": {"redis": {"scheduler"}},
        "redis-cache": {"redis": {"cache"}},
        "scheduler": {"metrics": {"prometheus"}},
    }
    for component, ports in expected.items():
        seen = {r["ports"][0]["port"]: _peers(r) for r in _ingress_from(objects, component)}
        for port, peers in ports.items():
            assert seen[port] == peers, (component, port)
    public = [r for r in _ingress_from(objects, "scheduler") if "from" not in r]
    assert [r["ports"] for r in public] == [[{"port": "grpc"}]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_third_party_images_are_pinned(overlay: str) -> None:
    """etcd and Redis images name an exact version (the Sluice image is set by the overlay)."""
    for workload in workloads(build(overlay)):
        for c in containers(workload):
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and any(ch.isdigit() for ch in tag), image


def test_make_secrets_writes_what_redis_and_the_services_read(tmp_path: Path) -> None:
    """deploy/make-secrets.sh: each Redis's ACL file (the key its manifest mounts) holds the
    one user that calls it, as sluice up writes that user; URLs that redis-py opens over TLS as
    those users, to the Redis of each (whose certificate names the host dialled: redis-py
    checks it); a tenants file whose admin key authenticates."""
    import redis.asyncio as redis  # noqa: PLC0415 - only this test needs it

    from scheduler.tenants import TenantDirectory  # noqa: PLC0415
    from sluice.local import lockdown  # noqa: PLC0415

    subprocess.run(["sh", str(DEPLOY / "make-secrets.sh"), str(tmp_path)], check=True)
    objects = build("prod")
    redis_of = {
        "scheduler": ("StatefulSet", "sluice-redis"),
        "cache": ("Deployment", "sluice-redis-cache"),
    }
    passwords = {}
    for user, (_, name) in redis_of.items():
        url = (tmp_path / f"redis-url-{user}").read_text()
        pool = redis.Redis.from_url(url).connection_pool
        kwargs = pool.connection_kwargs
        assert pool.connection_class is redis.SSLConnection and kwargs["username"] == user
        assert kwargs["ssl_certfile"] == "/etc/sluice/tls/tls.crt"
        assert (kwargs["host"], kwargs["port"]) == (name, 6379)
        assert name in named(objects, "Certificate", name)["spec"]["dnsNames"]
        passwords[user] = kwargs["password"]
    default, *lines = lockdown._acl_text(passwords).splitlines(keepends=True)
    line_of = {line.split()[1]: line for line in lines}
    for user, (kind, name) in redis_of.items():
        acl = next(v for v in pod_spec(named(objects, kind, name))["volumes"] if v["name"] == "acl")
        assert acl["secret"]["secretName"] == "sluice-redis-acl"
        [item] = acl["secret"]["items"]
        assert item["path"] == "users.acl"
        written = tmp_path / item["key"]
        assert written.read_text() == default + line_of[user], user
        assert oct(written.stat().st_mode & 0o777) == "0o600"
    key = (tmp_path / "admin-api-key").read_text().strip()
    tenant = TenantDirectory.from_yaml(tmp_path / "tenants.yaml").authenticate(key)
    assert tenant is not None and tenant.name == "admin"


_UNITS = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def _bytes(size: str) -> int:
    """``2gb`` (redis.conf) or ``4Gi`` (Kubernetes) in bytes (both binary)."""
    number = size.rstrip("kmgbKMGi")
    return int(number) * _UNITS[size[len(number) :]]


def _redis_conf(objects: tuple[Obj, ...], name: str) -> dict[str, str]:
    """The directives of the ConfigMap ``name``'s redis.conf."""
    conf = {}
    for raw in named(objects, "ConfigMap", name)["data"]["redis.conf"].splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            directive, _, value = line.partition(" ")
            conf[directive] = value
    return conf


def _memory_limit(workload: Obj) -> int:
    return _bytes(pod_spec(workload)["containers"][0]["resources"]["limits"]["memory"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cache_entries_cannot_fill_the_jobs_redis(overlay: str) -> None:
    """The jobs and quotas Redis persists (AOF) and never evicts, with a memory limit of at
    least twice maxmemory (an AOF rewrite forks; copy-on-write can copy the data set again);
    the cache's Redis is another one, evicting least recently used keys, persisting nothing."""
    objects = build(overlay)
    jobs = _redis_conf(objects, "sluice-redis")
    assert (jobs["maxmemory-policy"], jobs["appendonly"]) == ("noeviction", "yes")
    assert _memory_limit(named(objects, "StatefulSet", "sluice-redis")) >= 2 * _bytes(
        jobs["maxmemory"]
    )
    cache = _redis_conf(objects, "sluice-redis-cache")
    assert (cache["maxmemory-policy"], cache["appendonly"], cache["save"]) == (
        "allkeys-lru",
        "no",
        '""',
    )
    assert _memory_limit(named(objects, "Deployment", "sluice-redis-cache")) > _bytes(
        cache["maxmemory"]
    )
