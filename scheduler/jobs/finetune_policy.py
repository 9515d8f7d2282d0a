"""Where and in what order fine-tune jobs run: pure functions, no I/O.

- **Which job next** (:func:`order_waiting`): when nodes free up, the waiting fine-tunes are
  taken tenant-fair: the tenant with the fewest fine-tunes training now per unit of weight
  goes first (ties: the earliest deadline, then the oldest job). Work-conserving: a tenant
  over its share still gets a node nobody else wants. No preemption: a running fine-tune keeps
  its node until it ends, moves or is cancelled.
- **Which node** (:func:`choose_node`): among the nodes serving the base model in the
  ``finetune`` pool, healthy, not draining and with a closed circuit (the caller filters
  those), skip the ones this job must avoid for now (they refused or failed it recently) and
  the ones already training another job; prefer the one with the fewest sequences per slot
  (spare inference capacity, where training finds the most gaps), then the node id (stable
  under ties). None when every candidate trains or is avoided: the job waits.

Failure mode: the "already training" view comes from the jobs' records in Redis (every
replica writes its jobs' node), so it is as fresh as the last event of each job; a node
whose job's driver died looks busy until that job is taken over or ``stale_ms`` passes. A
wrong guess costs one RESOURCE_EXHAUSTED from the node, which then is avoided for its
RetryInfo.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Waiting:
    """A fine-tune that wants a node."""

    job_id: str
    tenant: str
    deadline_ms: int
    created_ms: int


@dataclass(frozen=True)
class NodeLoad:
    """A candidate node as placement sees it."""

    node_id: str
    sequences: int
    """Inference sequences on it (running and waiting)."""
    max_sequences: int


def order_waiting(
    jobs: Sequence[Waiting],
    training: Mapping[str, int],
    weights: Mapping[str, float],
) -> list[Waiting]:
    """``jobs`` in the order they should get nodes (see the module docstring). ``training``:
    fine-tunes training now per tenant; ``weights``: tenants' fair-share weights (1 when
    unknown)."""
    counts = dict(training)
    left = list(jobs)
    out: list[Waiting] = []
    while left:
        best = min(
            left,
            key=lambda j: (
                counts.get(j.tenant, 0) / max(weights.get(j.tenant, 1.0), 1e-9),
                j.deadline_ms,
                j.created_ms,
                j.job_id,
            ),
        )
        left.remove(best)
        out.append(best)
        counts[best.tenant] = counts.get(best.tenant, 0) + 1
    return out


def choose_node(
    candidates: Sequence[NodeLoad],
    busy: frozenset[str],
    avoid: Mapping[str, float],
    now: float,
) -> NodeLoad | None:
    """The node to train on (see the module docstring); ``avoid`` maps node ids to the time
    (on the clock of ``now``) until which this job must not go there."""
    free = [n for n in candidates if n.node_id not in busy and avoid.get(n.node_id, 0.0) <= now]
    if not free:
        return None
    return min(free, key=lambda n: (n.sequences / max(1, n.max_sequences), n.node_id))


def busy_nodes(
    jobs: Sequence[tuple[str, str, int]], now_ms: int, stale_ms: int, exclude: str = ""
) -> frozenset[str]:
    """Nodes training some job now, from ``(job_id, node_id, last_seen_ms)`` of the running
    fine-tunes: those heard from within ``stale_ms``, ``exclude`` (the asking job) aside."""
    return frozenset(
        node
        for job_id, node, seen in jobs
        if node and job_id != exclude and now_ms - seen <= stale_ms
    )


def eta_ms(now_ms: int, step: int, total: int, seconds_per_step: float) -> int:
    """When a fine-tune at ``step`` of ``total`` should end at ``seconds_per_step``; 0 when
    unknown."""
    if total <= 0 or seconds_per_step <= 0:
        return 0
    return now_ms + int(max(0, total - step) * seconds_per_step * 1000)
