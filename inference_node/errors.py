"""The node's own domain errors (the shared ones are in :mod:`sluice.runtime.errors`)."""

from __future__ import annotations

import grpc

from sluice.runtime.errors import InvalidArgument, SluiceError

REQUEST_FAULT = "REQUEST_FAULT"
"""``ErrorInfo.reason`` of a request that passed validation but failed while the node
processed its own tokens (tokenization, sampling, detokenization, stop strings)."""
ENGINE_FAULT = "ENGINE_FAULT"
"""``ErrorInfo.reason`` of a request ended because the engine's shared step failed."""
JOB_KEY_IN_USE = "JOB_KEY_IN_USE"
"""``ErrorInfo.reason`` of a request whose job key a live request on the node holds."""
GENERATION_NOT_FOUND = "GENERATION_NOT_FOUND"
"""``ErrorInfo.reason`` (NOT_FOUND) of an attach-only request naming no detached generation
this node has for that tenant (never started here, dropped after its retention, failed or cut
off, or another tenant's)."""
ADAPTER_NOT_FOUND = "ADAPTER_NOT_FOUND"
"""``ErrorInfo.reason`` (NOT_FOUND) of a request naming an adapter the store does not have."""
ADAPTER_INVALID = "ADAPTER_INVALID"
"""``ErrorInfo.reason`` (INVALID_ARGUMENT) of a request naming an adapter whose files this
node cannot serve on the request's model."""
ADAPTER_TOO_LARGE = "ADAPTER_TOO_LARGE"
"""``ErrorInfo.reason`` (RESOURCE_EXHAUSTED) of an adapter larger than the node's cache."""
ADAPTER_STORE_UNAVAILABLE = "ADAPTER_STORE_UNAVAILABLE"
"""``ErrorInfo.reason`` (UNAVAILABLE) when the node could not read the adapter store."""


class RequestFault(InvalidArgument):
    """INVALID_ARGUMENT, reason ``REQUEST_FAULT``: this request alone failed while the node
    processed it; ``ErrorInfo.metadata["stage"]`` says where, ``BadRequest`` names the part
    of the request at fault. Deterministic for the request, so no layer retries it."""

    def __init__(self, field: str, stage: str, message: str) -> None:
        super().__init__([(field, message)], reason=REQUEST_FAULT)
        self.metadata = {"stage": stage}


class AlreadyExists(SluiceError):
    """ALREADY_EXISTS: a live request on this node already holds the job key."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = JOB_KEY_IN_USE


NOT_FINETUNE_NODE = "NOT_FINETUNE_NODE"
"""``ErrorInfo.reason`` (FAILED_PRECONDITION) of a Train on a node outside the finetune pool."""
MODEL_NOT_TRAINABLE = "MODEL_NOT_TRAINABLE"
"""``ErrorInfo.reason`` (FAILED_PRECONDITION) of a Train whose base model is not loaded here,
or runs on an engine that cannot interleave training."""
TRAINING_MEMORY_EXCEEDED = "TRAINING_MEMORY_EXCEEDED"
"""``ErrorInfo.reason`` (FAILED_PRECONDITION) of a Train whose memory never fits the node's
budget beside one inference sequence."""
CHECKPOINT_MISMATCH = "CHECKPOINT_MISMATCH"
"""``ErrorInfo.reason`` (FAILED_PRECONDITION) of a Train whose job has a checkpoint of another
model, dataset or configuration (or an unreadable one)."""
CHECKPOINT_STORE_UNAVAILABLE = "CHECKPOINT_STORE_UNAVAILABLE"
"""``ErrorInfo.reason`` (UNAVAILABLE) when the checkpoint store could not be read or written."""
TRAINING_BUSY = "TRAINING_BUSY"
"""``ErrorInfo.reason`` (RESOURCE_EXHAUSTED + RetryInfo) of a Train while one runs here."""
ADAPTER_EXISTS = "ADAPTER_EXISTS"
"""``ErrorInfo.reason`` (ALREADY_EXISTS) of a Train whose adapter name is taken in the store
by other weights."""


class FailedPrecondition(SluiceError):
    """FAILED_PRECONDITION: the node is not in a state to do this (it is the wrong node, or
    the job's stored state contradicts the request); another node may be."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"
