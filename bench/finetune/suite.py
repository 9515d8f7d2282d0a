"""The suite the fine-tune benchmark runs on: `sluice up`'s secure supervisor
(:class:`bench.chaos.suite.ChaosSuite`) with one node of the benchmark's model, then a second
node started beside it for the kill.

`sluice up` (``UpConfig``) gives its nodes the ``realtime`` and ``finetune`` pools and the run
directory's shared adapter and checkpoint stores, but not the training bounds
(``--training-yield-bound-ms``, ``--training-itl-budget-ms``): SmolLM2 needs a yield bound over
the node's default (:class:`NodeFlags`). So the supervisor's node is restarted with
:class:`NodeFlags` added to its command line (:meth:`FinetuneSuite.configure`, supervision
paused meanwhile, as :func:`bench.jobs.suite.restart_scheduler` restarts the scheduler; the
supervisor restarts a crashed child with its command line, so a later restart keeps them), and
the second node is started here with the same flags, enrolled by the supervisor (its own
certificate and etcd user). Both use ``<run-dir>/checkpoints`` and ``<run-dir>/adapters``, the
fleet's stores, as `sluice up`'s nodes do. Until :meth:`FinetuneSuite.configure` the node is
`sluice up`'s own: the benchmark's baseline without training is measured on it (no fine-tune
is submitted before).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from bench.chaos.suite import (
    ADMIN,
    FUZZER,
    HOST,
    LOAD_TENANTS,
    ChaosSuite,
    Extra,
    tenants_document,
)
from bench.jobs.suite import CpuMeter, restart_child
from sluice.local.stores import free_port
from sluice.local.up import Endpoints, Supervisor, UpConfig
from sluice.runtime.auth import new_api_key
from sluice.runtime.tls import node_identity

FIRST_NODE = "node-1"
SECOND_NODE = "node-2"


@dataclass(frozen=True)
class NodeFlags:
    """What every node of the benchmark runs with beyond `sluice up`'s flags."""

    yield_bound_ms: float = 100.0
    """``--training-yield-bound-ms`` (default 50): SmolLM2's loss unit takes ~40-47 ms on
    one thread, over the default 50 ms with the policy's 1.25 safety factor, so at the
    default training would only run on remeasures; the run records what it used."""
    itl_budget_ms: float | None = None
    """``--training-itl-budget-ms``; None leaves the node's default (none: the gap policy's
    share of the decode time and the model's own step-time tail bound training)."""
    concurrency: str = "auto"
    """``--training-concurrency``: ``auto`` trains on a thread of its own on CUDA, in the
    engine thread's gaps on the CPU."""
    pools: tuple[str, ...] = ("realtime", "finetune")

    def flags(self, run_dir: Path) -> list[str]:
        """The node flags, the stores under ``run_dir``."""
        budget = [] if self.itl_budget_ms is None else [f"{self.itl_budget_ms:g}"]
        return [
            "--pools", ",".join(self.pools),
            "--checkpoint-dir", str(run_dir / "checkpoints"),
            "--adapters-dir", str(run_dir / "adapters"),
            "--training-yield-bound-ms", f"{self.yield_bound_ms:g}",
            "--training-concurrency", self.concurrency,
            *(["--training-itl-budget-ms", *budget] if budget else []),
        ]  # fmt: skip


