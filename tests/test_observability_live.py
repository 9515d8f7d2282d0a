"""Dashboards and alerts proven against real data: a real Prometheus (Debian's binary, started
the way `sluice up --observe` starts it) scrapes a real `sluice up` suite (tiny model, one
node) every second and evaluates the rules every second. After real traffic (generations,
streams of many chunks, cache hits, a refused and an invalid call, a batch job, a fine-tune),
a flood past the queue
threshold and a killed node, every dashboard query and every rule expression runs through
Prometheus' HTTP API and must return series, and the induced conditions fire their alerts.

Narrow exemptions, each only when the series is really absent: the node's CUDA gauges
(``GPU_ONLY``) and DCGM's metrics on a CPU machine, and two counters that need two nodes and a
failure between them (``NEEDS_TWO_NODES``). An alert condition that is legitimately empty
(nothing is wrong) is checked selector by selector instead, each selector with its labels or,
for a label value only the condition brings (``result="fail_open"``), by its metric name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluice import FINAL_JOB_STATES, Client, SluiceRpcError, WorkloadClass, generate_line
from sluice.local.observe import ObserveConfig, PrometheusProcess, start_prometheus
from sluice.local.up import Supervisor, UpConfig
from sluice.runtime.auth import hash_api_key, new_api_key
from sluice.v1 import jobs_pb2
from tests.monitoring_catalog import (
    DCGM,
    GPU_ONLY,
    RULES_FILE,
    Selector,
    concrete,
    dashboard_queries,
    rules,
    selectors,
)

pytestmark = [
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="no prometheus binary (apt-get install prometheus; `make test` installs it)",
    ),
    pytest.mark.timeout(300),
]

MODEL = "tiny-random-llama"
QUEUE_THRESHOLD = 3
"""The queue alert's threshold in this test (1,000 in production)."""
NEEDS_TWO_NODES = frozenset(
    {"sluice_scheduler_retries_total", "sluice_scheduler_outlier_ejections_total"}
)
"""Labelled by node and only created by a retry onto another node or an outlier ejection."""
EXEMPT = GPU_ONLY | set(DCGM) | NEEDS_TWO_NODES
INDUCED = ("SluiceQueueBacklog", "SluiceNodeDown", "SluiceNoServingNode")


# -- the suite and its Prometheus ------------------------------------------------------------


def _test_rules(path: Path) -> Path:
    """The production rules with the induced alerts made quick: the queue threshold lowered
    to QUEUE_THRESHOLD and their ``for`` dropped (everything else, recording rules included,
    as shipped)."""
    doc = yaml.safe_load(RULES_FILE.read_text())
    changed = set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in INDUCED:
                rule["for"] = "0s"
                changed.add(rule["alert"])
            if rule.get("alert") == "SluiceQueueBacklog":
                expr = re.sub(r">\s*1000\b", f"> {QUEUE_THRESHOLD}", rule["expr"])
                assert expr != rule["expr"], "the queue rule no longer compares with 1000"
                rule["expr"] = expr
    assert changed == set(INDUCED)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _tenants(path: Path) -> dict[str, str]:
    """Two tenants with (generous) quotas, so quota checks reach Redis; returns their keys."""
    keys = {"alpha": new_api_key(), "beta": new_api_key()}
    doc = {
        "tenants": [
            {
                "name": name,
                "api_key_hashes": [hash_api_key(key)],
                "admin": name == "alpha",
                "quotas": {"requests_per_second": 500, "burst": 500},
            }
            for name, key in keys.items()
        ]
    }
    path.write_text(yaml.safe_dump(doc))
    return keys


