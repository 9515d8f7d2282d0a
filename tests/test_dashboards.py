"""Dashboards as code (deploy/monitoring/dashboards): the committed JSON and PrometheusRule are
what the generator makes, every query parses and uses only exported metrics and labels, the
seed article's four panels are there, and kustomize ships them all."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from tests.monitoring_catalog import (
    DASHBOARDS_DIR,
    DCGM,
    MONITORING,
    PROCESS,
    RULES_FILE,
    TARGET_LABELS,
    concrete,
    dashboard_queries,
    exported_metrics,
    grouping_labels,
    recorded,
    selectors,
)


def _generator() -> ModuleType:
    path = DASHBOARDS_DIR / "generate.py"
    spec = importlib.util.spec_from_file_location("sluice_monitoring_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _boards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS_DIR.glob("*.json"))}


def test_committed_files_are_what_the_generator_makes() -> None:
    """Every dashboard JSON and prometheusrule.yaml equals the generator's output (run
    deploy/monitoring/dashboards/generate.py after changing a panel or a rule), and no stray
    JSON lies beside them."""
    outputs = _generator().outputs()
    for path, text in outputs.items():
        assert path.read_text() == text, f"{path} is stale: run {DASHBOARDS_DIR / 'generate.py'}"
    assert set(DASHBOARDS_DIR.glob("*.json")) == {p for p in outputs if p.suffix == ".json"}


def test_the_prometheus_rule_wraps_the_rules_file_unchanged() -> None:
    """The PrometheusRule's groups are the rules file's groups."""
    resource = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]


def test_kustomize_ships_the_rule_and_every_dashboard_with_the_sidecar_label() -> None:
    """kustomization.yaml lists the PrometheusRule and one ConfigMap per dashboard file,
    labelled grafana_dashboard=1."""
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert "prometheusrule.yaml" in kustomization["resources"]
    files = {f for gen in kustomization["configMapGenerator"] for f in gen["files"]}
    assert files == {f"dashboards/{name}" for name in _boards()}
    assert kustomization["generatorOptions"]["labels"] == {"grafana_dashboard": "1"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds_the_monitoring_resources() -> None:
    """`kubectl kustomize deploy/monitoring` builds: a PrometheusRule and the ConfigMaps."""
    done = subprocess.run(
        ["kubectl", "kustomize", str(MONITORING)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(done.stdout))
    assert kinds == ["ConfigMap"] * len(_boards()) + ["PrometheusRule"]


def test_the_seed_articles_four_panels_are_on_the_overview() -> None:
    """Request heatmap by endpoint, resource use against request volume (on a second axis),
    error types as a pie, SLA attainment as a gauge."""
    panels = {p["title"]: p for p in _boards()["sluice-overview.json"]["panels"]}
    assert panels["Requests by endpoint"]["type"] == "heatmap"
    assert "by (method)" in panels["Requests by endpoint"]["targets"][0]["expr"]
    resources = panels["Resource use against request volume"]
    assert resources["type"] == "timeseries"
    assert any(
        prop == {"id": "custom.axisPlacement", "value": "right"}
        for o in resources["fieldConfig"]["overrides"]
        for prop in o["properties"]
    )
    assert panels["Error types"]["type"] == "piechart"
    assert panels["SLA attainment"]["type"] == "gauge"


def test_every_dashboard_has_a_unique_uid_and_the_data_source_variable() -> None:
    """Dashboards import side by side and follow the chosen Prometheus."""
    boards = _boards().values()
    assert len({b["uid"] for b in boards}) == len(boards)
    for board in boards:
        variables = board["templating"]["list"]
        assert [(v["name"], v["type"], v["query"]) for v in variables] == [
            ("datasource", "datasource", "prometheus")
        ]
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_use_only_exported_metrics_and_their_labels() -> None:
    """Every selector of every panel names an exported series (or a recording rule's, the
    process collector's, or DCGM's) with labels it has, and every grouping clause a label of
    the expression's series."""
    exported = exported_metrics()
    known = {**exported, **PROCESS, **DCGM} | dict.fromkeys(recorded(), frozenset())
    problems = []
    queries = dashboard_queries()
    assert len(queries) > 40
    for q in queries:
        labels = set(TARGET_LABELS)
        for sel in selectors(concrete(q.expr)):
            if sel.name not in known:
                problems.append(f"{q.where}: {sel.name} is not exported")
                continue
            labels |= known[sel.name]
            problems += [
                f"{q.where}: {sel.name} has no label {label}"
                for label, _, _ in sel.matchers
                if label not in known[sel.name] | TARGET_LABELS
            ]
        problems += [f"{q.where}: no label {lab}" for lab in grouping_labels(q.expr) - labels]
    assert problems == []


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses every panel's query (as recording rules, Grafana's variables filled)."""
    group = {
        "name": "dashboards",
        "rules": [
            {"record": f"dashboard:query:{i}", "expr": concrete(q.expr)}
            for i, q in enumerate(dashboard_queries())
        ],
    }
    path = tmp_path / "dashboards.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    done = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_generator_checks_staleness_from_the_command_line() -> None:
    """`generate.py --check` exits 0 on a fresh checkout (what CI would run)."""
    done = subprocess.run(
        [sys.executable, str(DASHBOARDS_DIR / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
