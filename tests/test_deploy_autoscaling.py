"""Autoscaling and drain in deploy/: every metric an autoscaler, the prometheus-adapter rules
or a KEDA query names is one the services export; HPA and KEDA agree; scale-down gives each
node its drain; etcd has a user for every node ordinal an autoscaler may create."""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from types import ModuleType

import pytest

from tests.deploy_support import (
    DEPLOY,
    PROD_OVERLAYS,
    ROOT,
    Obj,
    build,
    env,
    load_yaml,
    named,
    of_kind,
    pod_spec,
)

PRODUCT = ("sluice", "scheduler", "inference_node", "cache_service")
METRIC_CLASSES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "GaugeMetricFamily": ("",),
    "CounterMetricFamily": ("_total",),
}
METRIC_NAME = re.compile(r"\bsluice_[a-z0-9_]+\b(?!\s*[=!]~?\")")
"""A metric name in a query (a label name, followed by a matcher, is not one)."""


@cache
def exported_series() -> frozenset[str]:
    """Every series name the product code can export: the first argument of each metric
    constructor, with the suffixes Prometheus' client adds for its type."""
    series = set()
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            if "v1" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and node.args):
                    continue
                func = node.func
                kind = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                first = node.args[0]
                if kind in METRIC_CLASSES and isinstance(first, ast.Constant):
                    name = str(first.value).removesuffix("_total")
                    series |= {name + suffix for suffix in METRIC_CLASSES[kind]}
    return frozenset(series)


def _adapter_rules() -> list[Obj]:
    values = load_yaml(DEPLOY / "prometheus-adapter" / "values.yaml")
    rules: list[Obj] = values["rules"]["custom"] + values["rules"]["external"]
    return rules


def _autoscaled_workloads(objects: tuple[Obj, ...]) -> dict[str, Obj]:
    """Target workload name → its HPA or ScaledObject spec."""
    out = {}
    for obj in of_kind(objects, "HorizontalPodAutoscaler", "ScaledObject"):
        out[obj["spec"]["scaleTargetRef"]["name"]] = obj
    return out


def test_metric_names_are_read_from_the_code() -> None:
    """The scan finds the metrics the autoscalers rely on (it is not vacuous)."""
    assert {
        "sluice_node_running_sequences",
        "sluice_node_waiting_sequences",
        "sluice_scheduler_requests_total",
        "sluice_scheduler_predicted_queue_wait_seconds_sum",
        "sluice_scheduler_predicted_queue_wait_seconds_count",
        "sluice_scheduler_finetune_jobs",
    } <= exported_series()


def test_adapter_rules_query_only_exported_metrics() -> None:
    """Every metric in prometheus-adapter's rules is exported by a Sluice service."""
    for rule in _adapter_rules():
        names = set(METRIC_NAME.findall(rule["seriesQuery"] + rule["metricsQuery"]))
        assert names - {rule["name"]["as"]} <= exported_series(), names


def test_hpas_ask_the_adapter_for_metrics_it_serves() -> None:
    """Each Pods or External metric of the HPAs is a name the adapter's rules publish."""
    served = {rule["name"]["as"] for rule in _adapter_rules()}
    hpas = of_kind(build("prod"), "HorizontalPodAutoscaler")
    assert hpas
    for hpa in hpas:
        for metric in hpa["spec"]["metrics"]:
            kind = metric["type"]
            if kind == "Resource":
                continue
            assert metric[kind.lower()]["metric"]["name"] in served


def test_keda_queries_name_exported_metrics_and_real_pools() -> None:
    """KEDA's Prometheus queries use exported metrics and pools that exist."""
    objects = build("prod-keda")
    pools = {
        s["metadata"]["labels"]["sluice.io/pool"]
        for s in of_kind(objects, "StatefulSet")
        if "sluice.io/pool" in s["metadata"]["labels"]
    }
    for scaled in of_kind(objects, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] != "prometheus":
                continue
            query = trigger["metadata"]["query"]
            assert set(METRIC_NAME.findall(query)) <= exported_series(), query
            assert set(re.findall(r'sluice_io_pool="([a-z]+)"', query)) <= pools


def _targets(autoscaler: Obj) -> list[str]:
    """The target values of an HPA or a ScaledObject, in a comparable form."""
    if autoscaler["kind"] == "ScaledObject":
        return sorted(
            t["metadata"].get("threshold", t["metadata"].get("value", ""))
            for t in autoscaler["spec"]["triggers"]
        )
    values = []
    for metric in autoscaler["spec"]["metrics"]:
        target = metric[metric["type"].lower()]["target"]
        raw = str(target.get("averageValue", target.get("value", target.get("averageUtilization"))))
        values.append(f"{int(raw[:-1]) / 1000:g}" if raw.endswith("m") else raw)  # 300m: 0.3
    return sorted(values)


