"""Sluice: keep a self-hosted model-serving fleet answering under overload.

This package is the SDK's one public import path::

    from sluice import Client, AsyncClient, RetryPolicy, OverloadedError, WorkloadClass

Inside it: ``sluice.sdk`` (the client's implementation), ``sluice.v1`` (the contract's generated
stubs), ``sluice.contract`` (workload classes, metadata keys, etcd prefixes), and, with the
``server`` extra, ``sluice.runtime`` (what every service stands on) and ``sluice.local`` (the
suite on one machine: ``sluice up``, demo, top).

The SDK's names load on first use: a service imports ``sluice.runtime.grpc_io`` before anything
loads grpc (it picks gRPC's I/O engine), and importing this package must not load grpc first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sluice.contract import WorkloadClass
    from sluice.sdk.aio import AsyncClient
    from sluice.sdk.calls import FINAL_JOB_STATES
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
    from sluice.sdk.job_lines import (
        JobLineError,
        JobLinesError,
        ParsedLines,
        parse_job_lines,
        result_record,
    )
    from sluice.sdk.requests import Prompt, embed_line, generate_line
    from sluice.sdk.retry import RetryPolicy
    from sluice.sdk.sync import Client
    from sluice.sdk.tls import TlsConfig

__all__ = [
    "FINAL_JOB_STATES",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "DeadlineExceededError",
    "InvalidRequestError",
    "JobLineError",
    "JobLinesError",
    "NotFoundError",
    "OverloadedError",
    "ParsedLines",
    "PermissionDeniedError",
    "Prompt",
    "QuotaExceededError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SluiceRpcError",
    "TlsConfig",
    "UnavailableError",
    "UnimplementedError",
    "WorkloadClass",
    "__version__",
    "embed_line",
    "generate_line",
    "parse_job_lines",
    "result_record",
]
_HOMES = (
    "sluice.sdk.aio",
    "sluice.sdk.sync",
    "sluice.sdk.errors",
    "sluice.sdk.retry",
    "sluice.sdk.requests",
    "sluice.sdk.job_lines",
    "sluice.sdk.calls",
    "sluice.sdk.tls",
    "sluice.contract",
)


def __getattr__(name: str) -> Any:
    if name in __all__:
        for home in _HOMES:
            module = importlib.import_module(home)
            if hasattr(module, name):
                value = getattr(module, name)
                globals()[name] = value  # later lookups skip this function
                return value
    raise AttributeError(f"module 'sluice' has no attribute {name!r}")
