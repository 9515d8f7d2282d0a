"""What the monitoring tests share: the metrics the services export (read from the code), the
expressions of the rules and the dashboards, and the selectors inside a PromQL expression.

The catalogue is derived from the source, not written by hand: every ``Counter``, ``Gauge``,
``Histogram`` and ``*MetricFamily`` (collectors read at scrape time) constructed with a literal
``sluice_*`` name, with the names prometheus_client exposes (``_total`` for counters;
``_bucket``, ``_sum``, ``_count`` for histograms) and its label names (``labelnames`` or a
family's ``labels``, by keyword or position). Names from outside the services' own code are
listed explicitly with their source: ``PROCESS`` (prometheus_client) and ``DCGM`` (NVIDIA).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
RULES_FILE = MONITORING / "rules" / "sluice.rules.yaml"
DASHBOARDS_DIR = MONITORING / "dashboards"
PRODUCT = ("scheduler", "inference_node", "cache_service", "sluice")

TARGET_LABELS = frozenset({"job", "instance", "node"})
"""Labels Prometheus adds to every scraped series (``node``: ``sluice up --observe`` names
each node target)."""
DCGM = {
    name: frozenset({"gpu", "UUID", "device", "modelName", "Hostname", "pci_bus_id"})
    for name in ("DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_UTIL")
}
"""NVIDIA's DCGM exporter (not Sluice's): framebuffer free and used (MiB), GPU utilisation
(%)."""
PROCESS = dict.fromkeys(
    (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ),
    frozenset(),
)
"""prometheus_client's ``ProcessCollector`` (Linux), registered on a service's registry in
``sluice/runtime/runner.py`` (``run_service``): CPU seconds, memory, file descriptors, start
time of the process, no labels. With DCGM's and ``up``, the only names outside the ``sluice_*``
catalogue allowed in rules and dashboards (tests/test_monitoring_rules.py checks the list
against prometheus_client)."""
GPU_ONLY = frozenset(
    {
        "sluice_node_gpu_free_bytes",
        "sluice_node_gpu_total_bytes",
        "sluice_node_gpu_utilization_ratio",
    }
)
"""Exported by nodes on CUDA only (inference_node/metrics.py): absent on a CPU machine."""

_KINDS = {
    "Counter": "counter",
    "CounterMetricFamily": "counter",
    "Gauge": "gauge",
    "GaugeMetricFamily": "gauge",
    "Histogram": "histogram",
    "HistogramMetricFamily": "histogram",
}


def _labels(call: ast.Call, family: bool) -> frozenset[str]:
    """Label names of a metric constructor call (a literal list, or none)."""
    value: ast.expr | None = None
    for kw in call.keywords:
        if kw.arg in ("labelnames", "labels"):
            value = kw.value
    index = 3 if family else 2
    if value is None and len(call.args) > index:
        value = call.args[index]
    if isinstance(value, ast.List | ast.Tuple):
        return frozenset(e.value for e in value.elts if isinstance(e, ast.Constant))
    return frozenset()


def exported_metrics() -> dict[str, frozenset[str]]:
    """Every series name the services expose → its label names (Prometheus' target labels
    not included)."""
    out: dict[str, frozenset[str]] = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "v1" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                first = node.args[0]
                if name not in _KINDS or not isinstance(first, ast.Constant):
                    continue
                if not isinstance(first.value, str) or not first.value.startswith("sluice_"):
                    continue
                labels = _labels(node, name.endswith("MetricFamily"))
                out.update(_series(first.value, _KINDS[name], labels))
    return out


def _series(name: str, kind: str, labels: frozenset[str]) -> dict[str, frozenset[str]]:
    if kind == "counter":
        return {name.removesuffix("_total") + "_total": labels}
    if kind == "histogram":
        return {
            f"{name}_bucket": labels | {"le"},
            f"{name}_sum": labels,
            f"{name}_count": labels,
        }
    return {name: labels}


def rules() -> list[dict[str, str]]:
    """Every rule of the rules file (``record`` or ``alert``, ``expr``, ...)."""
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def recorded() -> frozenset[str]:
    """Names the recording rules make."""
    return frozenset(r["record"] for r in rules() if "record" in r)


@dataclass(frozen=True)
class PanelQuery:
    """One query of one dashboard panel."""

    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def where(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def dashboard_queries() -> list[PanelQuery]:
    """Every PromQL expression of the committed dashboards."""
    out = []
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append(PanelQuery(path.stem, panel["title"], target["refId"], target["expr"]))
    return out


def concrete(expr: str, rate_interval: str = "1m", range_: str = "1h") -> str:
    """``expr`` with Grafana's variables replaced, as Grafana would send it."""
    return expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)


@dataclass(frozen=True)
class Selector:
    """A vector selector inside an expression."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]
    """(label, operator, value) as written."""

    @property
    def promql(self) -> str:
        inner = ",".join(f'{label}{op}"{value}"' for label, op, value in self.matchers)
        return f"{self.name}{{{inner}}}" if inner else self.name


_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"'  # a string
    r"|\[[^\]]*\]"  # a range or subquery
    r"|(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\{[^}]*\})?"  # an identifier, maybe with matchers
    r"|(\{[^}]*\})"  # matchers without a name
)
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "atan2", "inf", "nan", "Inf", "NaN"}
)


def grouping_labels(expr: str) -> set[str]:
    """Labels named in ``by``/``without``/``on``/``ignoring``/``group_*`` clauses."""
    return {
        label.strip()
        for _, inside in _GROUPING.findall(expr)
        for label in inside.split(",")
        if label.strip()
    }


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of ``expr`` (functions, keywords, numbers, durations, strings and
    grouping clauses left out). A selector without a metric name raises ``ValueError``."""
    text = _GROUPING.sub(" ", expr)
    out = []
    for m in _TOKEN.finditer(text):
        name, braces, bare = m.group(1), m.group(2), m.group(3)
        if bare:
            raise ValueError(f"selector without a metric name in {expr!r}")
        if not name or name in _KEYWORDS:
            continue
        if text[m.end() :].lstrip().startswith("(") and not braces:
            continue  # a function or an aggregation
        matchers = tuple(_MATCHER.findall(braces or ""))
        out.append(Selector(name, matchers))
    return out