class Live:
    """The running suite, its Prometheus, and the tenants' keys."""

    def __init__(self, sup: Supervisor, prometheus: PrometheusProcess, keys: dict[str, str]):
        self.sup = sup
        self.prometheus = prometheus
        self.keys = keys
        self.started = time.time()
        assert sup.endpoints is not None
        self.address = sup.endpoints.scheduler["grpc"]

    def client(self, tenant: str = "alpha", timeout_s: float = 60) -> Client:
        return Client(self.address, api_key=self.keys[tenant], retry=None, timeout_s=timeout_s)

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.prometheus.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def series(self, expr: str) -> list[dict[str, Any]]:
        """``expr`` over the whole test, one point a second: every series it had."""
        now = time.time()
        result = self.api(
            "query_range",
            query=expr,
            start=f"{self.started:.3f}",
            end=f"{now:.3f}",
            step="1",
        )["result"]
        return list(result)

    def firing(self) -> set[str]:
        return {
            a["labels"]["alertname"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"
        }


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    """`sluice up` (tiny model, one node of two sequences, plaintext) and a Prometheus
    scraping it every second with the test rules, started as `--observe` starts it."""
    keys = _tenants(tmp_path / "tenants.yaml")
    config = UpConfig(
        run_dir=tmp_path / "run",
        models=[MODEL],
        tenants_file=tmp_path / "tenants.yaml",
        max_sequences=2,
        insecure=True,
        startup_timeout_s=120,
        grace_s=3,
    )
    sup = Supervisor(config)
    prometheus = None
    try:
        endpoints = sup.start()
        observe = ObserveConfig(
            scrape_interval_s=1,
            evaluation_interval_s=1,
            rule_files=[_test_rules(tmp_path / "rules.yaml")],
        )
        prometheus = start_prometheus(endpoints, sup.run_dir, observe)
        yield Live(sup, prometheus, keys)
    finally:
        if prometheus is not None:
            prometheus.stop()
        sup.stop()


def eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f}s: {what}"
        time.sleep(0.25)


# -- traffic ---------------------------------------------------------------------------------


def _generate(client: Client, prompt: str, **options: Any) -> str:
    return "".join(c.text for c in client.generate(MODEL, prompt, **options))


def serve_traffic(live: Live) -> None:
    """Generations of both tenants and classes, long REALTIME streams (many chunks, so
    inter-token times), repeated greedy prompts (cache hits), an invalid call."""
    alpha, beta = live.client("alpha"), live.client("beta")
    for i in range(3):
        _generate(alpha, f"hello {i}", max_new_tokens=8)
        _generate(beta, f"batch {i}", max_new_tokens=8, workload_class=WorkloadClass.BATCH)
    for i in range(2):  # the node sends a chunk per 20 ms at most: 64 tokens make several
        _generate(
            alpha, f"a long answer {i}", max_new_tokens=64, ignore_eos=True, cache_bypass=True
        )
    for _ in range(3):  # the first stores (in the background), the next ones hit
        _generate(alpha, "the same greedy prompt", max_new_tokens=8)
        time.sleep(0.3)
    with pytest.raises(SluiceRpcError):  # INVALID_ARGUMENT from the scheduler
        "".join(c.text for c in alpha.generate("no-such-model", "hi", max_new_tokens=4))


def run_jobs(live: Live) -> None:
    """A batch job and a small fine-tune to completion, generations beside the training."""
    client = live.client("alpha")
    lines = [generate_line(f"l{i}", MODEL, f"job line {i}", max_new_tokens=6) for i in range(4)]
    batch = client.submit_job(lines)
    examples = [{"prompt": f"Q{i}?", "completion": f"A{i}."} for i in range(6)]
    tune = client.submit_finetune(
        examples,
        base_model=MODEL,
        adapter_name="probe",
        max_steps=3,
        checkpoint_every_steps=1,
        rank=4,
        max_sequence_tokens=64,
    )
    deadline = time.monotonic() + 90
    states = {}
    while time.monotonic() < deadline:
        states = {j: client.get_job(j).state for j in (batch.job_id, tune.job_id)}
        if set(states.values()) <= FINAL_JOB_STATES:
            break
        _generate(client, "beside the training", max_new_tokens=16, cache_bypass=True)
    assert set(states.values()) <= FINAL_JOB_STATES, states
    finished = {j: client.get_job(j) for j in states}
    assert all(j.state == jobs_pb2.JOB_STATE_COMPLETED for j in finished.values()), finished


def flood(live: Live, stop: threading.Event) -> ThreadPoolExecutor:
    """Long BATCH generations, more than the node's two slots and the queue threshold."""
    pool = ThreadPoolExecutor(max_workers=12)

    def one(i: int) -> None:
        client = live.client("beta" if i % 2 else "alpha", timeout_s=120)
        while not stop.is_set():  # a refused caller comes back: the queue stays full
            try:
                for _ in client.generate(
                    MODEL,
                    f"flood {i}",
                    max_new_tokens=1000,
                    ignore_eos=True,
                    cache_bypass=True,
                    workload_class=WorkloadClass.BATCH,
                ):
                    if stop.is_set():
                        return
            except SluiceRpcError:  # refused, or cut by the node kill: both expected
                stop.wait(0.2)

    for i in range(12):
        pool.submit(one, i)
    return pool


# -- the checks ------------------------------------------------------------------------------


