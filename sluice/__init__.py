"""Sluice: keep a self-hosted model-serving fleet answering under overload.

This package is the SDK's one public import path::

    from sluice import Client, AsyncClient, RetryPolicy, OverloadedError, WorkloadClass

Inside it: ``sluice.sdk`` (the client's implementation), ``sluice.v1`` (the contract's generated
stubs), ``sluice.contract`` (workload classes, metadata keys, etcd prefixes), and, with the
``server`` extra, ``sluice.runtime`` (what every service stands on) and ``sluice.local`` (the
suite on one machine: ``sluice up``, demo, top).
"""

from __future__ import annotations

from sluice.contract import WorkloadClass
from sluice.sdk.aio import AsyncClient
from sluice.sdk.errors import (
    AuthenticationError,
    DeadlineExceededError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    QuotaExceededError,
    ResourceExhaustedError,
    SluiceRpcError,
    UnavailableError,
    UnimplementedError,
)
from sluice.sdk.requests import Prompt, batch_job
from sluice.sdk.retry import RetryPolicy
from sluice.sdk.sync import Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "DeadlineExceededError",
    "InvalidRequestError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "Prompt",
    "QuotaExceededError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SluiceRpcError",
    "UnavailableError",
    "UnimplementedError",
    "WorkloadClass",
    "__version__",
    "batch_job",
]
