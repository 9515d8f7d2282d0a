"""`sluice top`: a live view of the fleet from the Admin API and the scheduler's ``/metrics``.

:func:`collect` takes a :class:`Sample` (nodes with health, circuit and load; tenant usage;
every ``sluice_`` sample of the scheduler's metrics); :func:`render` draws one frame from the
latest sample and the one before it, computing rates from counter deltas between the two.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sluice import Client, SluiceRpcError
from sluice.contract import WorkloadClass
from sluice.v1 import admin_pb2, common_pb2

Labels = frozenset[tuple[str, str]]
CLASSES = tuple(cls.label for cls in WorkloadClass)
OUTCOMES = ("ok", "cached", "refused", "failed")


@dataclass
class Sample:
    """What the fleet looked like at one moment."""

    at: float
    """``time.monotonic()`` when the sample was taken."""
    nodes: list[admin_pb2.NodeStatus] | None = None
    """``Admin.ListNodes``; None when it failed."""
    usage: list[admin_pb2.TenantUsage] = field(default_factory=list)
    """``Admin.GetTenantUsage`` of each tenant asked for (that answered)."""
    metrics: dict[tuple[str, Labels], float] | None = None
    """Every ``sluice_`` sample of the scheduler's ``/metrics``; None when not scraped."""
    errors: list[str] = field(default_factory=list)
    """What could not be fetched, for the footer."""

    def total(self, name: str, **labels: str) -> float | None:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        if self.metrics is None:
            return None
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.metrics.items() if n == name and wanted <= ls)


def scrape(address: str, timeout_s: float = 2.0) -> dict[tuple[str, Labels], float]:
    """Every ``sluice_`` sample at ``http://<address>/metrics`` (proxies bypassed)."""
    # prometheus_client comes with the server extra; `sluice top` without it shows no rates.
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{address}/metrics", timeout=timeout_s) as response:
        body = response.read().decode()
    out: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name.startswith("sluice_"):
                out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def collect(
    client: Client,
    metrics_address: str | None,
    tenants: Sequence[str] = ("",),
    clock: Callable[[], float] = time.monotonic,
) -> Sample:
    """One sample; failures are recorded in ``errors``, not raised."""
    sample = Sample(at=clock())
    try:
        sample.nodes = client.list_nodes()
    except SluiceRpcError as exc:
        sample.errors.append(f"ListNodes: {exc.code.name}: {exc.message}")
    for tenant in tenants:
        try:
            sample.usage.append(client.get_tenant_usage(tenant))
        except SluiceRpcError as exc:
            sample.errors.append(f"GetTenantUsage({tenant or 'own'}): {exc.code.name}")
    if metrics_address:
        try:
            sample.metrics = scrape(metrics_address)
        except OSError as exc:
            sample.errors.append(f"metrics {metrics_address}: {exc}")
        except ImportError:  # no prometheus_client: the server extra is not installed
            sample.errors.append(f"metrics {metrics_address}: install sluice[server] for rates")
    return sample


def rate(cur: Sample, prev: Sample | None, name: str, **labels: str) -> float | None:
    """Per-second increase of a counter between two samples (a reset counts from zero)."""
    if prev is None or cur.at <= prev.at:
        return None
    now, before = cur.total(name, **labels), prev.total(name, **labels)
    if now is None or before is None:
        return None
    delta = now - before if now >= before else now
    return delta / (cur.at - prev.at)


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def _class_label(value: int) -> str:
    """Label of a reported class; unspecified (0), which nodes never report, keeps its own row."""
    if value == common_pb2.WORKLOAD_CLASS_UNSPECIFIED:
        return "unspecified"
    return WorkloadClass(value).label


def _health(node: admin_pb2.NodeStatus) -> Text:
    if not node.healthy:
        return Text("unhealthy", "red")
    if node.ejected:
        return Text("ejected", "red")  # a latency outlier, kept out of routing for now
    return Text("healthy", "green")


def nodes_table(sample: Sample) -> Table:
    """One row per node: state, health, circuit, load."""
    table = Table(title="nodes", title_justify="left")
    for col in ("node", "state", "health", "circuit", "in flight", "running", "waiting"):
        table.add_column(col)
    for col in ("queued tok", "KV used", "tok/s", "TTFT", "score", "RSS MiB", "GPU"):
        table.add_column(col, justify="right")
    for n in sample.nodes or []:
        load = n.load
        running = sum(c.running for c in load.classes)
        waiting = sum(c.waiting for c in load.classes)
        kv = (
            f"{100 * load.kv_used_bytes / load.kv_budget_bytes:.0f}%"
            if load.kv_budget_bytes
            else "–"
        )
        gpu = "–"
        if load.gpu_total_bytes:
            used = 1 - load.gpu_free_bytes / load.gpu_total_bytes
            util = load.gpu_utilization_percent
            gpu = f"mem {100 * used:.0f}%" + (f" util {util:.0f}%" if util >= 0 else "")
        draining = n.info.state == common_pb2.NODE_STATE_DRAINING
        circuit = admin_pb2.CircuitState.Name(n.circuit).removeprefix("CIRCUIT_STATE_").lower()
        table.add_row(
            n.info.node_id,
            Text("draining", "yellow") if draining else Text("serving", "green"),
            _health(n),
            Text(circuit, "green" if circuit == "closed" else "red"),
            str(n.in_flight),
            str(running),
            str(waiting),
            str(load.queued_tokens),
            kv,
            f"{load.decode_tokens_per_s:.1f}",
            f"{n.ttft_seconds:.3f}s" if n.ttft_seconds else "–",
            f"{n.load_score:.2f}",
            f"{load.rss_bytes / 2**20:.0f}",
            gpu,
        )
    return table


