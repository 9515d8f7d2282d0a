"""The CLI on the SDK: `sluice top`, `sluice tenants`, the request commands, `sluice bench`.

Commands run through typer's ``CliRunner`` in a worker thread (the suite serves from the
test's event loop, and the CLI's client blocks).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console
from typer.testing import CliRunner, Result

from scheduler.app import SchedulerService
from scheduler.config import SchedulerSettings
from sluice import AsyncClient, cli
from sluice.local.stores import free_port
from sluice.local.top import Sample, rate, render
from sluice.runtime.telemetry import MetricsServer
from sluice.v1 import admin_pb2
from tests.harness import API_KEY, OTHER_KEY, Suite, eventually
from tests.harness import test_tenants as tenant_directory

TINY = "tiny-random-llama"


@pytest.fixture
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables at a width where no column is cut short."""
    monkeypatch.setattr(cli, "console", Console(width=240))


async def invoke(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, cli.app, list(args))


@pytest.fixture
async def with_metrics(suite: Suite, tmp_path: Path) -> AsyncIterator[Path]:
    """Cache, a node and a scheduler whose /metrics is served, recorded in a run directory's
    endpoints.json as `sluice up` records it; yields the run directory."""
    await suite.start_cache()
    await suite.start_node("node-a")
    registry = CollectorRegistry()
    assert suite.cache is not None
    settings = SchedulerSettings(
        etcd_endpoint=suite.etcd, cache_address=suite.cache.address, registry_ttl_seconds=2
    )
    scheduler = SchedulerService(settings, registry, tenants=tenant_directory())
    await scheduler.start()
    suite.scheduler = scheduler  # the suite stops it
    await eventually(lambda: scheduler.nodes.candidates(TINY, 1))
    metrics = MetricsServer(registry)
    metrics.start()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    endpoints = {"scheduler": {"grpc": scheduler.address, "metrics": metrics.address}}
    (run_dir / "endpoints.json").write_text(json.dumps(endpoints))
    yield run_dir
    metrics.stop()


def test_rates_come_from_counter_deltas_between_samples() -> None:
    """A counter's rate is its increase over the time between samples, summed over matching
    series; a reset counts from zero; one sample gives no rate."""
    name = "sluice_scheduler_requests_total"

    def sample(at: float, ok: float, refused: float) -> Sample:
        labels = {"workload_class": "realtime", "kind": "generate"}
        return Sample(
            at=at,
            metrics={
                (name, frozenset({**labels, "outcome": "ok"}.items())): ok,
                (name, frozenset({**labels, "outcome": "refused"}.items())): refused,
            },
        )

    first, second = sample(10.0, 5, 1), sample(12.0, 11, 5)
    assert rate(second, first, name, outcome="ok") == pytest.approx(3.0)
    assert rate(second, first, name, workload_class="realtime") == pytest.approx(5.0)
    assert rate(second, None, name) is None
    assert rate(sample(14.0, 2, 5), second, name, outcome="ok") == pytest.approx(1.0)
    frame = Console(width=200, record=True)
    frame.print(render(second, first, "t"))
    assert "3.0" in frame.export_text()


def test_queues_show_by_class_from_metrics_and_by_tenant_from_usage() -> None:
    """The ``sluice_scheduler_queue_depth`` gauge fills the class table's queue column (a dash
    without it); the tenant table shows each tenant's queued requests and refusal reasons."""
    depth = "sluice_scheduler_queue_depth"
    metrics = {
        (depth, frozenset({"workload_class": "batch", "tenant": "alpha"}.items())): 7.0,
        (depth, frozenset({"workload_class": "batch", "tenant": "beta"}.items())): 4.0,
    }
    usage = [
        admin_pb2.TenantUsage(tenant="alpha", queued=7, weight=2.0),
        admin_pb2.TenantUsage(
            tenant="beta", queued=4, refused=3, refused_by_reason={"QUOTA_EXCEEDED": 3}
        ),
    ]

    def rows(sample: Sample) -> dict[str, list[str]]:
        frame = Console(width=240, record=True)
        frame.print(render(sample, None, "t"))
        lines = [line for line in frame.export_text().splitlines() if "│" in line]
        return {
            cells[1]: cells[1:-1] for cells in ([c.strip() for c in ln.split("│")] for ln in lines)
        }

    with_metrics = rows(Sample(at=1.0, metrics=metrics, usage=usage))
    assert with_metrics["batch"][3] == "11"
    assert with_metrics["realtime"][3] == "0"
    assert with_metrics["alpha"][1:4] == ["2", "0", "7"]
    assert with_metrics["beta"][3] == "4"
    assert "QUOTA_EXCEEDED 3" in with_metrics["beta"]
    assert rows(Sample(at=1.0, usage=usage))["batch"][3] == "–"


async def test_top_once_renders_nodes_classes_tenants_and_rates(
    with_metrics: Path, suite: Suite, wide_console: None
) -> None:
    """`sluice top --once` finds the scheduler and its /metrics through endpoints.json and shows
    the node, the classes, the caller's tenant and scheduler-wide rates."""
    assert suite.scheduler is not None
    async with AsyncClient(suite.scheduler.address, api_key=API_KEY) as client:
        [c async for c in client.generate(TINY, "hello", max_new_tokens=3)]
    result = await invoke(
        "top", "--once", "--interval", "0.2", "--run-dir", str(with_metrics), "--api-key", API_KEY
    )
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in ("node-a", "healthy", "closed", "realtime", "batch", "alpha", "RPC/s"):
        assert expected in out
    assert "not scraped" not in out
    assert "rates appear" not in out


async def test_top_once_fails_when_the_scheduler_does_not_answer(
    tmp_path: Path, wide_console: None
) -> None:
    """No scheduler behind the endpoint: one frame with the error, exit code 1."""
    dead = f"127.0.0.1:{free_port('127.0.0.1')}"
    result = await invoke(
        "top", "--once", "--interval", "0", "--endpoint", dead, "--run-dir", str(tmp_path)
    )
    assert result.exit_code == 1
    assert "ListNodes: UNAVAILABLE" in result.output


async def test_request_commands_and_tenants_use_the_sdk(running: Suite, wide_console: None) -> None:
    """generate, embed, nodes and tenants work against the suite; a tenant that is not an
    admin may not read another's usage or list the nodes; a bad key exits 1 with the status
    code."""
    assert running.scheduler is not None
    common = ["--endpoint", running.scheduler.address, "--api-key", API_KEY]
    gen = await invoke(
        "generate", "hello", "--model", TINY, "--no-chat", "--max-new-tokens", "3", *common
    )
    assert gen.exit_code == 0, gen.output
    assert "3 tokens" in gen.output
    emb = await invoke("embed", "a cat", *common)
    assert emb.exit_code == 0, emb.output
    assert "384 dims" in emb.output
    nodes = await invoke("nodes", *common)
    assert "node-a" in nodes.output
    tenants = await invoke("tenants", *common)
    assert tenants.exit_code == 0, tenants.output
    assert "alpha" in tenants.output
    not_admin = ["--endpoint", running.scheduler.address, "--api-key", OTHER_KEY]
    denied = await invoke("tenants", "--tenant", "alpha", *not_admin)
    assert denied.exit_code == 1
    assert "PERMISSION_DENIED" in denied.output
    denied_nodes = await invoke("nodes", *not_admin)
    assert denied_nodes.exit_code == 1
    assert "PERMISSION_DENIED" in denied_nodes.output
    bad = await invoke("nodes", "--endpoint", running.scheduler.address, "--api-key", "sk-wrong")
    assert bad.exit_code == 1
    assert "UNAUTHENTICATED" in bad.output
