"""Sluice: keep a self-hosted model-serving fleet answering under overload.

The package holds the contract's generated stubs (``sluice.v1``), the shared runtime every
service stands on (server bootstrap, telemetry, settings, the etcd registry) and the client SDK.
"""

__version__ = "0.1.0"