def classes_table(cur: Sample, prev: Sample | None) -> Table:
    """Queues and request rates by workload class."""
    table = Table(title="by class", title_justify="left")
    table.add_column("class")
    for col in ("running", "waiting", "sched. queued", *(f"{o}/s" for o in OUTCOMES)):
        table.add_column(col, justify="right")
    table.add_column("TTFT mean", justify="right")
    counts: dict[str, list[int]] = {c: [0, 0] for c in CLASSES}
    for n in cur.nodes or []:
        for c in n.load.classes:
            row = counts.setdefault(_class_label(c.workload_class), [0, 0])
            row[0] += c.running
            row[1] += c.waiting
    queued = _scheduler_queues(cur)
    for cls, (running, waiting) in counts.items():
        rates = [
            _num(rate(cur, prev, "sluice_scheduler_requests_total", workload_class=cls, outcome=o))
            for o in OUTCOMES
        ]
        ttft = _mean_over_interval(cur, prev, "sluice_scheduler_time_to_first_token_seconds", cls)
        table.add_row(
            cls,
            str(running),
            str(waiting),
            _queued(queued, cls),
            *rates,
            _num(ttft, "{:.3f}s"),
        )
    return table


def _scheduler_queues(sample: Sample, by: str = "workload_class") -> dict[str, float] | None:
    """Requests queued in the scheduler by class, from the ``sluice_scheduler_queue*`` gauges
    labelled that way; None when there is no such gauge."""
    out: dict[str, float] | None = None
    counters_and_histograms = ("_total", "_sum", "_count", "_bucket", "_created")
    for (name, labels), value in (sample.metrics or {}).items():
        if not name.startswith("sluice_scheduler_queue") or name.endswith(counters_and_histograms):
            continue
        key = dict(labels).get(by)
        if key is not None:
            out = out if out is not None else {}
            out[key] = out.get(key, 0.0) + value
    return out


def _queued(queues: dict[str, float] | None, key: str) -> str:
    return "–" if queues is None else f"{queues.get(key, 0.0):.0f}"


def _mean_over_interval(cur: Sample, prev: Sample | None, histogram: str, cls: str) -> float | None:
    count = rate(cur, prev, histogram + "_count", workload_class=cls)
    total = rate(cur, prev, histogram + "_sum", workload_class=cls)
    if not count or total is None:
        return None
    return total / count


def tenants_table(cur: Sample, prev: Sample | None) -> Table:
    """Usage per tenant, with the request rate since the previous sample."""
    table = Table(title="tenants", title_justify="left")
    table.add_column("tenant")
    for col in ("weight", "in flight", "queued", "requests", "req/s", "refused"):
        table.add_column(col, justify="right")
    table.add_column("refused by reason")
    for col in ("prompt tok", "completion tok", "cache hits"):
        table.add_column(col, justify="right")
    before = {u.tenant: u for u in prev.usage} if prev is not None else {}
    for u in cur.usage:
        old = before.get(u.tenant)
        req_rate = None
        if old is not None and prev is not None and cur.at > prev.at:
            req_rate = max(0, u.requests - old.requests) / (cur.at - prev.at)
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(u.refused_by_reason.items()) if n)
        table.add_row(
            u.tenant,
            f"{u.weight:g}" if u.weight else "–",
            str(u.in_flight),
            str(u.queued),
            str(u.requests),
            _num(req_rate),
            str(u.refused),
            reasons or "–",
            str(u.prompt_tokens),
            str(u.completion_tokens),
            str(u.cache_hits),
        )
    return table


def summary(cur: Sample, prev: Sample | None) -> Text:
    """One line of scheduler-wide figures from the metrics."""
    if cur.metrics is None:
        return Text("scheduler metrics: not scraped (pass --metrics host:port)", "dim")
    rpc = rate(cur, prev, "sluice_rpc_requests_total")
    errors = None
    if rpc is not None:
        ok = rate(cur, prev, "sluice_rpc_requests_total", code="OK") or 0.0
        errors = rpc - ok
    hits = rate(cur, prev, "sluice_scheduler_cache_lookups_total", result="hit")
    parts = [
        f"requests/s {_num(rate(cur, prev, 'sluice_scheduler_requests_total'))}",
        f"RPC/s {_num(rpc)}",
        f"non-OK/s {_num(errors)}",
        f"retries/s {_num(rate(cur, prev, 'sluice_scheduler_retries_total'))}",
        f"in flight {_num(cur.total('sluice_scheduler_in_flight_requests'), '{:.0f}')}",
        f"cache hits/s {_num(hits)}",
    ]
    return Text("scheduler: " + " · ".join(parts))


def render(cur: Sample, prev: Sample | None, title: str) -> RenderableType:
    """One frame of `sluice top`."""
    parts: list[RenderableType] = [Text(title, style="bold")]
    if cur.nodes is not None:
        parts.append(nodes_table(cur))
    parts += [classes_table(cur, prev), tenants_table(cur, prev), summary(cur, prev)]
    parts += [Text(e, style="red") for e in cur.errors]
    if prev is None:
        parts.append(Text("rates appear from the second refresh", style="dim"))
    return Group(*parts)