@dataclass
class FinetuneSuite(ChaosSuite):
    """:class:`ChaosSuite` serving ``model`` (the tenants may use it), one node to start."""

    model: str = "tiny-random-llama"
    device: str = "cpu"
    node_flags: NodeFlags | None = None
    """The flags the node was restarted with (None: `sluice up`'s node, not configured)."""
    supervision: asyncio.Task[None] | None = None

    def start(self) -> Endpoints:
        """Write the tenants file and start the suite (blocking)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.keys = {n: new_api_key() for n in (*LOAD_TENANTS, FUZZER, ADMIN)}
        document = tenants_document(self.keys)
        for tenant in document["tenants"]:
            tenant["models"] = [self.model]
        tenants = self.run_dir / "tenants.yaml"
        tenants.write_text(yaml.safe_dump(document, sort_keys=False))
        config = UpConfig(
            run_dir=self.run_dir,
            nodes=self.nodes,
            models=[self.model],
            device=self.device,
            dtype="float32",  # as the extra node below: a job resumed across nodes compares losses
            tenants_file=tenants,
            startup_timeout_s=self.startup_timeout_s,
            grace_s=2.0,
            insecure=self.insecure,
        )
        self.supervisor = Supervisor(config, say=self.say)
        self.endpoints = self.supervisor.start()
        return self.endpoints

    def start_supervising(self) -> None:
        """Supervise as `sluice up` does (:meth:`ChaosSuite.supervise`) until stopped."""
        if self.supervision is None:
            self.supervision = asyncio.create_task(self.supervise())

    async def stop_supervising(self) -> None:
        """Stop supervising (waits for a pass in progress)."""
        task, self.supervision = self.supervision, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def configure(self, flags: NodeFlags) -> None:
        """Restart the supervisor's first node with ``flags``, supervision paused meanwhile
        (the supervisor never sees the stop); returns once the scheduler sees it healthy."""
        await self.stop_supervising()
        try:
            await asyncio.to_thread(self.restart_node, FIRST_NODE, flags)
            self.node_flags = flags
        finally:
            self.start_supervising()

    def restart_node(self, name: str, flags: NodeFlags, timeout_s: float = 180.0) -> None:
        """Restart the supervisor's node ``name`` with ``flags`` (blocking, unsupervised)."""
        restart_child(self, name, flags.flags(self.run_dir), timeout_s, stop_s=30.0)
        self.wait_nodes({name}, timeout_s=timeout_s)

    def start_extra_node(self, node_id: str, timeout_s: float = 180.0) -> Extra:
        """One more node of the model with :class:`NodeFlags`, enrolled by the supervisor;
        returns once the scheduler sees it healthy."""
        if self.endpoints is None or self.supervisor is None or self.node_flags is None:
            raise RuntimeError("the suite is not started and configured")
        secrets = self.supervisor.enroll_node(node_id)
        args = [
            "--etcd-endpoint", self.endpoints.etcd, "--models", self.model, "--device", self.device,
            "--dtype", "float32", "--cpu-nice", str(UpConfig.node_cpu_nice),
            "--node-id", node_id, *self.node_flags.flags(self.run_dir),
        ]  # fmt: skip
        port = free_port(HOST)
        node = self._spawn(node_id, "inference_node", port, args, node_identity(node_id), secrets)
        self._wait_serving(node, timeout_s)
        self.wait_nodes({node_id}, timeout_s=timeout_s)
        return node

    def node_pid(self, node_id: str) -> int | None:
        """The live process of node ``node_id`` (the supervisor's or an extra), or None."""
        procs = [e.proc for e in self.extras if e.name == node_id]
        if self.supervisor is not None:
            procs += [c.proc for c in self.supervisor.children if c.name == node_id]
        return next((p.pid for p in procs if p.poll() is None), None)

    def node_metrics(self, node_id: str) -> str:
        """Where node ``node_id``'s ``/metrics`` is."""
        for extra in self.extras:
            if extra.name == node_id:
                return extra.metrics_address
        return self.child(node_id).metrics_address


def _tree_cpu_s() -> float:
    """CPU seconds of this process, its reaped children and every live descendant."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
    return total


@dataclass
class TreeCpuMeter(CpuMeter):
    """:class:`bench.jobs.suite.CpuMeter` for a suite still running: this process and every
    descendant (live ones read through psutil, reaped ones through ``os.times``) against the
    whole machine. A descendant that died unreaped during the interval (a SIGKILLed node, until
    the supervisor reaps it) loses its CPU time here, which then counts as other processes'."""

    own: float = field(default_factory=_tree_cpu_s)

    def own_cpu_s(self) -> float:
        """The CPU seconds of this process and its descendants now."""
        return _tree_cpu_s()


@contextlib.asynccontextmanager
async def running(
    run_dir: Path, model: str, device: str = "cpu", say: Callable[[str], None] = print
) -> AsyncIterator[FinetuneSuite]:
    """A fresh suite of ``model`` in ``run_dir`` (emptied first), supervised while the block
    runs, then stopped (every process by its PID), on errors too."""
    shutil.rmtree(run_dir, ignore_errors=True)
    suite = FinetuneSuite(run_dir, nodes=1, model=model, device=device, say=lambda m: say(f"  {m}"))
    try:
        await asyncio.to_thread(suite.start)
        suite.start_supervising()
        yield suite
    finally:
        await suite.stop_supervising()
        await asyncio.to_thread(suite.stop)
