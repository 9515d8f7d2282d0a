"""API keys: generated with ``secrets``, stored only as SHA-256 hashes, compared in constant time.

Keys carry 256 bits of entropy, so a fast unsalted hash is enough (as for GitHub tokens): the
point is that the tenants file and etcd never hold a usable key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection, Iterable
from pathlib import Path

import yaml

KEY_PREFIX = "sk-sluice-"
HASH_SCHEME = "sha256:"


def new_api_key() -> str:
    """A fresh random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The stored form of ``key``: ``sha256:<hex>``."""
    return HASH_SCHEME + hashlib.sha256(key.encode()).hexdigest()


def key_matches(key: str, stored_hash: str) -> bool:
    """Constant-time comparison of ``key`` against a stored hash."""
    return hmac.compare_digest(hash_api_key(key), stored_hash)


def write_tenants_file(
    path: Path, tenants: Iterable[tuple[str, str]], *, admins: Collection[str] = ()
) -> None:
    """Write a tenants file for ``(name, api_key)`` pairs, storing only the keys' hashes;
    the tenants named in ``admins`` may use the Admin calls."""
    data = {
        "tenants": [
            {"name": name, "api_key_hashes": [hash_api_key(key)], "admin": name in admins}
            for name, key in tenants
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
