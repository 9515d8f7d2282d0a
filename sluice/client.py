"""Python client for Sluice's public API (the SDK lives in :mod:`sluice.sdk`; this module keeps
``from sluice.client import ...`` working).

```python
import asyncio
from sluice.client import AsyncClient

async def main() -> None:
    async with AsyncClient("127.0.0.1:50051", api_key="sk-sluice-...") as client:
        async for chunk in client.generate("smollm2-135m-instruct", "Hello!", max_new_tokens=16):
            print(chunk.text, end="", flush=True)

asyncio.run(main())
```

Errors arrive as :class:`SluiceRpcError` subclasses carrying the status details
(``retry_after_s`` from ``RetryInfo``, ``violations`` from ``BadRequest`` and ``QuotaFailure``,
``reason`` from ``ErrorInfo``).
"""

from sluice.sdk import (
    DEFAULT_TIMEOUT_S,
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
    from_rpc_error,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
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
    "batch_job",
    "from_rpc_error",
]
