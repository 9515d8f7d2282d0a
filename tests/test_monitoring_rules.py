"""The alert and recording rules (deploy/monitoring/rules): valid, unit-tested with promtool,
every alert both fired and held back by a test, and built only from exported metrics."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict

import pytest
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector

from tests.monitoring_catalog import (
    DCGM,
    MONITORING,
    PROCESS,
    ROOT,
    RULES_FILE,
    TARGET_LABELS,
    exported_metrics,
    grouping_labels,
    recorded,
    rules,
    selectors,
)

RULE_TESTS = sorted((MONITORING / "rules" / "tests").glob("*.yaml"))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (apt-get install prometheus; `make test` installs it)",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_accepts_the_rules_file() -> None:
    """`promtool check rules` passes: PromQL parses, templates render, names are unique."""
    done = _promtool("check", "rules", str(RULES_FILE))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_every_rule_unit_test_passes() -> None:
    """`promtool test rules` passes on every test file (alerts fire and stay quiet where they
    should, with their exact labels and annotations)."""
    assert RULE_TESTS
    done = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """Each alert of the rules file is expected to fire in some unit test and expected silent
    (``exp_alerts: []``) in another evaluation."""
    fired: dict[str, int] = defaultdict(int)
    quiet: dict[str, int] = defaultdict(int)
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet)[check["alertname"]] += 1
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts - set(fired) == set(), "never fired"
    assert alerts - set(quiet) == set(), "never expected silent"
    assert set(fired) | set(quiet) <= alerts, "tests of alerts that do not exist"


def test_the_rules_use_only_exported_metrics_and_their_labels() -> None:
    """Every selector names a series the services export (or a recording rule, ``up``, or
    DCGM's, or the process collector's), matches only labels it has (plus job, instance, node),
    and every ``by``/``on`` clause names a label of a series in the expression."""
    exported = exported_metrics()
    known = {**exported, **PROCESS, **DCGM, "up": frozenset()} | dict.fromkeys(
        recorded(), frozenset()
    )
    problems = []
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        found = selectors(rule["expr"])
        assert found, name
        labels = set(TARGET_LABELS)
        for sel in found:
            if sel.name not in known:
                problems.append(f"{name}: {sel.name} is not exported")
                continue
            labels |= known[sel.name]
            for label, _, _ in sel.matchers:
                if label not in known[sel.name] | TARGET_LABELS:
                    problems.append(f"{name}: {sel.name} has no label {label}")
        problems += [
            f"{name}: no series here has label {lab}"
            for lab in grouping_labels(rule["expr"]) - labels
        ]
    assert problems == []


def test_severity_and_summary_on_every_alert() -> None:
    """Routing needs a severity (critical pages, warning tickets) and people need a summary."""
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"critical", "warning"} or "{{" in str(
                rule["labels"]["severity"]
            ), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_the_process_metrics_allowed_are_what_the_services_process_collector_exports() -> None:
    """``PROCESS`` lists exactly the series prometheus_client's ProcessCollector exposes (on
    Linux), without labels, and the services' runner registers that collector."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    samples = {s.name: frozenset(s.labels) for m in registry.collect() for s in m.samples}
    assert samples == PROCESS
    runner = (ROOT / "sluice" / "runtime" / "runner.py").read_text()
    assert "ProcessCollector(registry=registry)" in runner
