"""Per-RPC context, set by the server interceptors and read by handlers.

Each gRPC call runs in its own asyncio task, so values set here never leak between calls.
"""

from __future__ import annotations

from contextvars import ContextVar

from sluice.contract import REQUEST_ID_METADATA

__all__ = ["REQUEST_ID_METADATA", "request_id", "tenant"]

request_id: ContextVar[str] = ContextVar("sluice_request_id", default="")
"""Id of the current request: the caller's ``x-request-id`` metadata, or a fresh one."""

tenant: ContextVar[str] = ContextVar("sluice_tenant", default="")
"""Tenant of the current request, set only from a verified API key."""
