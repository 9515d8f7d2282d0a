"""The Sluice SDK: :class:`AsyncClient` (asyncio) and :class:`Client` (blocking).

```python
from sluice import Client, Overloaded

with Client("127.0.0.1:50051", api_key="sk-sluice-...") as client:
    try:
        print(client.generate_text("smollm2-135m-instruct", [("user", "Hi!")]))
    except Overloaded as exc:
        print(f"busy, come back in {exc.retry_after_s}s")
```

Modules: :mod:`~sluice.sdk.aio` and :mod:`~sluice.sdk.sync` (the clients),
:mod:`~sluice.sdk.errors` (typed errors), :mod:`~sluice.sdk.retry` (retry policy),
:mod:`~sluice.sdk.endpoints` (endpoints, discovery, round robin), :mod:`~sluice.sdk.requests`
(request builders such as :func:`batch_job`).
"""

from sluice.sdk.aio import AsyncClient
from sluice.sdk.base import DEFAULT_TIMEOUT_S
from sluice.sdk.errors import (
    AuthenticationError,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    ResourceExhausted,
    SluiceRpcError,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from sluice.sdk.requests import batch_job
from sluice.sdk.retry import RetryPolicy
from sluice.sdk.sync import Client

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
