"""One dispatch pass (scheduler.gate._PassScan over the queues) against a node directory fed by
a real etcd: which queued request starts when a promoted lower-class request holds the model."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from scheduler.admission import Admission
from scheduler.gate import _PassScan
from scheduler.nodes import NodeDirectory
from scheduler.queues import FairQueues
from scheduler.shares import SlotShares
from sluice.contract import NODES_PREFIX, WorkloadClass
from sluice.runtime.registry import PrefixView, etcd_client
from sluice.v1 import common_pb2
from tests.test_scheduler_core import FakeClock, item

REALTIME, BATCH = WorkloadClass.REALTIME, WorkloadClass.BATCH


def _decode(raw: bytes) -> common_pb2.NodeInfo:
    return common_pb2.NodeInfo.FromString(raw)


@pytest.fixture
async def directory(etcd: str) -> AsyncIterator[tuple[NodeDirectory, FakeClock]]:
    """A directory following one registered 8-sequence node of model ``m`` (healthy; its
    channel is never used)."""
    client = etcd_client(etcd)
    info = common_pb2.NodeInfo(
        node_id="node-a",
        address="127.0.0.1:9",
        models=[common_pb2.ModelInfo(name="m", kind=common_pb2.MODEL_KIND_GENERATE)],
        pools=["realtime"],
        capacity=common_pb2.Capacity(max_sequences=8),
        state=common_pb2.NODE_STATE_SERVING,
    )
    await client.put((NODES_PREFIX + "node-a").encode(), info.SerializeToString())
    view = PrefixView(client, NODES_PREFIX, _decode)
    assert await view.start(within_s=5)
    clock = FakeClock()  # the queues' clock: the directory's health and report loops keep time
    nodes = NodeDirectory(view)
    nodes.start()
    node = nodes.get("node-a")
    assert node is not None
    node.healthy = True
    try:
        yield nodes, clock
    finally:
        await nodes.close()
        await view.stop()
        await client.close()


def _scan(nodes: NodeDirectory, queues: FairQueues, clock: FakeClock) -> _PassScan:
    def weight(_: str) -> float:
        return 1.0

    admission = Admission(queues, clock, weight)
    return _PassScan(nodes, admission, queues, SlotShares(clock, weight), lambda *_: None)


async def test_a_promoted_batch_request_takes_realtimes_headroom_and_realtime_starts_behind_it(
    directory: tuple[NodeDirectory, FakeClock],
) -> None:
    """BATCH leaves one of the node's 8 sequences to REALTIME and 7 are taken (5 REALTIME, 2
    BATCH). A promoted BATCH request holds the model until it starts; held to that reserve it
    could not start, and the REALTIME request behind it, with 3 slots it may use, waited with
    it (bench-slo overload 4x: REALTIME queued seconds beside idle slots). Promoted, it takes
    the reserved slot, and REALTIME starts next; a BATCH request not yet promoted still leaves
    the reserve alone."""
    nodes, clock = directory
    node = nodes.get("node-a")
    assert node is not None
    for cls in [REALTIME] * 5 + [BATCH] * 2:
        node.book.on_dispatch(10, cls)
    queues = FairQueues(clock, lambda _: 1.0)
    promoted = item("c", BATCH, model="m", start_by=clock() + 0.5)
    realtime = item("a", REALTIME, model="m")
    later = item("c", BATCH, model="m", start_by=clock() + 60)
    for queued in (promoted, realtime, later):
        queues.push(queued)

    scan = _scan(nodes, queues, clock)
    assert queues.pop(scan.placeable) is promoted
    assert scan.took(promoted) is node
    node.book.on_dispatch(10, BATCH)
    assert queues.pop(scan.placeable) is realtime
    scan.took(realtime)
    node.book.on_dispatch(10, REALTIME)
    assert queues.pop(_scan(nodes, queues, clock).placeable) is None  # 9 on 8: BATCH waits
    node.book.on_finish(REALTIME)
    node.book.on_finish(REALTIME)
    assert queues.pop(_scan(nodes, queues, clock).placeable) is None  # 7 of 8: the reserve
    node.book.on_finish(REALTIME)
    assert queues.pop(_scan(nodes, queues, clock).placeable) is later
