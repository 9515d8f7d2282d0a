"""Whose fault an error from an inference node is, and so what the dispatcher does with it.

Only a failure of the node or the way to it counts against the node's breaker and allows a
retry elsewhere; a full node (RESOURCE_EXHAUSTED) is retried without touching its breaker;
an error that is the request's own (above all INVALID_ARGUMENT, reason ``REQUEST_FAULT``: a
poison request the node failed alone) goes to the client as it came, so a request that fails
the same way everywhere cannot open every node's circuit (:mod:`scheduler.dispatch`).
"""

from __future__ import annotations

import enum

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from sluice.runtime.errors import ERROR_DOMAIN, STATUS_DETAILS_METADATA


class Blame(enum.Enum):
    """Whose fault an error from a node is, and so what the dispatcher does with it."""

    NODE = "node"
    """The node or the way to it failed: a breaker failure; retried on another node while
    nothing reached the client, else the stream ends UNAVAILABLE ``NODE_FAILED_MIDSTREAM``."""
    BUSY = "busy"
    """The node refused for capacity (RESOURCE_EXHAUSTED) before doing anything: retried on
    another node, the breaker untouched (a full node is not a sick one)."""
    REQUEST = "request"
    """The request's own, or an answer the node gave on purpose: passed to the client with
    its code and details; no breaker failure, no retry."""


# Codes a transport or a dying process produces without any handler of ours answering.
_TRANSPORT_CODES = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _answered_by_a_node(exc: grpc.aio.AioRpcError) -> bool:
    """True when the status carries a Sluice ``ErrorInfo``: a node's handler (its
    interceptor) answered, rather than the transport (an RST_STREAM, a process dying)."""
    for key, value in exc.trailing_metadata() or ():
        if key != STATUS_DETAILS_METADATA or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return False
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return True
    return False


def blame(exc: grpc.aio.AioRpcError) -> Blame:
    """Whose fault a failed node call is.

    UNAVAILABLE (connection lost, node draining, its engine's shared step failed) is the
    node's; so are INTERNAL, UNKNOWN, CANCELLED and DATA_LOSS without a Sluice status, which
    only a transport or a crashing process produce. RESOURCE_EXHAUSTED is the node being
    full. Everything else is the request's: INVALID_ARGUMENT (reason ``REQUEST_FAULT`` for a
    request that failed while the node processed it), and INTERNAL that a node's handler
    answered, a bug the request provoked, which would trip every breaker in turn if counted
    (DEADLINE_EXCEEDED is the request's deadline; the caller maps it)."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return Blame.NODE
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Blame.BUSY
    if code in _TRANSPORT_CODES and not _answered_by_a_node(exc):
        return Blame.NODE
    return Blame.REQUEST
