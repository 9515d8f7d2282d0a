"""Cache service settings."""

from __future__ import annotations

from sluice.runtime.settings import ServiceSettings


class CacheSettings(ServiceSettings):
    """Settings of the cache service (``SLUICE_*`` env, YAML file or flags)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the cache entries."""
    redis_timeout_seconds: float = 0.25
    """Connect and socket timeout of every Redis command: a dead Redis costs this, not seconds."""
    default_ttl_seconds: int = 300
    """Lifetime of an entry when the store request names none."""
    max_entry_bytes: int = 1 << 20
    """Largest entry kept; bigger responses are not cached."""
