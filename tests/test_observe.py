"""`sluice up --observe`: Prometheus started beside the suite with Sluice's rules and scrape
jobs, its URL printed, stopped by PID with the suite; without a binary, said and skipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluice.local.observe import ObserveConfig, scrape_config, start_observer
from sluice.local.up import Endpoints
from tests.monitoring_catalog import RULES_FILE, rules, selectors

SLUICE = [sys.executable, "-c", "from sluice.cli import main; main()"]
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no prometheus binary (apt-get install prometheus; `make test` installs it)",
)


def _endpoints(tmp_path: Path) -> Endpoints:
    return Endpoints(
        scheduler={"grpc": "127.0.0.1:1", "metrics": "127.0.0.1:9101"},
        cache={"grpc": "127.0.0.1:2", "metrics": "127.0.0.1:9102"},
        nodes=[
            {"id": "node-1", "grpc": "127.0.0.1:3", "metrics": "127.0.0.1:9103"},
            {"id": "node-2", "grpc": "127.0.0.1:4", "metrics": "127.0.0.1:9104"},
        ],
        etcd="127.0.0.1:5",
        redis="redis://127.0.0.1:6/0",
        tenants_file=str(tmp_path / "tenants.yaml"),
        logs=str(tmp_path / "logs"),
    )


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)["data"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_the_scrape_jobs_are_named_as_the_alert_rules_expect(tmp_path: Path) -> None:
    """One job per role (sluice-scheduler, sluice-cache, sluice-node), every node labelled
    with its id, the scrape timeout never above the interval, the rules files listed."""
    config = scrape_config(_endpoints(tmp_path), ObserveConfig(scrape_interval_s=1), [RULES_FILE])
    jobs = {j["job_name"]: j["static_configs"] for j in config["scrape_configs"]}
    assert jobs["sluice-scheduler"] == [{"targets": ["127.0.0.1:9101"]}]
    assert jobs["sluice-cache"] == [{"targets": ["127.0.0.1:9102"]}]
    assert jobs["sluice-node"] == [
        {"targets": ["127.0.0.1:9103"], "labels": {"node": "node-1"}},
        {"targets": ["127.0.0.1:9104"], "labels": {"node": "node-2"}},
    ]
    assert config["global"]["scrape_interval"] == config["global"]["scrape_timeout"] == "1000ms"
    assert config["rule_files"] == [str(RULES_FILE)]
    job_matchers = [
        value
        for rule in rules()
        for sel in selectors(rule["expr"])
        for label, op, value in sel.matchers
        if label == "job"
    ]
    assert job_matchers  # the `up` alerts
    for regex in job_matchers:
        assert any(re.fullmatch(regex, job) for job in jobs), regex


def test_without_a_prometheus_binary_the_suite_goes_on_and_says_so(tmp_path: Path) -> None:
    """No binary: a clear message naming how to install one, and None (nothing started)."""
    said: list[str] = []
    got = start_observer(
        _endpoints(tmp_path), tmp_path, said.append, ObserveConfig(binary="no-such-prometheus")
    )
    assert got is None
    assert any("apt-get install prometheus" in m and "runs without it" in m for m in said)


@needs_prometheus
def test_the_observer_loads_the_rules_and_stops_by_pid(tmp_path: Path) -> None:
    """Started on a suite's endpoints: ready, every rule of the rules file loaded, its URL
    said; stop() ends that process."""
    said: list[str] = []
    prometheus = start_observer(_endpoints(tmp_path), tmp_path, said.append)
    assert prometheus is not None
    try:
        assert any(prometheus.url in m and str(prometheus.pid) in m for m in said)
        groups = _get(f"{prometheus.url}/api/v1/rules")["groups"]
        loaded = {r["name"] for g in groups for r in g["rules"]}
        assert loaded == {r.get("alert") or r["record"] for r in rules()}
        written = yaml.safe_load(prometheus.config_path.read_text())
        assert written["rule_files"] == [str(RULES_FILE)]
    finally:
        prometheus.stop()
    assert not _alive(prometheus.pid)


@needs_prometheus
@pytest.mark.timeout(180)
def test_sluice_up_observe_prints_a_prometheus_url_that_scrapes_the_suite(
    tmp_path: Path,
) -> None:
    """`sluice up --observe` prints Prometheus' URL; every target there (scheduler, cache,
    node) is scraped healthy; SIGTERM stops Prometheus with the suite."""
    up = subprocess.Popen(
        [*SLUICE, "up", "--observe", "--insecure", "--models", "tiny-random-llama",
         "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip
    try:
        assert up.stdout is not None
        found = None
        for line in up.stdout:
            found = re.search(r"Prometheus \(pid (\d+)\) scrapes the suite at (http://\S+)", line)
            if found or "Ctrl-C to stop" in line:
                break
        assert found, "no Prometheus URL printed"
        pid, url = int(found.group(1)), found.group(2)
        deadline = time.monotonic() + 30
        while True:
            targets = _get(f"{url}/api/v1/targets")["activeTargets"]
            health = {t["labels"]["job"]: t["health"] for t in targets}
            if health == dict.fromkeys(("sluice-scheduler", "sluice-cache", "sluice-node"), "up"):
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.5)
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        assert not _alive(pid)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
