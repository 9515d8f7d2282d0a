"""The SDK's implementation; import it from :mod:`sluice` (``from sluice import Client``).

:mod:`.calls` describes every call once; :mod:`.aio` (:class:`AsyncClient`) and :mod:`.sync`
(:class:`Client`) are its two transports. :mod:`.errors` (typed errors), :mod:`.retry` (retry
policy), :mod:`.endpoints` (endpoints, discovery, round robin), :mod:`.tls` (:class:`TlsConfig`:
TLS of every channel), :mod:`.requests` (request builders such as ``batch_job``), :mod:`.base`
(what both transports share).

``TlsConfig`` loads on first use, like the names of :mod:`sluice` (it loads grpc).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluice.sdk.tls import TlsConfig

__all__ = ["TlsConfig"]


def __getattr__(name: str) -> Any:
    if name == "TlsConfig":
        value = importlib.import_module("sluice.sdk.tls").TlsConfig
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'sluice.sdk' has no attribute {name!r}")