def _empty_selectors(
    live: Live, found: list[Selector], by_name: bool, notes: list[str]
) -> list[str]:
    """The selectors with no series (by metric name alone when ``by_name``); exempt ones are
    left out, and what was let through is noted."""
    missing = []
    for sel in found:
        if live.series(sel.promql):
            continue
        if sel.name in EXEMPT:
            notes.append(f"exempt, no series: {sel.promql}")
        elif by_name and live.series(sel.name):
            notes.append(f"only the name has series: {sel.promql}")
        else:
            missing.append(sel.promql)
    return missing


def check_dashboards(live: Live, window: str, notes: list[str]) -> list[str]:
    """Every panel query returns series, and so does every selector in it."""
    problems = []
    for q in dashboard_queries():
        expr = concrete(q.expr, rate_interval="5s", range_=window)
        found = selectors(expr)
        missing = _empty_selectors(live, found, False, notes)
        if missing:
            problems.append(f"{q.where}: no series for {missing}")
        elif not live.series(expr) and not any(s.name in EXEMPT for s in found):
            problems.append(f"{q.where}: {expr} returned nothing")
    return problems


def check_rules(live: Live, notes: list[str]) -> list[str]:
    """Every recording and alerting expression returns series or, where its condition is
    simply not met, each of its selectors does; Prometheus evaluated every rule cleanly."""
    problems = []
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        if live.series(rule["expr"]):
            continue
        notes.append(f"condition not met: {name}")
        missing = _empty_selectors(live, selectors(rule["expr"]), True, notes)
        if missing:
            problems.append(f"{name}: no series for {missing}")
    for group in live.api("rules")["groups"]:
        for rule in group["rules"]:
            if rule["health"] != "ok":
                problems.append(f"{rule['name']}: {rule['health']} {rule.get('lastError')}")
    return problems


def test_every_dashboard_query_and_rule_returns_real_series_and_induced_alerts_fire(
    live: Live,
) -> None:
    """Traffic, then a flood past the queue threshold fires SluiceQueueBacklog, then killing
    the only node fires SluiceNodeDown and SluiceNoServingNode; then every dashboard query
    and every rule expression returns series from the real suite."""
    eventually(
        lambda: bool(live.series('sluice_scheduler_nodes{state="serving"} == 1')),
        15,
        "the scheduler serving with its node, scraped",
    )
    serve_traffic(live)
    eventually(
        lambda: bool(
            live.series('sluice_scheduler_inter_token_seconds_count{workload_class="realtime"} > 0')
            and live.series("sluice_node_step_seconds_count > 0")
        ),
        10,
        "REALTIME inter-token times and the node's step times, scraped",
    )
    run_jobs(live)
    eventually(  # a 3-step fine-tune can end between two scrapes, and the flood slows them
        lambda: bool(live.series("rate(sluice_node_training_units_total[5s])")),
        15,
        "the node's training units, scraped twice",
    )

    stop = threading.Event()
    pool = flood(live, stop)
    try:
        eventually(lambda: bool(live.series("sluice_scheduler_queue_depth > 0")), 20, "a queue")
        # run_jobs' jobs may end between two scrapes: one submitted into the flood stays
        # unfinished long enough for the job lag gauge to be scraped.
        lines = [
            generate_line(f"f{i}", MODEL, f"flood line {i}", max_new_tokens=6) for i in range(4)
        ]
        live.client("alpha").submit_job(lines)
        eventually(
            lambda: bool(live.series("sluice_scheduler_job_queue_lag_seconds")), 20, "job lag"
        )
        with pytest.raises(SluiceRpcError):  # predicted to wait far past its deadline
            _generate(
                live.client("alpha", timeout_s=0.3),
                "too late",
                max_new_tokens=4,
                workload_class=WorkloadClass.BATCH,
            )
        eventually(lambda: "SluiceQueueBacklog" in live.firing(), 60, "the queue alert")
    finally:
        stop.set()

    node = next(c for c in live.sup.children if c.name == "node-1")
    os.kill(node.proc.pid, signal.SIGKILL)
    eventually(
        lambda: {"SluiceNodeDown", "SluiceNoServingNode"} <= live.firing(), 60, "node alerts"
    )
    pool.shutdown(wait=False, cancel_futures=True)

    window = f"{int(time.time() - live.started) + 5}s"
    notes: list[str] = []
    problems = check_dashboards(live, window, notes) + check_rules(live, notes)
    print("\n".join(sorted(set(notes))))  # noqa: T201 - shown with -s or on failure
    assert problems == []
    exempted = {n.split(": ", 1)[1].split("{")[0] for n in notes if n.startswith("exempt")}
    assert exempted <= EXEMPT
