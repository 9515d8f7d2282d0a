"""Sluice: keep a self-hosted model-serving fleet answering under overload.

The package holds the contract's generated stubs (``sluice.v1``), the shared runtime every
service stands on (server bootstrap, telemetry, settings, the etcd registry) and the client SDK
(:mod:`sluice.sdk`), whose clients and errors are exported here::

    from sluice import Client, AsyncClient, RetryPolicy, Overloaded

They load on first use, so the services' ``from sluice import __version__`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sluice.sdk import (
        AsyncClient,
        AuthenticationError,
        Client,
        DeadlineExceeded,
        InvalidRequest,
        NotFound,
        Overloaded,
        PermissionDenied,
        QuotaExceeded,
        ResourceExhausted,
        RetryPolicy,
        SluiceRpcError,
        Unavailable,
        Unimplemented,
        batch_job,
    )

__all__ = [
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "DeadlineExceeded",
    "InvalidRequest",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "QuotaExceeded",
    "ResourceExhausted",
    "RetryPolicy",
    "SluiceRpcError",
    "Unavailable",
    "Unimplemented",
    "__version__",
    "batch_job",
]
_SDK_NAMES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        return getattr(importlib.import_module("sluice.sdk"), name)
    raise AttributeError(f"module 'sluice' has no attribute {name!r}")
