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

from sluice import sdk
from sluice.sdk import *  # noqa: F403 - this module is the SDK under its older name

__all__ = list(sdk.__all__)