def test_hpa_and_keda_scale_on_the_same_targets() -> None:
    """The two autoscaling alternatives agree on targets and bounds for every workload."""
    hpa = _autoscaled_workloads(build("prod"))
    keda = _autoscaled_workloads(build("prod-keda"))
    assert hpa.keys() == keda.keys()
    for name, h in hpa.items():
        k = keda[name]
        assert _targets(h) == _targets(k), name
        assert h["spec"]["maxReplicas"] == k["spec"]["maxReplicaCount"], name
        h_behavior = h["spec"]["behavior"]
        assert k["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == h_behavior


@pytest.mark.parametrize("overlay", PROD_OVERLAYS)
def test_every_pool_and_the_schedulers_autoscale(overlay: str) -> None:
    """Schedulers and each node pool have an autoscaler, and their manifests leave
    ``spec.replicas`` out: the autoscaler owns it, and a count in the manifest would be put
    back by every ``kubectl apply`` (KEDA's finetune pool woken from 0 to 1)."""
    objects = build(overlay)
    scaled = _autoscaled_workloads(objects)
    targets = set()
    for workload in of_kind(objects, "Deployment", "StatefulSet"):
        name = workload["metadata"]["name"]
        if name in scaled:
            assert "replicas" not in workload["spec"], name
            targets.add(name)
    assert targets == {
        "sluice-scheduler",
        "sluice-node-realtime",
        "sluice-node-finetune",
        "sluice-node-shared",
    }


@pytest.mark.parametrize("overlay", PROD_OVERLAYS)
def test_scale_down_gives_every_node_its_drain(overlay: str) -> None:
    """Nodes are removed one at a time, no faster than one termination grace period (which
    covers the node's drain), after a stabilization window; scale-up is not delayed."""
    objects = build(overlay)
    for name, autoscaler in _autoscaled_workloads(objects).items():
        spec = autoscaler["spec"]
        behavior = (
            spec.get("behavior") or spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        )
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
        down = behavior["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300 and down["selectPolicy"] == "Min"
        if not name.startswith("sluice-node-"):
            continue
        grace = pod_spec(named(objects, "StatefulSet", name))["terminationGracePeriodSeconds"]
        for policy in down["policies"]:
            assert policy["type"] == "Pods" and policy["value"] == 1
            assert policy["periodSeconds"] >= grace


@pytest.mark.parametrize("overlay", ("dev", *PROD_OVERLAYS))
def test_nodes_drain_on_sigterm_within_their_grace(overlay: str) -> None:
    """The kubelet's SIGTERM is the node's drain: preStop only pauses a few seconds (a hook
    that signalled PID 1 itself would be killed when PID 1 exits: FailedPreStopHook), and the
    grace period, which counts from before preStop, covers the pause, the drain's grace, the
    server's stop and a margin."""
    checked = 0
    for sts in of_kind(build(overlay), "StatefulSet"):
        if not sts["metadata"]["name"].startswith("sluice-node-"):
            continue
        spec = pod_spec(sts)
        node = spec["containers"][0]
        command = node["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        pause = float(command[1])
        assert pause <= 10
        drain = float(env(node)["SLUICE_DRAIN_GRACE_SECONDS"]["value"])
        assert spec["terminationGracePeriodSeconds"] >= pause + drain + 20
        checked += 1
    assert checked


def _etcd_users() -> ModuleType:
    spec = importlib.util.spec_from_file_location("etcd_users", DEPLOY / "base" / "etcd_users.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_etcd_users_are_the_stateful_set_pods() -> None:
    """``<statefulset>=<n>`` becomes the pod names of ordinals 0..n-1."""
    assert _etcd_users().node_ids("sluice-node-a=2 sluice-node-b=1") == [
        "sluice-node-a-0",
        "sluice-node-a-1",
        "sluice-node-b-0",
    ]


@pytest.mark.parametrize("overlay", ("dev", *PROD_OVERLAYS))
def test_etcd_has_a_user_for_every_node_an_autoscaler_may_start(overlay: str) -> None:
    """The etcd users Job lists every node StatefulSet with at least as many ordinals as it
    may ever have (its autoscaler's maximum, else its replicas)."""
    objects = build(overlay)
    job = named(objects, "Job", "sluice-etcd-users")
    counts = {}
    for entry in env(job["spec"]["template"]["spec"]["containers"][0])["SLUICE_NODE_POOLS"][
        "value"
    ].split():
        name, _, count = entry.partition("=")
        counts[name] = int(count)
    scaled = _autoscaled_workloads(objects)
    nodes = [
        s
        for s in of_kind(objects, "StatefulSet")
        if s["metadata"]["name"].startswith("sluice-node-")
    ]
    assert {s["metadata"]["name"] for s in nodes} == counts.keys()
    for sts in nodes:
        name = sts["metadata"]["name"]
        spec = scaled[name]["spec"] if name in scaled else {"maxReplicas": sts["spec"]["replicas"]}
        most = spec.get("maxReplicas", spec.get("maxReplicaCount"))
        assert counts[name] >= most, name


def test_deploy_doc_cites_measured_figures_that_exist() -> None:
    """docs/deploy.md explains each autoscaling target and cites result files that exist."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    cited = set(re.findall(r"bench/results/[\w./-]+\.(?:md|json)", doc))
    assert cited and all((ROOT / path).is_file() for path in cited), cited
    for target in (
        "sluice_node_sequences_in_flight",
        "sluice_scheduler_predicted_queue_wait_mean_seconds",
        "sluice_scheduler_requests_per_second",
        "sluice_scheduler_finetune_jobs_open",
    ):
        assert target in doc
