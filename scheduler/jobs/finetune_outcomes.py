"""What a fine-tune driver makes of a job's record and of a ``Node.Train`` call's end: pure
functions, no I/O.

How a failed Train call is classified (:func:`classify`), by its code and ``ErrorInfo``
reason (the node's, :mod:`inference_node.train_service`):

============================================  ==============  ==================================
what the node said                            outcome         what the driver does
============================================  ==============  ==================================
RESOURCE_EXHAUSTED (``TRAINING_BUSY``)        ``busy``        avoid the node for its RetryInfo;
                                                              not counted
UNAVAILABLE ``NODE_DRAINING``                 ``draining``    avoid the node; not counted
FAILED_PRECONDITION ``NOT_FINETUNE_NODE``,    ``unsuitable``  avoid the node (it can never
``MODEL_NOT_TRAINABLE``,                                      train this job); not counted
``TRAINING_MEMORY_EXCEEDED``
UNAVAILABLE ``CHECKPOINT_STORE_UNAVAILABLE``  ``store``       avoid the node; not counted: an
or ``ADAPTER_STORE_UNAVAILABLE``                              outage of the fleet's stores is
                                                              not the job's failure, so it
                                                              waits (trying other nodes) up to
                                                              its window rather than burning
                                                              its attempts in seconds
INVALID_ARGUMENT, OUT_OF_RANGE,               ``permanent``   FAILED at once with the node's
ALREADY_EXISTS (``ADAPTER_EXISTS``: the name                  message: no node can do better
holds another job's weights),
FAILED_PRECONDITION ``CHECKPOINT_MISMATCH``
anything else (a broken stream, a dead node)  ``failed``      avoid the node, counted
============================================  ==============  ==================================
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from scheduler.jobs.model import JobRecord
from scheduler.jobs.store import now_ms
from sluice.v1 import jobs_pb2

BUSY_RETRY_S = 5.0
"""How long a node that refused a fine-tune as busy without RetryInfo is avoided."""
PERMANENT = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
"""Train failures that mean the job itself is at fault, whatever the reason: FAILED at once."""
PERMANENT_PRECONDITIONS = frozenset({"CHECKPOINT_MISMATCH"})
"""FAILED_PRECONDITION reasons of the job's own (its checkpoint is not of this request)."""
UNSUITABLE_NODE = frozenset(
    {"NOT_FINETUNE_NODE", "MODEL_NOT_TRAINABLE", "TRAINING_MEMORY_EXCEEDED"}
)
"""FAILED_PRECONDITION reasons of the node's: another node may train the job."""
STORE_UNAVAILABLE = frozenset({"CHECKPOINT_STORE_UNAVAILABLE", "ADAPTER_STORE_UNAVAILABLE"})


@dataclass(frozen=True)
class Outcome:
    """How one Train call ended."""

    kind: str
    """trained, stopped, busy, draining, unsuitable, store, permanent, failed or stalled."""
    message: str = ""
    retry_after_s: float = 0.0


def stop_reason(record: JobRecord | None) -> str:
    """Why a driver should stop now: "final", "cancelled", "expired", or "" to go on."""
    if record is None or record.final:
        return "final"
    if record.state == jobs_pb2.JOB_STATE_CANCELLING:
        return "cancelled"
    if now_ms() >= record.deadline_ms:
        return "expired"
    return ""


def classify(exc: grpc.aio.AioRpcError, node_id: str) -> Outcome:
    """A failed Train call as an :class:`Outcome` (see the module docstring)."""
    code = exc.code()
    reason, retry = "", 0.0
    try:
        status = rpc_status.from_call(exc)
    except ValueError:
        status = None
    for packed in status.details if status is not None else ():
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            reason = info.reason
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            delay = error_details_pb2.RetryInfo()
            packed.Unpack(delay)
            retry = delay.retry_delay.ToTimedelta().total_seconds()
    message = f"node {node_id}: {code.name}: {exc.details() or reason}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Outcome("busy", message, retry or BUSY_RETRY_S)
    if code == grpc.StatusCode.UNAVAILABLE and reason == "NODE_DRAINING":
        return Outcome("draining", message)
    if code == grpc.StatusCode.UNAVAILABLE and reason in STORE_UNAVAILABLE:
        return Outcome("store", message)
    if code == grpc.StatusCode.FAILED_PRECONDITION and reason in UNSUITABLE_NODE:
        return Outcome("unsuitable", message)
    if code in PERMANENT or (
        code == grpc.StatusCode.FAILED_PRECONDITION and reason in PERMANENT_PRECONDITIONS
    ):
        return Outcome("permanent", message)
    return Outcome("failed", message)


def progress_fields(
    progress: jobs_pb2.TrainingProgress, node_id: str
) -> dict[str, str | int | float]:
    """The job hash fields a ``progress`` event sets. One without ``total_steps`` is the
    node's heartbeat while it prepares (nothing known yet): it names the node only."""
    node = progress.node_id or node_id
    if not progress.total_steps:
        return {"train_node": node}
    fields: dict[str, str | int | float] = {
        "train_step": progress.step,
        "train_loss": progress.loss,
        "train_lr": progress.learning_rate,
        "train_tokens_per_s": round(progress.tokens_per_second, 2),
        "train_waiting_s": round(progress.waiting_seconds, 3),
        "train_node": node,
        "train_total": progress.total_steps,
    }
    if progress.checkpoint_step:
        fields["checkpoint_step"] = progress.checkpoint_step
    if progress.eta_unix_ms:
        fields["train_eta_ms"] = progress.eta_unix_ms
        fields["predicted_ms"] = progress.eta_unix_ms
    return fields
